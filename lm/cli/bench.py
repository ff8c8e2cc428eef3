"""`kvjax bench`: decode and prefill speed of a model on this device against its bandwidth
bound (`kvjax.lm.bench`)."""

from __future__ import annotations

import argparse
import json
import sys

from kvjax.lm.cli.flags import DTYPES, add_model_flag, ints_type, load_model, positive


def add(subparsers) -> None:
  p = subparsers.add_parser(
    "bench",
    help="decode and prefill speed on this device against its bandwidth bound",
    description="Times greedy decode steps (batch x context grid, every row running every "
    "step) and prefill (one prompt) of a model on this device, compilation excluded, and "
    "reports each decode cell against its memory-bandwidth bound: the bytes a step reads "
    "(weights + K/V at the mean context) over the bandwidth of a large array copy measured "
    "in the same run. Prompts are random token ids.",
  )
  add_model_flag(p)
  p.add_argument(
    "--dtype",
    choices=DTYPES,
    help="cast the params (default: as stored; float32 for the bundled models)",
  )
  p.add_argument(
    "--batches",
    type=ints_type,
    default=(1, 8),
    metavar="B,B",
    help="decode batch sizes (default 1,8)",
  )
  p.add_argument(
    "--contexts",
    type=ints_type,
    default=(256, 1024),
    metavar="C,C",
    help="decode context lengths (default 256,1024)",
  )
  p.add_argument(
    "--prefill",
    type=ints_type,
    default=(256, 1024),
    metavar="P,P",
    help="prefill prompt lengths (default 256,1024)",
  )
  p.add_argument(
    "--new-tokens",
    type=positive,
    default=32,
    metavar="N",
    help="decode steps timed per cell (default 32)",
  )
  p.add_argument(
    "--repeats", type=positive, default=3, metavar="R", help="timed rounds (medians; default 3)"
  )
  p.add_argument("--json", action="store_true", help="print the report as JSON")
  p.set_defaults(run=_bench, check=lambda args: None)


def _bench(args: argparse.Namespace) -> int:
  from kvjax.lm import bench

  model = load_model(args)
  grid = bench.Grid(
    batches=args.batches,
    contexts=args.contexts,
    prefill=args.prefill,
    new_tokens=args.new_tokens,
    repeats=args.repeats,
  )
  grid.check(model)
  progress = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
  report = bench.run(model, grid, progress=progress)
  report["model"] = dict(name=args.model, dtype=str(model.dtype), n_params=model.cfg.n_params)
  if args.json:
    print(json.dumps(report))
  else:
    m = report["machine"]
    print(
      f"{args.model} ({model.cfg.n_params / 1e6:.1f}M params, {model.dtype}) on "
      f"{m['device_kind']} ({m['backend']}), jax {m['jax']}"
    )
    print(bench.markdown(report), end="")
  return 0
