"""`kvjax sinks`: the attention-sink diagnostic (`kvjax.lm.streaming.sinks`), per layer and
head, with a heatmap."""

from __future__ import annotations

import argparse
import json
import sys

from kvjax.lm.cli.flags import (
  add_dtype_flag,
  add_model_flag,
  add_value_flags,
  model_and_text,
  positive,
)
from kvjax.lm.cli.paths import check_input_file, check_output

NAME = "sinks"
HELP = "attention mass on a text's first tokens, per layer and head"
DESCRIPTION = (
  "Runs the model's causal attention over a text and reports, for every layer "
  "and head, the attention probability that queries put on the first --sink-tokens "
  "positions (averaged over the queries after them), next to what evenly spread attention "
  "would give. A model that forms attention sinks (StreamingLLM) puts far more than that "
  "share there."
)
# (flag, type, default, metavar, help)
FLAGS = (
  (
    "--tokens",
    positive,
    None,
    "T",
    "use the first T tokens of the text (default: all, within the context)",
  ),
  ("--sink-tokens", positive, 4, "K", "how many first positions count as sinks (default 4)"),
)


def add_flags(p: argparse.ArgumentParser) -> None:
  add_model_flag(p)
  add_dtype_flag(p, "cast the params (default: as stored)")
  p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file ('-' = stdin)")
  add_value_flags(p, FLAGS)
  p.add_argument("--png", metavar="FILE", help="also write the heatmap as a PNG")
  p.add_argument("--json", action="store_true", help="print the report as JSON")
  p.set_defaults(run=_sinks, check=lambda args: _check(p, args))


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  check_input_file(parser, "--text", args.text)
  check_output(parser, "--png", args.png, directory=False)


def _sinks(args: argparse.Namespace) -> int:
  from kvjax.lm.streaming import sinks

  model, ids = model_and_text(args)
  if args.tokens is not None:
    if args.tokens > len(ids):
      raise ValueError(f"--tokens {args.tokens}: the text has only {len(ids)} tokens")
    ids = ids[: args.tokens]
  report = sinks.attention_mass(model, ids, sink_tokens=args.sink_tokens)
  if args.png is not None:
    sinks.heatmap(
      report,
      args.png,
      title=f"{args.model}: attention on the first {args.sink_tokens} of {report.tokens} tokens",
    )
  out = {"model": args.model, **report.to_json(), "png": args.png}
  if args.json:
    print(json.dumps(out))
    return 0
  print(
    f"{args.model}: attention mass on the first {args.sink_tokens} of {report.tokens} "
    f"tokens (mean over heads; uniform attention would give the second column)"
  )
  for l, (m, u) in enumerate(zip(report.mass.mean(1), report.uniform)):
    heads = " ".join(f"{x:.2f}" for x in report.mass[l])
    print(f"layer {l:2d}: {m:.3f}  (uniform {u:.3f}, {m / u:5.1f}x)  heads {heads}")
  if args.png is not None:
    print(f"heatmap: {args.png}", file=sys.stderr)
  return 0
