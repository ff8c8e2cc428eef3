"""`python -m kvjax.train eval`: a model's loss and bits per character on a corpus split."""

from __future__ import annotations

import argparse
import json
import time

from kvjax.lm.cli.flags import positive
from kvjax.train.cli import common

HELP = "a model's loss and bits per character on a corpus split"
DESCRIPTION = (
  "Scores every token of a corpus split once, in windows of --seq-len tokens (no context "
  "carried between windows), and reports nats per token and bits per character "
  "(tokenizer-independent)."
)
SPLITS = ("train", "validation", "test")
FLAGS: tuple[common.Flag, ...] = (
  ("--genre", common.REPEATED, "G", "only these genres (repeatable)"),
  ("--exclude-genre", common.REPEATED, "G", "all genres but these (repeatable)"),
  ("--batch-size", positive, "B", None),
  ("--seq-len", positive, "T", "window length in tokens (default 256)"),
)


def add_eval(sub) -> argparse.ArgumentParser:
  """The `eval` subcommand: a model's loss and bits per character on a corpus split."""
  p = common.add_task(sub, "eval", HELP, DESCRIPTION, run_eval, config=False)
  p.add_argument(
    "--model",
    required=True,
    metavar="DIR_OR_NAME",
    help="model directory or bundled model name (e.g. shakespeare)",
  )
  p.add_argument(
    "--adapter", metavar="DIR", help="a PEFT LoRA adapter merged into --model's weights"
  )
  p.add_argument(
    "--data",
    required=True,
    metavar="DIR_OR_NAME",
    help="'shakespeare' (the bundled plays) or a directory of .txt/.md files",
  )
  p.add_argument("--split", choices=SPLITS, help="corpus split (default validation)")
  common.add_flags(p, FLAGS)
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.set_defaults(split="validation", batch_size=16, seq_len=256)
  return p


def run_eval(args: argparse.Namespace) -> int:
  """Loads the model, scores the split, prints the figures; returns 0."""
  from kvjax.lm.model import load
  from kvjax.train import data
  from kvjax.train.lm import TrainError, evaluate_model

  model = load(args.model, adapter=args.adapter)
  if model.tokenizer is None:
    raise TrainError(f"--model {args.model} has no tokenizer.json")
  if model.cfg.max_position < args.seq_len:
    raise TrainError(
      f"--seq-len {args.seq_len} exceeds the model's max_position {model.cfg.max_position}"
    )
  t0 = time.perf_counter()
  batches = data.eval_batches(
    args.data,
    args.split,
    model.tokenizer,
    batch_size=args.batch_size,
    seq_len=args.seq_len,
    genres=args.genre,
    exclude_genres=args.exclude_genre,
  )
  got = evaluate_model(model, batches)
  out = {
    "model": args.model,
    "adapter": args.adapter,
    "data": args.data,
    "split": args.split,
    "genre": args.genre,
    "exclude_genre": args.exclude_genre,
    "seq_len": args.seq_len,
    "loss": got["eval_loss"],
    "bpc": got["eval_bpc"],
    "tokens": got["eval_tokens"],
    "wall_s": time.perf_counter() - t0,
  }
  if args.json:
    print(json.dumps(out))
  else:
    print(
      f"{args.model}{' + ' + args.adapter if args.adapter else ''} on {args.data} "
      f"{args.split}: {out['loss']:.4f} nats/token, "
      f"{out['bpc']:.4f} bits/char over {out['tokens']:,} tokens"
    )
  return 0
