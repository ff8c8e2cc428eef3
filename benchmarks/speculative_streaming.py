"""EAGLE inside a StreamingLLM session: exactness and acceptance over an endless stream.

    python benchmarks/speculative_streaming.py                  # bundled model + head, ~25 min
    python benchmarks/speculative_streaming.py --model M --head H --prompt "..." --chat

Two parts, both through a 4 + --window sink cache (`kvjax stream` as a user runs it):
  greedy   --greedy-tokens greedy tokens after --prompt from the plain `streaming.Session`
           and from `speculative.StreamingSession` (--tree-*): the index of the first token
           where they differ (none: identical), decode tok/s of each (compile excluded) and
           their ratio, tokens per target forward.
  endless  One sampled stream (temperature --temperature) of --tokens tokens from the
           speculating session: over each doubling of the stream, the tokens per target
           forward (the accepted length, bonus included) and the wall time per token, and
           the process's resident memory at its end; the accepted length at each doubling
           relative to the first.

Writes <out>/speculative_streaming_<model>_<backend>.json and .md (the tables, also printed).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import jax
import report
from tqdm import tqdm

from kvjax import lm, speculative
from kvjax.lm import streaming
from kvjax.lm.cli import checked, positive

MODEL = "shakespeare"


def _ids(session, args, n: int, bar: bool) -> list[int]:
  done = {}
  progress = tqdm(total=n, disable=not bar, unit="tok", mininterval=5)
  for _ in session.turn(args.prompt, max_new_tokens=n, chat=args.chat, done=done):
    if session.stats["tokens_generated"] % 256 == 0:
      progress.n = session.stats["tokens_generated"]
      progress.refresh()
  progress.close()
  return done["ids"]


def greedy(model, head, tree, args) -> dict:
  """Plain vs speculative greedy streams of --greedy-tokens tokens."""
  kw = dict(n_sink=4, window=args.window, stop_tokens=())
  plain = streaming.Session(model, **kw)
  spec = speculative.StreamingSession(model, head, tree=tree, **kw)
  a = _ids(plain, args, args.greedy_tokens, not args.quiet)
  b = _ids(spec, args, args.greedy_tokens, not args.quiet)
  differ = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
  if differ is None and len(a) != len(b):
    differ = min(len(a), len(b))
  p, s = plain.stats, spec.stats
  return dict(
    tokens=len(a),
    first_difference=differ,
    plain_tokens_per_s=p["tokens_per_s"],
    speculative_tokens_per_s=s["tokens_per_s"],
    speedup=s["tokens_per_s"] / p["tokens_per_s"],
    mean_accept_len=s["mean_accept_len"],
    rounds=s["rounds"],
  )


def endless(model, head, tree, args) -> dict:
  """One sampled speculating stream of --tokens tokens: accepted length and ms/token per
  doubling."""
  session = speculative.StreamingSession(
    model,
    head,
    n_sink=4,
    window=args.window,
    tree=tree,
    sampling=lm.Sampling(temperature=args.temperature),
    key=jax.random.key(args.seed),
    stop_tokens=(),
  )
  n = args.tokens
  marks = [m for m in (2**i for i in range(9, 40)) if m < n] + [n]
  seen, at = [], 0
  progress = tqdm(total=n, disable=args.quiet, unit="tok", mininterval=5)
  done: dict = {}
  for _ in session.turn(args.prompt, max_new_tokens=n, chat=args.chat, done=done, keep_ids=False):
    got = session.stats["tokens_generated"]
    while at < len(marks) and got >= marks[at]:
      seen.append((marks[at], time.perf_counter(), session.stats["rounds"], report.rss_mib()))
      at += 1
    if got % 256 == 0:
      progress.n = got
      progress.refresh()
  progress.close()
  rows = []
  for (lo, t0, r0, _), (hi, t1, r1, rss) in itertools.pairwise(seen):
    rows.append(
      dict(
        from_tokens=lo,
        tokens=hi,
        mean_accept_len=(hi - lo) / max(r1 - r0, 1),
        ms_per_token=1e3 * (t1 - t0) / (hi - lo),
        rss_mib=rss,
      )
    )
  for r in rows:
    r["vs_first"] = r["mean_accept_len"] / rows[0]["mean_accept_len"]
  return dict(
    tokens=done["n"],
    temperature=args.temperature,
    mean_accept_len=session.stats["mean_accept_len"],
    tokens_per_s=session.stats["tokens_per_s"],
    rows=rows,
  )


def markdown(res: dict) -> str:
  s = res["settings"]
  t = res["tree"]
  out = [
    f"Machine: {res['machine']}",
    "",
    f"`{s['model']}` with head `{s['head']}`, tree top_k {t['top_k']}, depth {t['depth']}, "
    f"{t['total_tokens']} tokens; 4 + {s['window']} sink cache; prompt {s['prompt']!r}.",
    "",
  ]
  if "greedy" in res:
    g = res["greedy"]
    same = "identical" if g["first_difference"] is None else f"differ at {g['first_difference']}"
    out += [
      f"**Greedy, plain vs speculative session**: {g['tokens']:,} tokens, {same}; "
      f"{g['plain_tokens_per_s']:.1f} vs {g['speculative_tokens_per_s']:.1f} tok/s "
      f"({g['speedup']:.2f}x), {g['mean_accept_len']:.2f} tokens per target forward.",
      "",
    ]
  if "endless" in res:
    e = res["endless"]
    out += [
      f"**Endless speculative stream** (temperature {e['temperature']}): {e['tokens']:,} "
      f"tokens, {e['mean_accept_len']:.2f} tokens per target forward, "
      f"{e['tokens_per_s']:.1f} tok/s.",
      "",
      "| tokens | tokens per forward | vs first | ms per token | process RSS MiB |",
      "|---|---:|---:|---:|---:|",
      *(
        f"| {r['from_tokens']:,}-{r['tokens']:,} | {r['mean_accept_len']:.2f} | "
        f"{r['vs_first']:.2f} | {r['ms_per_token']:.2f} | {r['rss_mib']:.0f} |"
        for r in e["rows"]
      ),
      "",
    ]
  return "\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--parts", default="greedy,endless", help="comma-separated: greedy,endless")
  p.add_argument("--model", default=MODEL, help=f"model name or directory (default {MODEL})")
  p.add_argument("--head", default=None, help="EAGLE head (default: the model's name)")
  p.add_argument("--prompt", default="**HAMLET**")
  p.add_argument("--chat", action="store_true", help="wrap the prompt with the chat template")
  p.add_argument("--window", type=positive, default=1020, help="window beside 4 sinks")
  p.add_argument("--tree-top-k", type=positive, default=1)
  p.add_argument("--tree-depth", type=positive, default=5)
  p.add_argument("--tree-tokens", type=checked(int, lambda v: v >= 2, "an int >= 2"), default=6)
  p.add_argument("--greedy-tokens", type=positive, default=20000)
  p.add_argument(
    "--tokens", type=checked(int, lambda v: v >= 1024, "an int >= 1024"), default=131072
  )
  p.add_argument("--temperature", type=checked(float, lambda v: v > 0, "> 0"), default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args(argv)
  parts = args.parts.split(",")
  if not parts or any(x not in ("greedy", "endless") for x in parts):
    p.error(f"--parts: expected a comma-separated subset of greedy,endless; got {args.parts!r}")
  args.head = args.head or args.model
  model = lm.load(args.model)
  head = speculative.load_head(args.head, model)
  try:
    tree = speculative.TreeSpec(
      top_k=args.tree_top_k, depth=args.tree_depth, total_tokens=args.tree_tokens
    )
  except ValueError as err:
    p.error(str(err))
  res = dict(machine=report.describe(), backend=jax.default_backend(), settings=vars(args))
  res["tree"] = dict(top_k=tree.top_k, depth=tree.depth, total_tokens=tree.total_tokens)
  for part in parts:
    print(f"{part}:", file=sys.stderr)
    res[part] = (greedy if part == "greedy" else endless)(model, head, tree, args)
  name = f"speculative_streaming_{os.path.basename(args.model.rstrip('/'))}"
  report.publish(args.out, name, res, markdown(res))
  return 0


if __name__ == "__main__":
  sys.exit(main())
