"""`python -m kvjax.train coprocessor`: train a cache coprocessor for a frozen base."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from kvjax.lm.cli.flags import checked, nonneg, positive
from kvjax.train.cli.common import (
  add_data_flags,
  add_output_flags,
  add_period_flags,
  add_schedule_flags,
  check_frozen,
  check_run_flags,
  data_batches,
  settle,
)

COP_DEFAULTS = dict(
  kind="coprocessor",
  init="copy",
  lora_rank=16,
  latent_offset=-33,
  ahead=16,
  points=16,
  delay=0,
  batch_size=8,
  seq_len=256,
  steps=1000,
  lr=1e-3,
  warmup=50,
  weight_decay=0.0,
  clip_norm=1.0,
  final_lr_ratio=0.1,
  seed=0,
  save_every=0,
  keep=3,
  eval_every=0,
  log_every=10,
  eval_batches=8,
  eval_fraction=0.1,
  eval_split="validation",
  no_progress=False,
  json=False,
)


COP_DESCRIPTION = """\
Trains a cache coprocessor (kvjax.coprocessor) for a frozen base model: at --points random
augmentation points per sequence the coprocessor reads the base's cache of the prefix with
--latents soft tokens and writes that many latents into it; the loss is the base's nll of the
--ahead tokens after each point, every point of a sequence in one pass with a block-sparse
mask. Only the coprocessor and the soft tokens train. --kind pause trains the pause-token
baseline (the soft tokens inserted directly, no coprocessor). Validation (--eval-every and at
the end): held-out ahead loss with and without augmentation and the relative perplexity
reduction at the first ahead position. Settings merge as for `lm` (flags, --config,
defaults); a run resumes from the latest checkpoint in --out. At the end the coprocessor is
saved with kvjax.coprocessor.save to --export (default OUT/coprocessor). Exit codes: 0 ok, 1
bad data/base/run, 2 bad flags."""


def add_coprocessor(sub) -> argparse.ArgumentParser:
  """The `coprocessor` subcommand; every default is None so --config and COP_DEFAULTS fill in."""
  from kvjax.coprocessor.model import INITS, KINDS

  p = sub.add_parser(
    "coprocessor",
    help="train a cache coprocessor for a frozen base model",
    description=COP_DESCRIPTION,
    argument_default=None,
  )
  p.add_argument("--config", metavar="FILE", help="JSON object of settings (flags win)")
  p.add_argument(
    "--base",
    metavar="DIR_OR_NAME",
    help="the frozen base: a model directory or bundled name (e.g. shakespeare)",
  )
  p.add_argument("--latents", type=positive, metavar="N", help="latents per augmentation")
  p.add_argument("--kind", choices=KINDS, help="coprocessor (default) or the pause-token baseline")
  p.add_argument(
    "--init",
    choices=INITS,
    help="coprocessor start: a copy of the base trained "
    "in full (default), from scratch, or LoRA deltas on the frozen copy",
  )
  p.add_argument("--lora-rank", type=positive, metavar="R", help="--init lora: rank (default 16)")
  p.add_argument(
    "--latent-offset",
    type=checked(int, lambda v: v <= -1, "an integer <= -1"),
    metavar="O",
    help="the base sees the latents at the next token's position + O "
    "(default -33: 32 behind the prefix's last token)",
  )
  add_data_flags(p, "base")
  g = p.add_argument_group("optimisation")
  g.add_argument(
    "--ahead",
    type=positive,
    metavar="A",
    help="teacher-forced tokens scored after each point (default 16)",
  )
  g.add_argument(
    "--points",
    type=positive,
    metavar="M",
    help="augmentation points per sequence, all in one pass (default 16)",
  )
  g.add_argument(
    "--delay",
    type=nonneg,
    metavar="K",
    help="insert the latents K tokens after their point (default 0)",
  )
  g.add_argument("--batch-size", type=positive, metavar="B")
  g.add_argument("--seq-len", type=checked(int, lambda v: v >= 2, "an integer >= 2"), metavar="T")
  add_schedule_flags(g, warmup=50)
  g = p.add_argument_group("run")
  g.add_argument("--out", metavar="DIR", help="run directory (checkpoints, metrics, coprocessor)")
  add_period_flags(g)
  g.add_argument("--log-every", type=nonneg, metavar="N", help="metrics period (default 10)")
  g.add_argument("--export", metavar="DIR", help="coprocessor directory (default OUT/coprocessor)")
  add_output_flags(g)
  p.set_defaults(run=run_coprocessor, check=lambda args: check_coprocessor(p, args))
  return p


def check_coprocessor(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Merges --config and the defaults into args; cross-flag rules (errors exit 2)."""
  settle(parser, args, COP_DEFAULTS)
  check_frozen(parser, args, "base", "the frozen model the coprocessor serves")
  if args.latents is None:
    parser.error("--latents N is required (latents per augmentation, e.g. 16)")
  check_run_flags(parser, args, "checkpoints, metrics and the coprocessor")
  from kvjax.coprocessor.traces import room_error

  error = room_error(args.seq_len, args.ahead, args.points, args.delay, flags=True)
  if error:
    parser.error(error)
  if args.kind == "pause" and (args.init != "copy" or args.lora_rank != 16):
    parser.error("--init and --lora-rank apply to --kind coprocessor, not to pause tokens")


def _cop_config(args):
  from kvjax.train.coprocessor import AugmentConfig

  return AugmentConfig(
    steps=args.steps,
    batch_size=args.batch_size,
    seq_len=args.seq_len,
    lr=args.lr,
    warmup=args.warmup,
    final_lr_ratio=args.final_lr_ratio,
    weight_decay=args.weight_decay,
    clip_norm=args.clip_norm,
    seed=args.seed,
    ahead=args.ahead,
    points=args.points,
    delay=args.delay,
    out_dir=args.out,
    save_every=args.save_every,
    keep=args.keep,
    eval_every=args.eval_every,
    log_every=args.log_every,
    eval_batches=args.eval_batches,
  )


def run_coprocessor(args: argparse.Namespace) -> int:
  """Trains the coprocessor, saves it, prints a summary; returns 0."""
  from kvjax import coprocessor
  from kvjax.lm.model import load
  from kvjax.train.coprocessor import train
  from kvjax.train.lm import TrainError

  t0 = time.perf_counter()
  ac = _cop_config(args)
  base = load(args.base)
  if base.tokenizer is None:
    raise TrainError(f"--base {args.base} has no tokenizer.json")
  os.makedirs(args.out, exist_ok=True)
  batches, eval_batches = data_batches(args, base.tokenizer)
  cop = coprocessor.init(
    base,
    args.latents,
    kind=args.kind,
    init=args.init,
    lora_rank=args.lora_rank,
    latent_offset=args.latent_offset,
    seed=args.seed,
  )
  result = train(base, cop, ac, batches, eval_batches, progress=not args.no_progress)
  export = args.export or os.path.join(args.out, "coprocessor")
  coprocessor.save(result.coprocessor, export)
  last = result.records[-1] if result.records else {}
  keys = ("loss", "base_loss", "eval_loss", "eval_base_loss", "eval_reduction_1", "eval_reduction")
  import jax

  summary = {
    "out": args.out,
    "export": export,
    "kind": args.kind,
    "init": cop.cc.init,
    "latents": args.latents,
    "base": args.base,
    "steps": ac.steps,
    "resumed_from": result.resumed_from,
    "n_params": sum(a.size for a in jax.tree.leaves(result.coprocessor.params)),
    **{k: last.get(k) for k in keys},
    "wall_s": time.perf_counter() - t0,
  }
  if args.json:
    print(json.dumps(summary))
  else:
    got = ", ".join(f"{k} {last[k]:.4f}" for k in keys if last.get(k) is not None)
    print(
      f"trained a {args.latents}-latent {args.kind} ({summary['n_params']:,} params) for "
      f"{ac.steps} steps ({got}; {summary['wall_s']:.1f} s); saved to {export}",
      file=sys.stderr,
    )
  return 0
