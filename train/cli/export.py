"""`python -m kvjax.train export` (also `kvjax train export`): a kept checkpoint of a run,
written as what the run writes at its end: an lm run's model as a Hugging Face directory (a
LoRA run's PEFT adapter), an eagle run's head (kvjax's own format, or a published layout with
--format)."""

from __future__ import annotations

import argparse
import os

from kvjax.lm.cli.flags import checked
from kvjax.lm.cli.paths import check_output
from kvjax.train import checkpoints
from kvjax.train.cli import common
from kvjax.train.cli.eagle import EXPORT_FORMATS

HELP = "write a kept checkpoint of an lm or eagle run (a model or a head)"
DESCRIPTION = (
  "Writes checkpoint --step of the run in --run (a step kept in RUN/checkpoints, or 'best': "
  "the best validation checkpoint a --keep-best run kept): an lm run's model as a Hugging Face "
  "directory that kvjax and transformers load (a LoRA run's PEFT adapter); an eagle run's "
  "head, for --target (the model it was trained against), in --format (kvjax's head.json + "
  "params/, or a published layout for a --published head). A run cut short is exported as it stood."
)


def add_export(sub) -> argparse.ArgumentParser:
  """`export`: a kept checkpoint of an lm run (a model) or an eagle run (a head)."""
  p = common.add_task(sub, "export", HELP, DESCRIPTION, run_export, check_export, config=False)
  p.add_argument(
    "--run", required=True, dest="run_dir", metavar="DIR", help="the run's --out directory"
  )
  p.add_argument(
    "--step", required=True, type=step_type, metavar="{N,best}", help="a kept step, or best"
  )
  p.add_argument(
    "--target", metavar="DIR_OR_NAME", help="eagle runs: the model the head was trained against"
  )
  p.add_argument(
    "--format",
    choices=EXPORT_FORMATS,
    default=None,
    help="eagle runs: kvjax (the default) or the head's published layout (eagle1, eagle3)",
  )
  p.add_argument(
    "--out", metavar="DIR", help="where to write it (default RUN/model-STEP or RUN/head-STEP)"
  )
  p.add_argument("--json", action="store_true", help="print a JSON summary")
  return p


def step_type(text: str):
  if text == "best":
    return text
  return checked(int, lambda v: v >= 1, "a step >= 1 or 'best'")(text)


def run_kind(run_dir: str) -> str:
  """'eagle' for an EAGLE head's run (run.json's model has an eagle kind), else 'lm' (whose
  export says what is missing when it is no run at all)."""
  try:
    model = (checkpoints.read_run(run_dir) or {}).get("model", {})
  except (OSError, ValueError, AttributeError):
    return "lm"
  return "eagle" if isinstance(model, dict) and model.get("kind") in ("eagle1", "eagle3") else "lm"


def check_export(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """--run is a directory, --out can be written, and --target / --format go with eagle runs
  (--target is needed there)."""
  if not os.path.isdir(args.run_dir):
    why = "not a directory" if os.path.exists(args.run_dir) else "no such directory"
    parser.error(f"--run {args.run_dir}: {why}")
  check_output(parser, "--out", args.out, directory=True)
  args.kind = run_kind(args.run_dir)
  if args.kind == "eagle" and not args.target:
    parser.error(f"--run {args.run_dir} trained an EAGLE head: --target names its model")
  if args.kind == "lm" and (args.target or args.format):
    given = ", ".join(f for f, v in (("--target", args.target), ("--format", args.format)) if v)
    parser.error(f"{given} only apply to an eagle run; --run {args.run_dir} is not one")


def run_export(args: argparse.Namespace) -> int:
  if args.kind == "eagle":
    return _export_head(args)
  from kvjax.lm.lora import Adapter
  from kvjax.train.lm import export

  lora = bool(((checkpoints.read_run(args.run_dir) or {}).get("train") or {}).get("lora_rank"))
  out = args.out or os.path.join(args.run_dir, f"{'adapter' if lora else 'model'}-{args.step}")
  got = export(args.run_dir, args.step, out)
  if isinstance(got, Adapter):
    n_params = got.n_params
    what = f"the rank-{got.config.r} LoRA adapter ({n_params:,} params)"
  else:
    n_params = got.cfg.n_params
    what = f"the model ({n_params:,} params)"
  summary = {"run": args.run_dir, "step": args.step, "out": out, "n_params": n_params}
  return common.finish(
    args, summary, f"wrote {what} of step {args.step} of {args.run_dir} to {out}"
  )


def _export_head(args: argparse.Namespace) -> int:
  import jax

  from kvjax.lm.model import load
  from kvjax.speculative import formats
  from kvjax.train.eagle import export

  head = export(args.run_dir, args.step, load(args.target))
  out = args.out or os.path.join(args.run_dir, f"head-{args.step}")
  fmt = args.format or "kvjax"
  if fmt == "kvjax":
    formats.save(head, out)
  else:
    formats.export(head, out, format=fmt)
  n_params = sum(a.size for a in jax.tree.leaves(head.params()))
  summary = {
    "run": args.run_dir,
    "step": args.step,
    "out": out,
    "n_params": n_params,
    "kind": head.hc.kind,
    "format": fmt,
  }
  return common.finish(
    args,
    summary,
    f"wrote the {head.hc.kind} head of step {args.step} of {args.run_dir} ({n_params:,} "
    f"params, {fmt} format) to {out}",
  )
