"""`python -m kvjax.train eagle`: train an EAGLE draft head for a frozen target."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np

from kvjax.lm.cli.flags import checked, nonneg, positive
from kvjax.train.cli.common import (
  add_data_flags,
  add_output_flags,
  add_period_flags,
  add_schedule_flags,
  check_frozen,
  check_run_flags,
  data_batches,
  nonneg_float,
  settle,
  text_data,
)

EAGLE_DEFAULTS = dict(
  kind="eagle1",
  batch_size=16,
  seq_len=256,
  steps=1000,
  lr=1e-3,
  warmup=100,
  weight_decay=0.0,
  clip_norm=1.0,
  final_lr_ratio=0.1,
  seed=0,
  ttt_steps=7,
  self_distill=0,
  distill_temperature=1.0,
  save_every=0,
  keep=3,
  eval_every=0,
  log_every=10,
  eval_batches=8,
  eval_prompts=4,
  tree_top_k=8,
  tree_depth=5,
  tree_tokens=32,
  eval_fraction=0.1,
  eval_split="validation",
  draft_vocab=0,
  no_progress=False,
  json=False,
  published=False,
  export_format="kvjax",
)


EAGLE_DESCRIPTION = """\
Trains an EAGLE draft head (kvjax.speculative) for a frozen target model: eagle1 regresses the
target's next top feature and matches its next-token distribution; eagle3 fuses three layers'
features and trains with training-time test (--ttt-steps unrolled draft steps). Data: corpus
batches (--data or --text, the target's tokenizer), or with --self-distill N, N sequences the
target itself generates after corpus prompts (made once, kept in OUT/selfdistill.npy).
Validation (--eval-every and at the end): loss and top-1 agreement on held-out batches, and
val_accept_len, the mean tokens per target forward of greedy speculative generation of 48 tokens
after --eval-prompts held-out 64-token prompts. Settings merge as for `lm` (flags, --config,
defaults); a run resumes from the latest checkpoint in --out. At the end the head is saved with
kvjax.speculative.save_head to --export (default OUT/head). Exit codes: 0 ok, 1 bad
data/target/run, 2 bad flags."""


def add_eagle(sub) -> argparse.ArgumentParser:
  """The `eagle` subcommand; every default is None so --config and EAGLE_DEFAULTS fill in."""
  p = sub.add_parser(
    "eagle",
    help="train an EAGLE draft head for a frozen target model",
    description=EAGLE_DESCRIPTION,
    argument_default=None,
  )
  p.add_argument("--config", metavar="FILE", help="JSON object of settings (flags win)")
  p.add_argument(
    "--target",
    metavar="DIR_OR_NAME",
    help="the frozen target: a model directory or bundled name (e.g. shakespeare)",
  )
  _add_head_flags(p)
  _add_data_flags(p)
  _add_optimisation_flags(p)
  _add_run_flags(p)
  p.set_defaults(run=run_eagle, check=lambda args: check_eagle(p, args))
  return p


def _add_head_flags(p: argparse.ArgumentParser) -> None:
  """The head's kind, draft vocabulary, architecture and export format."""
  from kvjax.speculative.head import KINDS

  p.add_argument("--kind", choices=KINDS, help="head kind (default eagle1)")
  p.add_argument(
    "--draft-vocab",
    type=nonneg,
    metavar="N",
    help="eagle3: a reduced draft vocabulary of the N most frequent target tokens "
    "of the first 64 training batches, with its own LM head (0 = the target's LM "
    "head over the whole vocabulary, the default)",
  )
  p.add_argument(
    "--published",
    action="store_true",
    default=None,
    help="train the reference (SafeAILab EAGLE) architecture of --kind, which "
    "--export-format eagle1/eagle3 writes for vLLM and SGLang (default: kvjax's own)",
  )
  p.add_argument(
    "--export-format",
    choices=("kvjax", "eagle1", "eagle3"),
    help="the saved head's format: kvjax (head.json + params/, the default) or a "
    "published layout (config.json + model.safetensors; needs --published and the "
    "format of --kind)",
  )


def _add_data_flags(p: argparse.ArgumentParser) -> None:
  """The shared data flags (the target's tokenizer), and self-distillation."""
  g = add_data_flags(p, "target")
  g.add_argument(
    "--self-distill",
    type=nonneg,
    metavar="N",
    help="train on N sequences the target generates after corpus prompts instead "
    "(0 = off, the default)",
  )
  g.add_argument(
    "--distill-temperature",
    type=nonneg_float,
    metavar="TEMP",
    help="--self-distill: sampling temperature (0 = greedy; default 1)",
  )


def _add_optimisation_flags(p: argparse.ArgumentParser) -> None:
  """Batches, the schedule, and the eagle3 / eagle1 training options."""
  g = p.add_argument_group("optimisation")
  g.add_argument("--batch-size", type=positive, metavar="B")
  g.add_argument("--seq-len", type=checked(int, lambda v: v >= 3, "an integer >= 3"), metavar="T")
  add_schedule_flags(g, warmup=100)
  g.add_argument(
    "--ttt-steps",
    type=positive,
    metavar="K",
    help="eagle3: unrolled training-time-test steps (default 7; clipped to --seq-len - 1)",
  )
  g.add_argument(
    "--feature-noise",
    type=nonneg_float,
    metavar="A",
    help="uniform noise U(-A, A) on the input features (default 0.1 for eagle1, 0 for eagle3)",
  )


def _add_run_flags(p: argparse.ArgumentParser) -> None:
  """Where the run goes, how often it saves, evaluates and logs, and validation's draft tree."""
  g = p.add_argument_group("run")
  g.add_argument("--out", metavar="DIR", help="run directory (checkpoints, metrics, head)")
  add_period_flags(g)
  g.add_argument(
    "--eval-prompts",
    type=nonneg,
    metavar="N",
    help="held-out prompts for val_accept_len (default 4; 0 = off)",
  )
  g.add_argument(
    "--tree-top-k", type=positive, metavar="K", help="validation draft tree (default 8)"
  )
  g.add_argument("--tree-depth", type=positive, metavar="D", help="default 5")
  g.add_argument("--tree-tokens", type=positive, metavar="N", help="default 32")
  g.add_argument("--log-every", type=nonneg, metavar="N", help="metrics period (default 10)")
  g.add_argument("--export", metavar="DIR", help="head directory (default OUT/head)")
  add_output_flags(g)


def check_eagle(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Merges --config and the defaults into args; cross-flag rules (errors exit 2)."""
  from kvjax.speculative.head import KINDS
  from kvjax.speculative.tree import TreeSpec

  settle(parser, args, EAGLE_DEFAULTS)
  if args.kind not in KINDS:
    parser.error(f"--kind must be one of {', '.join(KINDS)}; got {args.kind!r}")
  if args.draft_vocab and args.kind != "eagle3":
    parser.error("--draft-vocab applies to --kind eagle3")
  if args.export_format not in ("kvjax", "eagle1", "eagle3"):
    parser.error(f"--export-format must be kvjax, eagle1 or eagle3; got {args.export_format!r}")
  if args.export_format != "kvjax" and not args.published:
    parser.error(
      f"--export-format {args.export_format} needs --published (kvjax's own "
      f"{args.kind} architecture has no published layout)"
    )
  if args.export_format != "kvjax" and args.export_format != args.kind:
    parser.error(
      f"--export-format {args.export_format} writes {args.export_format} heads; "
      f"--kind is {args.kind}"
    )
  check_frozen(parser, args, "target", "the model the head drafts for")
  check_run_flags(parser, args, "checkpoints, metrics and the head")
  try:
    TreeSpec(top_k=args.tree_top_k, depth=args.tree_depth, total_tokens=args.tree_tokens)
  except ValueError as err:
    parser.error(f"--tree-top-k/--tree-depth/--tree-tokens: {err}")


def _eagle_config(args):
  from kvjax.train.eagle import EagleConfig

  return EagleConfig(
    kind=args.kind,
    steps=args.steps,
    batch_size=args.batch_size,
    seq_len=args.seq_len,
    lr=args.lr,
    warmup=args.warmup,
    final_lr_ratio=args.final_lr_ratio,
    weight_decay=args.weight_decay,
    clip_norm=args.clip_norm,
    seed=args.seed,
    ttt_steps=args.ttt_steps,
    feature_noise=args.feature_noise,
    self_distill=args.self_distill,
    distill_temperature=args.distill_temperature,
    out_dir=args.out,
    save_every=args.save_every,
    keep=args.keep,
    eval_every=args.eval_every,
    log_every=args.log_every,
    eval_batches=args.eval_batches,
    eval_prompts=args.eval_prompts,
    tree_top_k=args.tree_top_k,
    tree_depth=args.tree_depth,
    tree_tokens=args.tree_tokens,
  )


def _eagle_data(args, model, ec):
  """(train batches, eval batches, validation prompts) for `run_eagle`."""
  from kvjax.train import eagle_data
  from kvjax.train.lm import TrainError

  tok = model.tokenizer
  if tok is None:
    raise TrainError(f"--target {args.target} has no tokenizer.json")
  if args.text is not None:
    td = text_data(args, tok)
    batches = td.train_batches
    eval_batches = td.eval_batches if args.eval_fraction > 0 else None
    train_stream, held_stream = eagle_data.text_streams(td)
  else:
    from kvjax.train import data

    batches, eval_batches = data_batches(args, tok)
    streams = {}

    def stream(split):
      if split not in streams:
        s = data.split_stream(
          args.data, split, tok, genres=args.genre, exclude_genres=args.exclude_genre
        )
        streams[split] = (s.tokens, s.doc)
      return streams[split]

    held_stream = stream(args.eval_split) if ec.eval_prompts else None
    train_stream = stream("train") if ec.self_distill else None
  prompts = []
  if ec.eval_prompts and held_stream is not None and len(held_stream[0]):
    prompts = eagle_data.prompts_from_stream(*held_stream, ec.eval_prompts, ec.prompt_len)
  if ec.self_distill:
    import numpy as np

    length = min(args.seq_len + 1, model.cfg.max_position)
    starts = eagle_data.prompts_from_stream(
      *train_stream, ec.self_distill, min(32, length // 4), rng=np.random.default_rng(args.seed)
    )
    seqs = eagle_data.self_distill(
      model,
      starts,
      length,
      temperature=args.distill_temperature,
      seed=args.seed,
      path=os.path.join(args.out, eagle_data.DISTILL_FILE),
      progress=not args.no_progress,
    )
    if length < args.seq_len + 1:
      seqs = np.pad(seqs, ((0, 0), (0, args.seq_len + 1 - length)), constant_values=-1)
    batches = eagle_data.SequenceData(
      seqs, batch_size=args.batch_size, seed=args.seed
    ).train_batches
  return batches, eval_batches, prompts


def run_eagle(args: argparse.Namespace) -> int:
  """Trains the head, saves it, prints a summary; returns 0."""
  import jax

  from kvjax.lm.model import load
  from kvjax.speculative import formats
  from kvjax.speculative import head as heads
  from kvjax.train.eagle import train

  t0 = time.perf_counter()
  ec = _eagle_config(args)
  model = load(args.target)
  os.makedirs(args.out, exist_ok=True)
  batches, eval_batches, prompts = _eagle_data(args, model, ec)
  draft_vocab = ()
  if args.draft_vocab:  # the most frequent targets of the first batches: the same on resume
    first = [b["targets"][b["mask"] > 0] for b in itertools.islice(batches(0), 64)]
    draft_vocab = heads.draft_vocabulary(
      np.concatenate(first), args.draft_vocab, model.cfg.vocab_size
    )
  head = heads.init(
    model, ec.kind, seed=args.seed, draft_vocab=draft_vocab, published=bool(args.published)
  )
  result = train(model, head, ec, batches, eval_batches, prompts, progress=not args.no_progress)
  export = args.export or os.path.join(args.out, "head")
  if args.export_format == "kvjax":
    formats.save(result.head, export)
  else:
    formats.export(result.head, export, format=args.export_format)
  last = result.records[-1] if result.records else {}
  keys = ("loss", "feature_loss", "ce", "top1", "eval_loss", "eval_top1", "val_accept_len")
  summary = {
    "out": args.out,
    "export": export,
    "kind": ec.kind,
    "target": args.target,
    "steps": ec.steps,
    "resumed_from": result.resumed_from,
    "n_params": sum(a.size for a in jax.tree.leaves(result.head.params())),
    **{k: last.get(k) for k in keys},
    "wall_s": time.perf_counter() - t0,
  }
  if args.json:
    print(json.dumps(summary))
  else:
    got = ", ".join(f"{k} {last[k]:.4f}" for k in keys if last.get(k) is not None)
    print(
      f"trained a {ec.kind} head ({summary['n_params']:,} params) for {ec.steps} steps "
      f"({got}; {summary['wall_s']:.1f} s); head saved to {export}",
      file=sys.stderr,
    )
  return 0
