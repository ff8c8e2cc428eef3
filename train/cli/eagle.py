"""`python -m kvjax.train eagle`: train an EAGLE draft head for a frozen target."""

from __future__ import annotations

import argparse
import itertools
import os
import time

import numpy as np

from kvjax.lm.cli.flags import checked, nonneg, positive
from kvjax.train.cli import common
from kvjax.train.eagle import DISTILL_PROMPTS

# The eagle task's own defaults (the others: common's, then EagleConfig's field defaults).
EAGLE_DEFAULTS = dict(draft_vocab=0, published=False, export_format="kvjax")
EXPORT_FORMATS = ("kvjax", "eagle1", "eagle3")
HEAD_FLAGS: tuple[common.Flag, ...] = (
  (
    "--draft-vocab",
    nonneg,
    "N",
    "eagle3: a reduced draft vocabulary of the N most frequent target tokens "
    "of the first 64 training batches, with its own LM head (0 = the target's LM "
    "head over the whole vocabulary, the default)",
  ),
  (
    "--published",
    common.SWITCH,
    None,
    "train the reference (SafeAILab EAGLE) architecture of --kind, which "
    "--export-format eagle1/eagle3 writes for vLLM and SGLang (default: kvjax's own)",
  ),
)
DISTILL_FLAGS: tuple[common.Flag, ...] = (
  (
    "--self-distill",
    nonneg,
    "N",
    "train on N sequences the target generates after corpus prompts instead (0 = off, the default)",
  ),
  (
    "--distill-temperature",
    common.nonneg_float,
    "TEMP",
    "--self-distill: sampling temperature (0 = greedy; default 1)",
  ),
  (
    "--distill-prompts",
    checked(str, lambda v: v in DISTILL_PROMPTS, " or ".join(DISTILL_PROMPTS)),
    "SOURCE",
    "--self-distill: prompts cut from the corpus (default), or 'instructions': kvjax's "
    "instruction set (kvjax.train.instructions) as user turns in the target's chat template",
  ),
  (
    "--cache-features",
    common.SWITCH,
    None,
    "--self-distill: run the target once over the sequences, keep its features and top-32 "
    "next-token labels in OUT/features (bfloat16, memory-mapped, resumable) and train from "
    "them, with no target forward per step",
  ),
)
TRAINING_FLAGS: tuple[common.Flag, ...] = (
  (
    "--ttt-steps",
    positive,
    "K",
    "eagle3: unrolled training-time-test steps (default 7; clipped to --seq-len - 1)",
  ),
  (
    "--feature-noise",
    common.nonneg_float,
    "A",
    "uniform noise U(-A, A) on the input features (default 0.1 for eagle1, 0 for eagle3)",
  ),
)
VALIDATION_FLAGS: tuple[common.Flag, ...] = (
  ("--eval-prompts", nonneg, "N", "held-out prompts for val_accept_len (default 4; 0 = off)"),
  ("--tree-top-k", positive, "K", "validation draft tree (default 8)"),
  ("--tree-depth", positive, "D", "default 5"),
  ("--tree-tokens", positive, "N", "default 32"),
)


EAGLE_HELP = "train an EAGLE draft head for a frozen target model"
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
  """The `eagle` subcommand; every default is None so --config and the defaults fill in
  (`check_eagle`)."""
  from kvjax.speculative.head import KINDS

  p = common.add_task(sub, "eagle", EAGLE_HELP, EAGLE_DESCRIPTION, run_eagle, check_eagle)
  common.add_flags(p, (common.frozen_flag("target"),))
  p.add_argument("--kind", choices=KINDS, help="head kind (default eagle1)")
  common.add_flags(p, HEAD_FLAGS)
  p.add_argument(
    "--export-format",
    choices=EXPORT_FORMATS,
    help="the saved head's format: kvjax (head.json + params/, the default) or a "
    "published layout (config.json + model.safetensors; needs --published and the "
    "format of --kind)",
  )
  common.add_flags(common.add_data_flags(p, "target"), DISTILL_FLAGS)
  common.add_flags(
    p.add_argument_group("optimisation"),
    (
      *common.batch_flags(3),
      *common.schedule_flags(common.SCHEDULE_DEFAULTS["warmup"]),
      *TRAINING_FLAGS,
    ),
  )
  common.add_flags(p.add_argument_group("run"), common.run_flags("head", VALIDATION_FLAGS))
  return p


def check_eagle(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Merges --config and the defaults into args; cross-flag rules (errors exit 2)."""
  from kvjax.speculative.head import KINDS
  from kvjax.speculative.tree import TreeSpec
  from kvjax.train.eagle import EagleConfig

  common.settle(parser, args, EAGLE_DEFAULTS, EagleConfig)
  if args.kind not in KINDS:
    parser.error(f"--kind must be one of {', '.join(KINDS)}; got {args.kind!r}")
  if args.cache_features and not args.self_distill:
    parser.error("--cache-features needs --self-distill N (fixed sequences to compute once)")
  if args.draft_vocab and args.kind != "eagle3":
    parser.error("--draft-vocab applies to --kind eagle3")
  if args.export_format not in EXPORT_FORMATS:
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
  common.check_frozen(parser, args, "target", "the model the head drafts for")
  common.check_run_flags(parser, args, "checkpoints, metrics and the head")
  try:
    TreeSpec(top_k=args.tree_top_k, depth=args.tree_depth, total_tokens=args.tree_tokens)
  except ValueError as err:
    parser.error(f"--tree-top-k/--tree-depth/--tree-tokens: {err}")


def _eagle_data(args, model, ec):
  """(train batches, eval batches, validation prompts, the self-distilled SequenceData or
  None) for `run_eagle`."""
  from kvjax.train import eagle_data
  from kvjax.train.lm import TrainError

  tok = model.tokenizer
  if tok is None:
    raise TrainError(f"--target {args.target} has no tokenizer.json")
  if args.text is not None:
    td = common.text_data(args, tok)
    batches = td.train_batches
    eval_batches = td.eval_batches if args.eval_fraction > 0 else None
    train_stream, held_stream = eagle_data.text_streams(td)
  else:
    from kvjax.train import data

    batches, eval_batches = common.data_batches(args, tok)
    streams = {}

    def stream(split):
      if split not in streams:
        s = data.split_stream(
          args.data, split, tok, genres=args.genre, exclude_genres=args.exclude_genre
        )
        streams[split] = (s.tokens, s.doc)
      return streams[split]

    held_stream = stream(args.eval_split) if ec.eval_prompts else None
    corpus_prompts = ec.self_distill and ec.distill_prompts == "corpus"
    train_stream = stream("train") if corpus_prompts else None
  prompts, sequences = [], None
  if ec.eval_prompts and held_stream is not None and len(held_stream[0]):
    prompts = eagle_data.prompts_from_stream(*held_stream, ec.eval_prompts, ec.prompt_len)
  if ec.self_distill:
    length = min(args.seq_len + 1, model.cfg.max_position)
    if ec.distill_prompts == "instructions":
      starts = eagle_data.chat_prompts(model, ec.self_distill, seed=args.seed)
    else:
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
    sequences = eagle_data.SequenceData(seqs, batch_size=args.batch_size, seed=args.seed)
    batches = sequences.train_batches
  return batches, eval_batches, prompts, sequences


def run_eagle(args: argparse.Namespace) -> int:
  """Trains the head, saves it, prints a summary; returns 0."""
  import jax

  from kvjax.lm.model import load
  from kvjax.speculative import formats
  from kvjax.speculative import head as heads
  from kvjax.train import eagle_features
  from kvjax.train.eagle import EagleConfig, train

  t0 = time.perf_counter()
  ec = common.run_config(EagleConfig, args)
  model = load(args.target)
  os.makedirs(args.out, exist_ok=True)
  batches, eval_batches, prompts, sequences = _eagle_data(args, model, ec)
  draft_vocab = ()
  if args.draft_vocab:  # the most frequent targets of the first batches: the same on resume
    first = [b["targets"][b["mask"] > 0] for b in itertools.islice(batches(0), 64)]
    draft_vocab = heads.draft_vocabulary(
      np.concatenate(first), args.draft_vocab, model.cfg.vocab_size
    )
  head = heads.init(
    model, ec.kind, seed=args.seed, draft_vocab=draft_vocab, published=bool(args.published)
  )
  if ec.cache_features:
    store = eagle_features.compute(
      model,
      head,
      sequences.seqs,
      os.path.join(args.out, "features"),
      batch_size=args.batch_size,
      progress=not args.no_progress,
    )
    batches = eagle_features.FeatureData(sequences, store).train_batches
  result = train(model, head, ec, batches, eval_batches, prompts, progress=not args.no_progress)
  export = args.export or os.path.join(args.out, "head")
  if args.export_format == "kvjax":
    formats.save(result.head, export)
  else:
    formats.export(result.head, export, format=args.export_format)
  keys = ("loss", "feature_loss", "ce", "top1", "eval_loss", "eval_top1", "val_accept_len")
  n_params = sum(a.size for a in jax.tree.leaves(result.head.params()))
  summary = common.run_summary(
    args, t0, result, export, n_params, keys, kind=ec.kind, target=args.target
  )
  return common.finish(
    args,
    summary,
    f"trained a {ec.kind} head ({n_params:,} params) for {ec.steps} steps "
    f"({common.metrics_text(summary, keys)}; {summary['wall_s']:.1f} s); head saved to {export}",
  )
