"""`kvjax bench`: decode and prefill speed of a model on this device against its bandwidth
bound (`kvjax.lm.bench`)."""

from __future__ import annotations

import argparse
import json
import sys

from kvjax.lm.cli.flags import (
  add_dtype_flag,
  add_model_flag,
  add_value_flags,
  dest,
  ints_type,
  load_model,
  positive,
)

NAME = "bench"
HELP = "decode and prefill speed on this device against its bandwidth bound"
DESCRIPTION = (
  "Times greedy decode steps (batch x context grid, every row running every "
  "step) and prefill (one prompt) of a model on this device, compilation excluded, and "
  "reports each decode cell against its memory-bandwidth bound: the bytes a step reads "
  "(weights + K/V at the mean context) over the bandwidth of a large array copy measured "
  "in the same run. Prompts are random token ids."
)
# (flag, type, default, metavar, help): each sets the `kvjax.lm.bench.Grid` field of its name
GRID_FLAGS = (
  ("--batches", ints_type, (1, 8), "B,B", "decode batch sizes (default 1,8)"),
  ("--contexts", ints_type, (256, 1024), "C,C", "decode context lengths (default 256,1024)"),
  ("--prefill", ints_type, (256, 1024), "P,P", "prefill prompt lengths (default 256,1024)"),
  ("--new-tokens", positive, 32, "N", "decode steps timed per cell (default 32)"),
  ("--repeats", positive, 3, "R", "timed rounds (medians; default 3)"),
)


def add_flags(p: argparse.ArgumentParser) -> None:
  add_model_flag(p)
  add_dtype_flag(p, "cast the params (default: as stored; float32 for the bundled models)")
  add_value_flags(p, GRID_FLAGS)
  p.add_argument("--json", action="store_true", help="print the report as JSON")
  p.set_defaults(run=_bench, check=lambda args: None)


def _bench(args: argparse.Namespace) -> int:
  from kvjax.lm import bench

  model = load_model(args)
  grid = bench.Grid(**{dest(flag): getattr(args, dest(flag)) for flag, *_ in GRID_FLAGS})
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
