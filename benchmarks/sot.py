"""Skeleton-of-Thought on the bundled `shakespeare` model: latency and cache memory against a
normal answer of the same number of tokens, and against the reference implementation's batching.

    python benchmarks/sot.py         # 3, 5, 8 points x 48 tokens, and 5 x 24 / 96: ~3 min on CPU

For each skeleton (supplied: the bundled model writes verse, it follows no instructions) the same
P x N tokens are generated three ways, greedy, every row running its full budget (no stop tokens):

  normal      one answer of P x N tokens after the normal question prompt (`lm.generate`)
  repeated    the P point prompts batched whole (every row prefills and stores question +
              skeleton: how the reference implementation batches expansions) (`sot.expand`,
              share=False)
  shared      the same P prompts with their common prefix prefilled once into a one-row cache
              every row reads (`sot.expand`, the default; what `kvjax sot` runs)

Timed: prefill + decode, compilation excluded (AOT executables cached on the model, one warm
call first), medians of --repeats, the three interleaved in each repeat. Cache memory: the bytes
of the decode cache's arrays. Writes <out>/sot_<backend>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import report

from kvjax import lm
from kvjax.lm.cli import positive
from kvjax.lm.sot import expansion as ex
from kvjax.lm.sot.points import parse_points
from kvjax.lm.sot.prompts import Prompts

SKELETONS = {  # points -> (question, skeleton)
  3: (
    "Why does Hamlet delay his revenge?",
    "1. Doubt about the ghost\n2. His melancholy\n3. Fear of damnation",
  ),
  5: (
    "What makes Falstaff a great comic character?",
    "1. His wit\n2. His cowardice\n3. His lies\n4. His friendship with Hal\n5. His fall",
  ),
  8: (
    "What happens in The Tempest?",
    "1. The storm\n2. Prospero's story\n3. Miranda meets Ferdinand\n4. Caliban's plot\n"
    "5. The lords wander\n6. Ariel's tricks\n7. The masque\n8. Prospero forgives",
  ),
}


def measure(model, question: str, skeleton: str, point_tokens: int, repeats: int) -> dict:
  prompts = Prompts()
  points = parse_points(skeleton)
  rows = prompts.expand_ids(model, question, points)
  answer = prompts.answer_ids(model, question)
  total = len(points) * point_tokens
  runs = {
    "normal": lambda: lm.generate(model, [answer], max_new_tokens=total, stop_tokens=[]),
    "repeated": lambda: ex.expand(
      model, rows, max_new_tokens=point_tokens, stop_tokens=[], share=False
    ),
    "shared": lambda: ex.expand(model, rows, max_new_tokens=point_tokens, stop_tokens=[]),
  }
  times: dict = {k: [] for k in runs}
  last: dict = {}
  for run in runs.values():
    run()  # compile + warm
  for _ in range(repeats):
    for k, run in runs.items():
      g = run()
      assert g.stats["new_tokens"] == total, (k, g.stats["new_tokens"])
      times[k].append(g.stats["prefill_s"] + g.stats["decode_s"])
      last[k] = g
  med = {k: statistics.median(v) for k, v in times.items()}
  return dict(
    points=len(points),
    point_tokens=point_tokens,
    tokens=total,
    question=question,
    prompt_tokens=[len(r) for r in rows],
    prefix_tokens_shared=last["shared"].stats["prefix_tokens_shared"],
    seconds=med,
    all_seconds=times,
    cache_bytes=dict(
      normal=last["normal"].stats["cache_bytes"],
      repeated=last["repeated"].stats["cache_bytes"],
      shared=last["shared"].stats["cache_bytes"],
    ),
    speedup=dict(repeated=med["normal"] / med["repeated"], shared=med["normal"] / med["shared"]),
    shared_vs_repeated=med["repeated"] / med["shared"],
    same_tokens=last["shared"].tokens == last["repeated"].tokens,
  )


def markdown(res: dict) -> str:
  lines = [
    f"Machine: {res['machine']}. Model `{res['model']}`, greedy, medians of {res['repeats']}.",
    "",
    "| points x tokens | tokens | prefix shared | normal | repeated-prefix SoT | shared-prefix SoT "
    "| speedup (repeated) | speedup (shared) | cache: normal / repeated / shared |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  for r in res["rows"]:
    s, c = r["seconds"], r["cache_bytes"]
    mib = lambda b: f"{b / 2**20:.2f}"
    lines.append(
      f"| {r['points']} x {r['point_tokens']} | {r['tokens']} | "
      f"{r['prefix_tokens_shared']} | {s['normal'] * 1e3:.0f} ms | {s['repeated'] * 1e3:.0f} ms | "
      f"{s['shared'] * 1e3:.0f} ms | {r['speedup']['repeated']:.2f}x | "
      f"**{r['speedup']['shared']:.2f}x** | {mib(c['normal'])} / {mib(c['repeated'])} "
      f"/ {mib(c['shared'])} MiB |"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="shakespeare")
  p.add_argument(
    "--runs",
    default="3x48,5x24,5x48,5x96,8x48",
    help="comma-separated POINTSxTOKENS: skeleton size (3, 5 or 8) x tokens per point",
  )
  p.add_argument("--repeats", type=positive, default=7)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args(argv)
  try:
    runs = [tuple(int(x) for x in r.split("x")) for r in args.runs.split(",")]
    assert all(len(r) == 2 and r[0] in SKELETONS and r[1] >= 1 for r in runs)
  except (ValueError, AssertionError):
    p.error(
      f"--runs takes POINTSxTOKENS items with POINTS among {sorted(SKELETONS)}; got {args.runs!r}"
    )
  model = lm.load(args.model)
  res = dict(machine=report.describe(), model=args.model, repeats=args.repeats, rows=[])
  for P, N in runs:
    q, skeleton = SKELETONS[P]
    row = measure(model, q, skeleton, N, args.repeats)
    print(
      f"{P} x {N}: normal {row['seconds']['normal']:.3f} s, repeated "
      f"{row['seconds']['repeated']:.3f} s, shared {row['seconds']['shared']:.3f} s "
      f"({row['speedup']['shared']:.2f}x)",
      file=sys.stderr,
    )
    res["rows"].append(row)
  report.publish(args.out, "sot", res, markdown(res))
  return 0


if __name__ == "__main__":
  sys.exit(main())
