"""`kvjax sot`: Skeleton-of-Thought from the command line.

    kvjax sot --model DIR --question "How can I sleep better?" [--router rules] [--json]
    kvjax sot --question "What happens in Hamlet?" --skeleton "1. A ghost\\n2. A play" --json

Text output streams the points in order as each (and every point before it) is written. Then
the answer is generated again, warm and in one decode call, and timed against a normal answer of
the same number of generated tokens, also warm, in the same run (compilation excluded).
"""

from __future__ import annotations

import argparse
import json
import sys

from kvjax.lm.cli.flags import (
  PROG,
  add_model_flag,
  add_sampling_flags,
  add_value_flags,
  check_sampling_flags,
  load_model,
  positive,
  sampling_from_flags,
)
from kvjax.lm.cli.paths import check_input_file
from kvjax.lm.cli.text import read_prompts, read_text, text_type

NAME = "sot"
HELP = "answer as a skeleton of points, expanded in parallel (Skeleton-of-Thought)"
DESCRIPTION = (
  "Skeleton-of-Thought: the model writes a skeleton of points (or --skeleton "
  "gives it), then every point is expanded in one batched decode that prefills the "
  "question and skeleton once. Reports the latency against a normal answer of the same "
  "number of generated tokens, timed in the same run (compilation excluded)."
)
# (flag, type, default, metavar, help): the most points, and the most new tokens of each
# generation
BUDGET_FLAGS = (
  ("--max-points", positive, 10, "P", "a skeleton with more points is an error (default 10)"),
  ("--point-tokens", positive, 64, "N", "new tokens per point at most (default 64)"),
  ("--skeleton-tokens", positive, 128, "N", "new tokens for the skeleton at most (default 128)"),
  (
    "--answer-tokens",
    positive,
    256,
    "N",
    "new tokens for a normal answer when the router declines SoT (default 256)",
  ),
)


def add_flags(p: argparse.ArgumentParser) -> None:
  add_model_flag(p, chat=True)
  p.add_argument(
    "--question", required=True, type=text_type, metavar="TEXT", help="the question ('-': stdin)"
  )
  p.add_argument(
    "--skeleton",
    default=None,
    type=text_type,
    metavar="TEXT",
    help="the points to expand, e.g. '1. A\\n2. B' (literal \\n separates lines; "
    "'-': stdin); skips the skeleton stage and the router. Needed for models that "
    "cannot follow instructions, such as the bundled Shakespeare models",
  )
  add_value_flags(p.add_argument_group("token budgets"), BUDGET_FLAGS)
  p.add_argument(
    "--router",
    choices=("prompt", "rules", "always", "never"),
    default=None,
    help="decide whether the question suits SoT: ask the model (prompt), keyword "
    "rules, always or never (default rules; always with --skeleton)",
  )
  p.add_argument(
    "--prompts",
    default=None,
    metavar="FILE",
    help="JSON object overriding prompt templates (fields of kvjax.lm.sot.prompts."
    "Prompts: skeleton, skeleton_prefill, expand, expand_prefill, answer, plain, chat)",
  )
  p.add_argument(
    "--repeat-prefix",
    action="store_true",
    help="batch the full point prompts (every row stores question + skeleton) "
    "instead of prefilling the shared prefix once: the reference implementation's way",
  )
  p.add_argument(
    "--no-baseline",
    action="store_true",
    help="skip timing the normal answer (sequential_latency_s and speedup are "
    "null; they are also null when the router declines SoT)",
  )
  add_sampling_flags(p)
  p.add_argument(
    "--json",
    action="store_true",
    help="print one JSON object: skeleton, points, answer, latency_s, "
    "sequential_latency_s, speedup, prefix_tokens_shared, route, stats",
  )
  p.set_defaults(run=_sot, check=lambda args: _check(p, args))


def _add_budget_flags(p) -> None:
  """The most points, and the most new tokens of each generation."""
  g = p.add_argument_group("token budgets")
  g.add_argument(
    "--max-points",
    type=positive,
    default=10,
    metavar="P",
    help="a skeleton with more points is an error (default 10)",
  )
  g.add_argument(
    "--point-tokens",
    type=positive,
    default=64,
    metavar="N",
    help="new tokens per point at most (default 64)",
  )
  g.add_argument(
    "--skeleton-tokens",
    type=positive,
    default=128,
    metavar="N",
    help="new tokens for the skeleton at most (default 128)",
  )
  g.add_argument(
    "--answer-tokens",
    type=positive,
    default=256,
    metavar="N",
    help="new tokens for a normal answer when the router declines SoT (default 256)",
  )


def _check(parser, args) -> None:
  check_sampling_flags(parser, args)
  if args.skeleton is not None and args.router not in (None, "always"):
    parser.error(
      f"--router {args.router} does not apply with --skeleton: a supplied skeleton "
      "is always expanded"
    )
  if args.question == "-" and args.skeleton == "-":
    parser.error("--question and --skeleton cannot both read stdin ('-')")
  if not args.question.strip():
    parser.error("--question is empty: pass the text to answer")
  check_input_file(parser, "--prompts", args.prompts)
  if args.prompts is not None:
    try:
      read_text(args.prompts, "--prompts")  # UTF-8 text (Prompts.load checks the JSON)
    except ValueError as err:
      parser.error(str(err))


def _sot(args) -> int:
  from kvjax.lm import sot

  question, skeleton, prompts = _inputs(args)
  model = load_model(args)
  sampling, key = sampling_from_flags(args)
  kw = dict(
    skeleton=skeleton,
    max_points=args.max_points,
    point_tokens=args.point_tokens,
    skeleton_tokens=args.skeleton_tokens,
    answer_tokens=args.answer_tokens,
    router=args.router or "rules",
    prompts=prompts,
    sampling=sampling,
    key=key,
    stop=tuple(args.stop),
    share=not args.repeat_prefix,
  )
  ans = sot.run(model, question, on_point=None if args.json else _point_printer(), **kw)
  if not args.json:
    sys.stdout.write((ans.answer if ans.stats["mode"] == "normal" else "") + "\n")
    sys.stdout.flush()
  stats, seq, speedup = _timed(args, model, question, kw)
  if args.json:
    print(json.dumps(_json_result(args, question, ans, stats, seq, speedup)))
  else:
    print(_summary(ans, stats, seq, speedup), file=sys.stderr)
  return 0


def _inputs(args) -> tuple:
  """(question, skeleton or None, Prompts) from the flags, '-' read from stdin."""
  from kvjax.lm.sot.prompts import Prompts

  question = read_prompts([args.question], "--question")[0]
  skeleton = None
  if args.skeleton is not None:
    skeleton = read_prompts([args.skeleton], "--skeleton")[0].replace("\\n", "\n")
  prompts = Prompts.load(args.prompts) if args.prompts else Prompts()
  if args.chat:
    import dataclasses

    prompts = dataclasses.replace(prompts, chat=True)
  return question, skeleton, prompts


def _point_printer():
  """on_point for text output: each point's text on its own line, as it is final."""
  shown = 0

  def show(i: int, text: str) -> None:
    nonlocal shown
    if shown:
      sys.stdout.write("\n")
    sys.stdout.write(text.rstrip())
    sys.stdout.flush()
    shown += 1

  return show


def _timed(args, model, question: str, kw: dict) -> tuple[dict, float | None, float | None]:
  """(stats of a warm SoT run, a warm normal answer's latency, the speedup): SoT in one decode
  call (a streamed run uses other executables: warm those first), then the normal answer of
  as many tokens (None without a baseline or when the router declined SoT)."""
  from kvjax.lm import sot

  if not args.json:
    sot.run(model, question, **kw)
  s = sot.run(model, question, **kw).stats
  seq = speedup = None
  if not args.no_baseline and s["mode"] == "sot":
    n = max(s["generated_tokens"], 1)
    sot.normal_latency(model, question, n, prompts=kw["prompts"])  # compiles and warms
    seq = sot.normal_latency(model, question, n, prompts=kw["prompts"])["latency_s"]
    speedup = seq / s["latency_s"] if s["latency_s"] > 0 else None
  return s, seq, speedup


def _json_result(args, question: str, ans, s: dict, seq, speedup) -> dict:
  """The --json object."""
  return {
    "question": question,
    "skeleton": ans.skeleton,
    "points": ans.points,
    "expansions": ans.expansions,
    "answer": ans.answer,
    "latency_s": s["latency_s"],
    "sequential_latency_s": seq,
    "speedup": speedup,
    "prefix_tokens_shared": s["prefix_tokens_shared"],
    "route": {
      "suitable": ans.route.suitable,
      "router": ans.route.router,
      "reason": ans.route.reason,
    },
    "stats": {**s, "compile_s": ans.stats["compile_s"]},
    "model": args.model,
  }


def _summary(ans, s: dict, seq, speedup) -> str:
  """The line on stderr after the text: the route, the timings, the speedup."""
  route = (
    "" if ans.route.router == "supplied" else f"router {ans.route.router}: {ans.route.reason}; "
  )
  if s["mode"] == "normal":
    return (
      f"{PROG}: {route}answered normally: {s['generated_tokens']} tokens in {s['latency_s']:.3f} s"
    )
  line = (
    f"{PROG}: {route}{len(ans.points)} points, {s['generated_tokens']} tokens in "
    f"{s['latency_s']:.3f} s (skeleton {s['skeleton_s']:.3f} s, expansion "
    f"{s['expand_s']:.3f} s, {s['prefix_tokens_shared']} prefix tokens shared)"
  )
  if seq is not None:
    line += f"; a normal answer of as many tokens {seq:.3f} s: {speedup:.2f}x"
  return line
