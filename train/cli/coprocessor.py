"""`python -m kvjax.train coprocessor`: train a cache coprocessor for a frozen base."""

from __future__ import annotations

import argparse
import os
import time

from kvjax.lm.cli.flags import checked, nonneg, positive
from kvjax.train.cli import common

# The coprocessor task's own defaults (the others: common's, then AugmentConfig's and
# CoprocessorConfig's field defaults).
COP_DEFAULTS = dict(batch_size=8, warmup=50)
LATENT_FLAGS: tuple[common.Flag, ...] = (
  ("--lora-rank", positive, "R", "--init lora: rank (default 16)"),
  (
    "--latent-offset",
    checked(int, lambda v: v <= -1, "an integer <= -1"),
    "O",
    "the base sees the latents at the next token's position + O "
    "(default -33: 32 behind the prefix's last token)",
  ),
)
AUGMENT_FLAGS: tuple[common.Flag, ...] = (
  ("--ahead", positive, "A", "teacher-forced tokens scored after each point (default 16)"),
  ("--points", positive, "M", "augmentation points per sequence, all in one pass (default 16)"),
  ("--delay", nonneg, "K", "insert the latents K tokens after their point (default 0)"),
)


COP_HELP = "train a cache coprocessor for a frozen base model"
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
  """The `coprocessor` subcommand; every default is None so --config and the defaults fill in
  (`check_coprocessor`)."""
  from kvjax.coprocessor.model import INITS, KINDS

  p = common.add_task(
    sub, "coprocessor", COP_HELP, COP_DESCRIPTION, run_coprocessor, check_coprocessor
  )
  common.add_flags(
    p, (common.frozen_flag("base"), ("--latents", positive, "N", "latents per augmentation"))
  )
  p.add_argument("--kind", choices=KINDS, help="coprocessor (default) or the pause-token baseline")
  p.add_argument(
    "--init",
    choices=INITS,
    help="coprocessor start: a copy of the base trained "
    "in full (default), from scratch, or LoRA deltas on the frozen copy",
  )
  common.add_flags(p, LATENT_FLAGS)
  common.add_data_flags(p, "base")
  common.add_flags(
    p.add_argument_group("optimisation"),
    (*AUGMENT_FLAGS, *common.batch_flags(2), *common.schedule_flags(COP_DEFAULTS["warmup"])),
  )
  common.add_flags(p.add_argument_group("run"), common.run_flags("coprocessor"))
  return p


def check_coprocessor(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Merges --config and the defaults into args; cross-flag rules (errors exit 2)."""
  from kvjax.coprocessor.model import CoprocessorConfig
  from kvjax.train.coprocessor import AugmentConfig

  cop = common.field_defaults(CoprocessorConfig)
  common.settle(parser, args, COP_DEFAULTS, AugmentConfig, CoprocessorConfig)
  common.check_frozen(parser, args, "base", "the frozen model the coprocessor serves")
  if args.latents is None:
    parser.error("--latents N is required (latents per augmentation, e.g. 16)")
  common.check_run_flags(parser, args, "checkpoints, metrics and the coprocessor")
  from kvjax.coprocessor.traces import room_error

  error = room_error(args.seq_len, args.ahead, args.points, args.delay, flags=True)
  if error:
    parser.error(error)
  if args.kind == "pause" and (args.init, args.lora_rank) != (cop["init"], cop["lora_rank"]):
    parser.error("--init and --lora-rank apply to --kind coprocessor, not to pause tokens")


def run_coprocessor(args: argparse.Namespace) -> int:
  """Trains the coprocessor, saves it, prints a summary; returns 0."""
  import jax

  from kvjax import coprocessor
  from kvjax.lm.model import load
  from kvjax.train.coprocessor import AugmentConfig, train
  from kvjax.train.lm import TrainError

  t0 = time.perf_counter()
  ac = common.run_config(AugmentConfig, args)
  base = load(args.base)
  if base.tokenizer is None:
    raise TrainError(f"--base {args.base} has no tokenizer.json")
  os.makedirs(args.out, exist_ok=True)
  batches, eval_batches = common.data_batches(args, base.tokenizer)
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
  keys = ("loss", "base_loss", "eval_loss", "eval_base_loss", "eval_reduction_1", "eval_reduction")
  n_params = sum(a.size for a in jax.tree.leaves(result.coprocessor.params))
  summary = common.run_summary(
    args,
    t0,
    result,
    export,
    n_params,
    keys,
    kind=args.kind,
    init=cop.cc.init,
    latents=args.latents,
    base=args.base,
  )
  return common.finish(
    args,
    summary,
    f"trained a {args.latents}-latent {args.kind} ({n_params:,} params) for {ac.steps} steps "
    f"({common.metrics_text(summary, keys)}; {summary['wall_s']:.1f} s); saved to {export}",
  )
