"""Cache augmentation on the bundled `shakespeare` model: perplexity after augmentation points.

    python benchmarks/coprocessor.py          # the shipped shakespeare-8 and -16 (CPU, ~4.5 min)
    python benchmarks/coprocessor.py --coprocessors shakespeare-16,runs/pause-16/coprocessor

Each of --coprocessors (a shipped name or a `kvjax train coprocessor` export directory; the
pause-token baseline is one such directory, `--kind pause`) is measured against the frozen base
on --windows windows of --window-len tokens from the test split's non-comedy plays (`held-out`:
plays of the distribution the shipped coprocessors were trained on, which neither the base nor
they saw) and, for the --delay-of count, from the train split's non-comedy plays (`seen`); at
--points augmentation points per window spread evenly, the 32 tokens after each are scored
with and without the latents (`kvjax.coprocessor.traces.by_position`, the one-pass forward
that the tests hold equal to augmenting trace by trace):

  rows          each coprocessor on time (delay 0); the --delay-of coprocessor's latents
                arriving k = 1, 2, 3 tokens late
  columns       relative perplexity reduction (1 - ppl_aug / ppl_base) at ahead positions 1, 2,
                4, 8, 16, 32, and over all 32
  cost          augmenting a --window-len-token prompt's cache (coprocessor pass + the base over
                the latents, one AOT-compiled call, batch 1) against one AOT-compiled decode
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
from kvjax import lm
from kvjax.coprocessor import traces
from kvjax.lm import steps
from kvjax.lm.cli import positive
from kvjax.lm.generate import new_cache

POSITIONS = (1, 2, 4, 8, 16, 32)


def plays(split_name: str) -> str:
  """The non-comedy plays of a split, one after another."""
  from kvjax.train import corpus

  docs = corpus.read_documents("shakespeare")
  split = corpus.assign_splits(docs)
  return "\n\n".join(d.text for d in docs if split[d.path] == split_name and d.genre != "comedy")


def windows(ids: list[int], n: int, T: int) -> np.ndarray:
  """n windows of T + 1 tokens spread evenly over ids."""
  starts = np.linspace(0, len(ids) - T - 1, n).round().astype(int)
  return np.stack([ids[s : s + T + 1] for s in starts]).astype(np.int64)


def cost(base, cop, prompt: list[int], repeats: int) -> dict:
  """ms of augmenting the prompt's cache (`coprocessor.augment`: the coprocessor pass and the
  base over the latents, one jitted call) vs one jitted decode step after it (batch 1),
  medians over --repeats after a warm-up call that compiles."""
  P = len(prompt)
  tokens = jnp.asarray([prompt], jnp.int32)
  tok = jnp.asarray([5], jnp.int32)

  def fresh():
    _, cache = steps.prefill(
      base.graphdef, base.state, new_cache(base, 1, P + 256), tokens, jnp.asarray([P], jnp.int32)
    )
    return jax.block_until_ready(cache)

  def timed(run):
    out = []
    for _ in range(repeats + 1):
      cache = fresh()
      t0 = time.perf_counter()
      jax.block_until_ready(run(cache))
      out.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(out[1:]))

  a = timed(lambda c: cp.augment(base, cop, c))
  d = timed(lambda c: steps.decode_step(base.graphdef, base.state, c, tok))
  return {"augment_ms": a, "decode_step_ms": d, "ratio": a / d}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--model",
    default="shakespeare",
    help="base (dir or bundled name; default shakespeare, the shipped ones' base)",
  )
  p.add_argument(
    "--coprocessors",
    default="shakespeare-8,shakespeare-16",
    help="comma-separated shipped names or coprocessor directories",
  )
  p.add_argument(
    "--delay-of",
    type=positive,
    default=16,
    help="the latent count whose coprocessor also runs delayed and on `seen`",
  )
  p.add_argument("--windows", type=positive, default=64)
  p.add_argument("--window-len", type=positive, default=256)
  p.add_argument("--points", type=positive, default=16)
  p.add_argument("--repeats", type=positive, default=20)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args(argv)
  base = lm.load(args.model)
  held = base.tokenizer.encode(plays("test"))
  texts = {
    "held-out": windows(held, args.windows, args.window_len),
    "seen": windows(base.tokenizer.encode(plays("train")), args.windows, args.window_len),
  }
  res = dict(machine=report.describe(), settings=vars(args), rows=[], cost=[])
  for name in args.coprocessors.split(","):
    cop = cp.load(name, base)
    kind, n = cop.cc.kind, cop.n_latents
    on_delay = kind == "coprocessor" and n == args.delay_of
    sets = [("held-out", k) for k in ((0, 1, 2, 3) if on_delay else (0,))]
    if on_delay:
      sets.append(("seen", 0))
    for text, k in sets:
      got = traces.by_position(base, cop, texts[text], ahead=32, points=args.points, delay=k)
      res["rows"].append(
        {"coprocessor": name, "kind": kind, "latents": n, "delay": k, "text": text, **got.to_json()}
      )
      red = got.relative_reduction
      print(
        f"  {name} {text} delay {k}: "
        + " ".join(f"@{a} {100 * red[a - 1]:+.2f}%" for a in POSITIONS),
        file=sys.stderr,
      )
    if kind == "coprocessor":
      res["cost"].append(
        {
          "latents": n,
          "coprocessor": name,
          **cost(base, cop, held[: args.window_len], args.repeats),
        }
      )
  report.publish(args.out, "coprocessor", res, markdown(res))
  return 0


def markdown(res) -> str:
  s = res["settings"]
  lines = [
    f"Machine: {res['machine']}. Base `{s['model']}` (float32, frozen); {s['windows']} "
    f"windows of {s['window_len']} tokens from the test split's non-comedy plays (text "
    "`held-out`: never trained on by the base or the coprocessors; `seen`: the train "
    f"split's non-comedy plays they trained on), {s['points']} augmentation points "
    "each. Relative perplexity reduction (1 - ppl_aug / ppl_base) at the k-th token "
    "after the point; higher is better.",
    "",
    "| coprocessor | kind | latents | delay | text | ppl base @1 | ppl aug @1 | "
    + " | ".join(f"@{a}" for a in POSITIONS)
    + " | all 32 |",
    "|---|---|---:|---:|---|---:|---:|" + "---:|" * (len(POSITIONS) + 1),
  ]
  for r in res["rows"]:
    red = r["relative_reduction_by_position"]
    lines.append(
      f"| {r['coprocessor']} | {r['kind']} | {r['latents']} | {r['delay']} | "
      f"{r['text']} | {r['ppl_base_by_position'][0]:.2f} | "
      f"{r['ppl_aug_by_position'][0]:.2f} | "
      + " | ".join(f"{100 * red[a - 1]:+.2f}%" for a in POSITIONS)
      + f" | {100 * r['relative_reduction_all']:+.2f}% |"
    )
  lines += [
    "",
    f"| latents | augment ms ({s['window_len']}-token prompt) | one decode step ms | ratio |",
    "|---:|---:|---:|---:|",
  ]
  for c in res["cost"]:
    lines.append(
      f"| {c['latents']} | {c['augment_ms']:.2f} | {c['decode_step_ms']:.2f} | {c['ratio']:.1f}x |"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
