"""Cache augmentation on the bundled `shakespeare` model: perplexity after augmentation points.

    python benchmarks/coprocessor.py --train --runs runs/cop-bench   # trains what is missing,
                                                                      # then measures (CPU)

Runs: a coprocessor and the pause-token baseline for each of --latents, trained with one
recipe (`python -m kvjax.train coprocessor --base shakespeare --data shakespeare --genre
comedy ...`, the flags in RECIPE) into --runs/<kind>-<N>; --train trains the missing ones
first. Measured on --windows 256-token windows of the test split's comedy (a held-out play of
the genre the runs trained on; the runs' own validation is the validation split's comedy) and,
for the --delay-of count, of all six test plays and of the train comedies the runs saw;
--points augmentation points per window spread evenly, the 32 tokens after each scored with
and without the latents (`kvjax.coprocessor.traces.by_position`, the one-pass forward that the
tests hold equal to augmenting trace by trace):

  rows          each kind and latent count on time (delay 0); the --delay-of run's latents
                arriving k = 1, 2, 3 tokens late
  columns       relative perplexity reduction (1 - ppl_aug / ppl_base) at ahead positions 1, 2,
                4, 8, 16, 32, and over all 32
  cost          augmenting a 256-token prompt's cache (coprocessor pass + the base over the
                latents, one AOT-compiled call, batch 1) against one AOT-compiled decode
                step, medians of --repeats

Writes <out>/coprocessor_<backend>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import report
from kvjax import coprocessor as cp
from kvjax.coprocessor import traces
from kvjax import lm
from kvjax.lm import steps
from kvjax.lm.cli import positive
from kvjax.lm.generate import new_cache

RECIPE = ["--base", "shakespeare", "--data", "shakespeare", "--genre", "comedy", "--points", "8",
          "--ahead", "16", "--batch-size", "8", "--seq-len", "256", "--lr", "1e-3", "--warmup",
          "10", "--eval-batches", "4", "--no-progress"]
POSITIONS = (1, 2, 4, 8, 16, 32)


def plays(split_name: str, genre: str | None) -> str:
  """The plays of a split and genre (all genres for None), one after another."""
  from kvjax.train import corpus
  docs = corpus.read_documents("shakespeare")
  split = corpus.assign_splits(docs)
  return "\n\n".join(d.text for d in docs if split[d.path] == split_name
                     and (genre is None or d.genre == genre))


def windows(ids: list[int], n: int, T: int) -> np.ndarray:
  """n windows of T + 1 tokens spread evenly over ids."""
  starts = np.linspace(0, len(ids) - T - 1, n).round().astype(int)
  return np.stack([ids[s:s + T + 1] for s in starts]).astype(np.int64)


def train_missing(runs: str, kind: str, n: int, steps_: int) -> str:
  path = os.path.join(runs, f"{kind}-{n}")
  export = os.path.join(path, "coprocessor")
  if not os.path.isdir(export):
    from kvjax.train.cli import main as train_main
    print(f"training {kind}-{n} ({steps_} steps) ...", file=sys.stderr)
    code = train_main(["coprocessor", *RECIPE, "--kind", kind, "--latents", str(n),
                       "--steps", str(steps_), "--out", path])
    if code:
      raise SystemExit(code)
  return export


def cost(base, cop, prompt: list[int], repeats: int) -> dict:
  """ms of augmenting the prompt's cache (one AOT-compiled call: the coprocessor pass and the
  base over the latents) vs one AOT-compiled decode step after it (batch 1), medians."""
  from kvjax.coprocessor import model as cpm
  P = len(prompt)
  tokens = jnp.asarray([prompt], jnp.int32)
  tok = jnp.asarray([5], jnp.int32)

  def fresh():
    _, cache = steps.prefill(base.graphdef, base.state, new_cache(base, 1, 512), tokens,
                             jnp.asarray([P], jnp.int32))
    return jax.block_until_ready(cache)

  aug = cpm._augment.lower(base.graphdef, base.state, cop.cc, cop.params, fresh()).compile()
  dec = steps.decode_step.lower(base.graphdef, base.state, fresh(), tok).compile()

  def timed(run):
    out = []
    for _ in range(repeats + 1):
      cache = fresh()
      t0 = time.perf_counter()
      jax.block_until_ready(run(cache))
      out.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(out[1:]))

  a = timed(lambda c: aug(base.state, cop.params, c))
  d = timed(lambda c: dec(base.state, c, tok))
  return {"augment_ms": a, "decode_step_ms": d, "ratio": a / d}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--runs", default="runs/cop-bench",
                 help="where the runs live (<kind>-<N>/coprocessor)")
  p.add_argument("--train", action="store_true", help="train the missing runs first")
  p.add_argument("--steps", type=positive, default=200, help="training steps of each run")
  p.add_argument("--latents", default="4,8,16,32")
  p.add_argument("--delay-of", type=positive, default=16,
                 help="the latent count whose coprocessor also runs delayed")
  p.add_argument("--windows", type=positive, default=64)
  p.add_argument("--points", type=positive, default=16)
  p.add_argument("--repeats", type=positive, default=20)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  p.add_argument("--cost-only", action="store_true",
                 help="only the cost rows, with the shipped coprocessors (8 and 16 latents: the "
                 "cost depends on the latent count, not on the weights); writes "
                 "coprocessor_cost_<backend>.{json,md}")
  args = p.parse_args(argv)
  if args.cost_only:
    return cost_only(args)
  counts = [int(x) for x in args.latents.split(",")]
  base = lm.load("shakespeare")
  ids = base.tokenizer.encode(plays("test", "comedy"))
  texts = {"comedy": windows(ids, args.windows, 256),
           "all": windows(base.tokenizer.encode(plays("test", None)), args.windows, 256),
           "seen": windows(base.tokenizer.encode(plays("train", "comedy")), args.windows, 256)}
  res = dict(machine=report.describe(), settings=vars(args), recipe=RECIPE, rows=[], cost=[])
  for kind in ("coprocessor", "pause"):
    for n in counts:
      path = os.path.join(args.runs, f"{kind}-{n}", "coprocessor")
      if args.train:
        path = train_missing(args.runs, kind, n, args.steps)
      if not os.path.isdir(path):
        print(f"missing {path}; pass --train", file=sys.stderr)
        return 1
      cop = cp.load(path, base)
      delays = (0, 1, 2, 3) if kind == "coprocessor" and n == args.delay_of else (0,)
      sets = [("comedy", k) for k in delays]
      if n == args.delay_of:
        sets += [("all", 0), ("seen", 0)]
      for text, k in sets:
        got = traces.by_position(base, cop, texts[text], ahead=32, points=args.points, delay=k)
        row = {"kind": kind, "latents": n, "delay": k, "text": text, **got.to_json()}
        res["rows"].append(row)
        red = got.relative_reduction
        print(f"  {kind}-{n} {text} delay {k}: " + " ".join(
            f"@{a} {100 * red[a - 1]:+.2f}%" for a in POSITIONS), file=sys.stderr)
      if kind == "coprocessor":
        res["cost"].append({"latents": n, **cost(base, cop, ids[:256], args.repeats)})
  table = markdown(res)
  report.write(args.out, "coprocessor", res, table)
  print(table)
  return 0


def cost_only(args) -> int:
  base = lm.load("shakespeare")
  ids = base.tokenizer.encode(plays("test", "comedy"))
  res = dict(machine=report.describe(), settings=vars(args), cost=[])
  for name in ("shakespeare-8", "shakespeare-16"):
    cop = cp.load(name, base)
    res["cost"].append({"latents": cop.cc.n_latents, "coprocessor": name,
                        **cost(base, cop, ids[:256], args.repeats)})
  lines = [f"Machine: {res['machine']}. Base `shakespeare` (float32), shipped coprocessors.", "",
           "| latents | augment ms (256-token prompt) | one decode step ms | ratio |",
           "|---:|---:|---:|---:|"]
  for c in res["cost"]:
    lines.append(f"| {c['latents']} | {c['augment_ms']:.2f} | {c['decode_step_ms']:.2f} | "
                 f"{c['ratio']:.1f}x |")
  table = "\n".join(lines)
  report.write(args.out, "coprocessor_cost", res, table)
  print(table)
  return 0


def markdown(res) -> str:
  s = res["settings"]
  lines = [f"Machine: {res['machine']}. Base `shakespeare` (float32, frozen); {s['windows']} "
           f"windows of 256 tokens from the test split's comedy (text `comedy`, held out; "
           f"`all`: the test split's six plays of every genre; `seen`: the train split's "
           f"comedies the runs trained on), {s['points']} augmentation points each, "
           f"{s['steps']} training steps per run on the train split's comedies. Relative "
           "perplexity reduction (1 - ppl_aug / ppl_base) at the k-th token after the point; "
           "higher is better.", "",
           "| kind | latents | delay | text | ppl base @1 | ppl aug @1 | "
           + " | ".join(f"@{a}" for a in POSITIONS) + " | all 32 |",
           "|---|---:|---:|---|---:|---:|" + "---:|" * (len(POSITIONS) + 1)]
  for r in res["rows"]:
    red = r["relative_reduction_by_position"]
    lines.append(f"| {r['kind']} | {r['latents']} | {r['delay']} | {r['text']} | "
                 f"{r['ppl_base_by_position'][0]:.2f} | {r['ppl_aug_by_position'][0]:.2f} | "
                 + " | ".join(f"{100 * red[a - 1]:+.2f}%" for a in POSITIONS)
                 + f" | {100 * r['relative_reduction_all']:+.2f}% |")
  lines += ["", "| latents | augment ms (256-token prompt) | one decode step ms | ratio |",
            "|---:|---:|---:|---:|"]
  for c in res["cost"]:
    lines.append(f"| {c['latents']} | {c['augment_ms']:.2f} | {c['decode_step_ms']:.2f} | "
                 f"{c['ratio']:.1f}x |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
