"""StreamingLLM: quality, per-token cost and memory of the sink cache vs its baselines, one run.

    python benchmarks/streaming.py                      # all parts, ~23 min on 2 CPU cores
    python benchmarks/streaming.py --parts cost,kernel  # on a GPU: the cost and kernel rows

Parts (--parts, comma-separated):
  quality  Perplexity of the bundled `shakespeare` model on the first --tokens tokens of a
           held-out play (test split, not a comedy), fed token by token
           (`kvjax.lm.streaming.perplexity`) with a cache of --cache-size slots:
           `window` (no sinks), `recompute` (the last --cache-size tokens recomputed from
           scratch for every token, the quality baseline) and `sink` with 0/1/2/4/8 sinks
           (window = cache size - sinks), the shape of the StreamingLLM paper's Table 2.
  cost     Per-token latency at cache sizes --cost-sizes of a random-weight model with the
           bundled model's shape and a 8192-position context: `sink` = one jitted decode
           step over a full sink cache (4 sinks); `recompute` = one jitted forward over the
           last S tokens (what the recompute baseline pays per token). Medians of --repeats
           timed steps after a warm-up, alternating the two; ratio recompute / sink.
  memory   Streams --memory-tokens tokens (the held-out play, cycled) through a 4 + 252 sink
           cache with the bundled model, in chunks of 4096 tokens (one `lax.scan` each):
           cache bytes, the process's resident memory and the segment's perplexity at each
           checkpoint (powers of two), with the perplexity of the last 4096 tokens.
  endless  One sampled stream of --endless-tokens tokens through a 4 + 252 sink cache
           (`streaming.Session`, as `kvjax stream` runs it): wall time per token between
           the pieces the caller receives over each doubling of the stream, and what the
           text bookkeeping costs per token (incremental detokenisation vs a decode of the
           whole reply so far, the cost of re-decoding at every token).
  kernel   Sink-attention decode latency, Pallas kernel vs the XLA reference
           (`kvjax.pallas_kernels.sink_attention`), one layer, batch 8, 32 query / 8 kv heads,
           head dim 128, bf16, at each cost size. Only on GPU/TPU: on CPU Pallas runs only
           interpreted, so the part is reported as not run.

Writes <out>/streaming_<backend>.json (machine, settings, every measurement) and
<out>/streaming_<backend>.md (the tables, also printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import report

from kvjax import lm
from kvjax.cache.sink import SinkCache
from kvjax.lm import steps, streaming
from kvjax.lm.cli import checked, positive
from kvjax.lm.detokenize import Detokenizer

MODEL = "shakespeare"
PARTS = ("quality", "cost", "memory", "endless", "kernel")
SINKS = (0, 1, 2, 4, 8)


def held_out_tokens(model, n: int) -> tuple[np.ndarray, str]:
  """The first n tokens of the first held-out non-comedy play (test split), and its title."""
  from kvjax.train import corpus

  docs = corpus.load_documents(corpus.builder(), "test", exclude_genres=["comedy"])
  for d in docs:
    ids = np.asarray(model.tokenizer.encode(d.text), np.int32)
    if len(ids) >= n:
      return ids[:n], d.title
  raise SystemExit(f"no held-out play has {n} tokens")


def quality(model, args) -> dict:
  ids, title = held_out_tokens(model, args.tokens)
  C = args.cache_size
  runs = [
    ("window", dict(cache="window", window=C), f"0 + {C}"),
    ("recompute", dict(cache="recompute", window=C), f"0 + {C}"),
  ]
  runs += [
    (f"sink {s}", dict(cache="sink", n_sink=s, window=C - s), f"{s} + {C - s}") for s in SINKS
  ]
  rows = []
  for name, kw, layout in runs:
    t0 = time.perf_counter()
    got = streaming.perplexity(model, ids, progress=not args.quiet, **kw)
    rows.append(
      dict(
        name=name,
        layout=layout,
        ppl=got.ppl,
        tokens=got.tokens,
        peak_cache_tokens=got.peak_cache_tokens,
        ms_per_token=got.ms_per_token,
        wall_s=time.perf_counter() - t0,
      )
    )
    print(f"  {name:10s} {layout:>10s}  ppl {got.ppl:8.3f}", file=sys.stderr)
  rec = next(r["ppl"] for r in rows if r["name"] == "recompute")
  for r in rows:
    r["vs_recompute"] = r["ppl"] / rec
  return dict(text=title, tokens=len(ids), cache_size=C, rows=rows)


def cost_model(max_size: int):
  """A random model with the bundled model's shape and room for 2 * max_size positions."""
  cfg = lm.load(MODEL).cfg
  cfg = dataclasses.replace(cfg, max_position=max(cfg.max_position, 2 * max_size))
  return lm.init(cfg, seed=0)


def _times_ms(fn, repeats: int) -> list[float]:
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(1e3 * (time.perf_counter() - t0))
  return out


def cost_at(model, S: int, rng, repeats: int) -> tuple[list[float], list[float]]:
  """(ms of each decode step with a full, wrapped 4 + (S - 4) sink cache, ms of each
  recompute of the next token's nll over the last S tokens), `repeats` of each, alternated."""
  cfg = model.cfg
  cache = SinkCache.init(
    n_layers=cfg.n_layers,
    batch=1,
    n_sink=4,
    window=S - 4,
    n_kv_heads=cfg.n_kv_heads,
    head_dim=cfg.head_dim,
    dtype=model.dtype,
  )
  fill = jnp.asarray(rng.integers(2, cfg.vocab_size, (1, S + 7)), jnp.int32)
  (_, cache), _ = steps.call(
    model, steps.extend, cache, fill, jnp.asarray([S + 7], jnp.int32)
  )  # full, wrapped around
  tok = jnp.asarray([5], jnp.int32)
  window = jnp.asarray(rng.integers(2, cfg.vocab_size, (1, S)), jnp.int32)
  target = jnp.asarray([7], jnp.int32)
  state = {"cache": cache}

  def sink_step():
    (logits, state["cache"]), _ = steps.call(model, steps.decode_step, state["cache"], tok)
    return logits

  def recompute_step():
    return steps.call(model, steps.nll, window, target, last=True)[0]

  sink_step(), recompute_step()  # compile, warm up
  sink, rec = [], []
  for _ in range(repeats):
    sink += _times_ms(sink_step, 1)
    rec += _times_ms(recompute_step, 1)
  return sink, rec


def cost(args) -> dict:
  model = cost_model(max(args.cost_sizes))
  rng = np.random.default_rng(0)
  rows = []
  for S in args.cost_sizes:
    sink, rec = cost_at(model, S, rng, args.repeats)
    row = dict(
      cache=S,
      sink_ms=statistics.median(sink),
      recompute_ms=statistics.median(rec),
      sink_all_ms=sink,
      recompute_all_ms=rec,
    )
    row["ratio"] = row["recompute_ms"] / row["sink_ms"]
    rows.append(row)
    print(
      f"  cache {S:5d}: sink {row['sink_ms']:.2f} ms, recompute {row['recompute_ms']:.2f} "
      f"ms, {row['ratio']:.1f}x",
      file=sys.stderr,
    )
  return dict(model=f"random, shape of {MODEL}", dtype=str(model.dtype), rows=rows)


def _rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def memory(model, args) -> dict:
  play, title = held_out_tokens(model, 4097)
  n = args.memory_tokens
  reps = -(-(n + 1) // len(play))
  ids = np.tile(play, reps)[: n + 1]
  cache = SinkCache.init(
    n_layers=model.cfg.n_layers,
    batch=1,
    n_sink=4,
    window=252,
    n_kv_heads=model.cfg.n_kv_heads,
    head_dim=model.cfg.head_dim,
    dtype=model.dtype,
  )
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
  C, rows, nll, t0 = 4096, [], [], time.perf_counter()
  for lo in range(0, n, C):
    done = min(lo + C, n)  # the last chunk may be shorter (one more compile)
    (part, cache), _ = steps.call(
      model,
      steps.nll_scan,
      cache,
      jnp.asarray(ids[None, lo:done]),
      jnp.asarray(ids[None, lo + 1 : done + 1]),
    )
    nll.append(np.asarray(part[0]))
    if done & (done - 1) == 0 or done >= n:  # powers of two, and the end
      rows.append(
        dict(
          tokens=done,
          cache_tokens=int(cache.length[0]),
          cache_bytes=sum(x.nbytes for x in jax.tree.leaves(cache)),
          rss_mib=_rss_mib(),
          segment_ppl=float(np.exp(nll[-1].mean())),
          elapsed_s=time.perf_counter() - t0,
        )
      )
      print(
        f"  {done:7d} tokens: cache {rows[-1]['cache_tokens']} tokens, rss "
        f"{rows[-1]['rss_mib']:.0f} MiB",
        file=sys.stderr,
      )
  return dict(text=f"{title} (first 4097 tokens, cycled)", cache_bytes=cache_bytes, rows=rows)


def endless(model, args) -> dict:
  """One endless stream of --endless-tokens sampled tokens (4 + 252 sink cache, temperature 1)
  as a user reads it (`kvjax stream --prompt`: no ids or text kept): the wall time between
  pieces, per token, over each doubling of the stream (from the first piece: the prompt's
  prefill and the compile come before it), and the cost of the text bookkeeping at that
  length, on the held-out play's ids cycled: one `Detokenizer.push` per token (what each token
  pays) vs one decode of the whole text so far (what re-decoding at every token would pay)."""
  session = streaming.Session(
    model,
    n_sink=4,
    window=252,
    sampling=lm.Sampling(temperature=1.0),
    key=jax.random.key(0),
    stop_tokens=(),
  )
  n, done = args.endless_tokens, {}
  marks = [m for m in (2**i for i in range(10, 40)) if m < n] + [n]
  seen, rss, at, first = [], [], 0, None
  t0 = time.perf_counter()
  for _ in session.turn("ROMEO:\n", max_new_tokens=n, done=done, keep_ids=False):
    if first is None:
      first = (session.stats["tokens_generated"], time.perf_counter())
    while at < len(marks) and session.stats["tokens_generated"] >= marks[at]:
      seen.append(time.perf_counter())
      rss.append(_rss_mib())
      at += 1
  wall_s = time.perf_counter() - t0
  play, title = held_out_tokens(model, 4097)
  ids = np.tile(play, -(-n // len(play)))[:n].tolist()
  rows, (lo, t_lo) = [], first
  for m, t, r in zip(marks, seen, rss):
    tail = ids[max(0, m - 1000) : m]
    det = Detokenizer(model.tokenizer)
    t1 = time.perf_counter()
    for tok in tail:
      det.push(tok)
    push_us = 1e6 * (time.perf_counter() - t1) / len(tail)
    t1 = time.perf_counter()
    model.tokenizer.decode(ids[:m])
    whole_us = 1e6 * (time.perf_counter() - t1)
    rows.append(
      dict(
        tokens=m,
        from_tokens=lo,
        ms_per_token=1e3 * (t - t_lo) / (m - lo),
        push_us=push_us,
        whole_decode_us=whole_us,
        rss_mib=r,
      )
    )
    print(
      f"  tokens {lo:7d}-{m:7d}: {rows[-1]['ms_per_token']:.2f} ms/token, rss {r:.0f} MiB; "
      f"push {push_us:.1f} us, whole decode {whole_us:.0f} us",
      file=sys.stderr,
    )
    lo, t_lo = m, t
  s = session.stats
  return dict(
    tokens=done["n"],
    wall_s=wall_s,
    decode_s=s["decode_s"],
    prefill_s=s["prefill_s"],
    compile_s=s["compile_s"],
    tokens_per_s=s["tokens_per_s"],
    bookkeeping_text=f"{title} (first 4097 tokens, cycled)",
    rows=rows,
  )


def kernel(args) -> dict:
  backend = jax.default_backend()
  if backend not in ("gpu", "tpu"):
    return dict(run=False, reason=f"backend {backend}: Pallas runs here only interpreted")
  from kvjax.pallas_kernels.sink_attention import sink_attention

  rng = np.random.default_rng(0)
  B, N, K, H = 8, 32, 8, 128
  freq = 1.0 / (10000.0 ** (np.arange(0, H, 2, dtype=np.float32) / H))
  rows = []
  for S in args.cost_sizes:
    q = jnp.asarray(rng.standard_normal((B, 1, N, H)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((B, K, S, H)), jnp.bfloat16)  # the caches' layout
    v = jnp.asarray(rng.standard_normal((B, K, S, H)), jnp.bfloat16)
    count = jnp.asarray(rng.integers(S, 3 * S, B), jnp.int32)
    start = count - (S - 4)
    fns = {
      impl: jax.jit(
        lambda q, k, v, c, s, impl=impl: sink_attention(
          q, k, v, c, s, n_sink=4, freq=jnp.asarray(freq), scale=H**-0.5, impl=impl
        )
      )
      for impl in ("pallas", "xla")
    }
    outs = {impl: jax.block_until_ready(f(q, k, v, count, start)) for impl, f in fns.items()}
    err = float(jnp.abs(outs["pallas"][0] - outs["xla"][0]).max())
    times = {impl: [] for impl in fns}
    for _ in range(args.repeats):
      for impl, f in fns.items():
        times[impl] += _times_ms(functools.partial(f, q, k, v, count, start), 1)
    row = dict(
      cache=S,
      pallas_ms=statistics.median(times["pallas"]),
      xla_ms=statistics.median(times["xla"]),
      max_abs_diff=err,
    )
    row["speedup"] = row["xla_ms"] / row["pallas_ms"]
    rows.append(row)
  return dict(run=True, shape=dict(B=B, N=N, K=K, H=H, dtype="bfloat16"), rows=rows)


def _table(title: str, head: list[str], rows: list[list[str]]) -> list[str]:
  """A markdown table (first column left-aligned, the rest right) under a bold-led title."""
  return [
    title,
    "",
    "| " + " | ".join(head) + " |",
    "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    *("| " + " | ".join(r) + " |" for r in rows),
    "",
  ]


def markdown(res: dict) -> str:
  out = [f"Machine: {res['machine']}", ""]
  for name, table in (
    ("quality", quality_table),
    ("cost", cost_table),
    ("memory", memory_table),
    ("endless", endless_table),
    ("kernel", kernel_table),
  ):
    if name in res:
      out += table(res[name])
  return "\n".join(out)


def quality_table(q: dict) -> list[str]:
  return _table(
    f"**Quality**: bundled `shakespeare`, {q['tokens']:,} tokens of *{q['text']}* "
    f"(held out), cache {q['cache_size']} slots, fed token by token.",
    ["cache", "sinks + window", "ppl", "vs recompute", "ms/token"],
    [
      [
        r["name"],
        r["layout"],
        f"{r['ppl']:.2f}",
        f"{r['vs_recompute']:.3f}",
        f"{r['ms_per_token']:.2f}",
      ]
      for r in q["rows"]
    ],
  )


def cost_table(c: dict) -> list[str]:
  return _table(
    f"**Cost per token** ({c['model']}, {c['dtype']}, batch 1; medians):",
    ["cache", "sink decode ms", "recompute ms", "recompute / sink"],
    [
      [str(r["cache"]), f"{r['sink_ms']:.2f}", f"{r['recompute_ms']:.2f}", f"{r['ratio']:.1f}x"]
      for r in c["rows"]
    ],
  )


def memory_table(m: dict) -> list[str]:
  return _table(
    f"**Memory** (4 + 252 sink cache, {m['cache_bytes']:,} bytes; {m['text']}):",
    ["tokens streamed", "cache tokens", "process RSS MiB", "ppl of the last 4096"],
    [
      [
        f"{r['tokens']:,}",
        str(r["cache_tokens"]),
        f"{r['rss_mib']:.0f}",
        f"{r['segment_ppl']:.2f}",
      ]
      for r in m["rows"]
    ],
  )


def endless_table(e: dict) -> list[str]:
  return _table(
    f"**Endless stream, per-token wall time** (bundled `{MODEL}`, 4 + 252 sink "
    f"cache, temperature 1; {e['tokens']:,} tokens in {e['wall_s']:.0f} s, "
    f"{e['tokens_per_s']:.0f} tok/s as reported):",
    [
      "tokens",
      "ms per token",
      "detokenize us / token",
      "whole-reply decode us",
      "process RSS MiB",
    ],
    [
      [
        f"{r['from_tokens']:,}-{r['tokens']:,}",
        f"{r['ms_per_token']:.2f}",
        f"{r['push_us']:.1f}",
        f"{r['whole_decode_us']:,.0f}",
        f"{r['rss_mib']:.0f}",
      ]
      for r in e["rows"]
    ],
  )


def kernel_table(k: dict) -> list[str]:
  if not k["run"]:
    return [f"**Kernel vs XLA reference**: not run ({k['reason']}).", ""]
  return _table(
    f"**Kernel vs XLA reference** (one layer, {k['shape']}):",
    ["cache", "Pallas ms", "XLA ms", "XLA / Pallas", "max abs diff"],
    [
      [
        str(r["cache"]),
        f"{r['pallas_ms']:.3f}",
        f"{r['xla_ms']:.3f}",
        f"{r['speedup']:.2f}x",
        f"{r['max_abs_diff']:.1e}",
      ]
      for r in k["rows"]
    ],
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
  )
  p.add_argument(
    "--tokens",
    type=checked(int, lambda v: v >= 2, "an integer >= 2"),
    default=6144,
    help="held-out tokens for the quality part (default 6144)",
  )
  p.add_argument(
    "--cache-size",
    type=checked(int, lambda v: v >= 9, "an integer >= 9"),
    default=256,
    help="cache slots (sinks + window) for the quality part",
  )
  p.add_argument("--cost-sizes", default="256,512,1024,2048,4096")
  p.add_argument("--memory-tokens", type=positive, default=131072)
  p.add_argument(
    "--endless-tokens",
    type=checked(int, lambda v: v >= 1024, "an integer >= 1024"),
    default=131072,
    help="tokens of the endless stream (default 131072)",
  )
  p.add_argument("--repeats", type=positive, default=9)
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args(argv)
  parts = args.parts.split(",")
  bad = [x for x in parts if x not in PARTS]
  if bad:
    p.error(f"--parts: unknown {bad}; choose from {', '.join(PARTS)}")
  try:
    args.cost_sizes = [int(x) for x in args.cost_sizes.split(",")]
  except ValueError:
    p.error(f"--cost-sizes: expected comma-separated integers; got {args.cost_sizes!r}")
  if min(args.cost_sizes) < 8:
    p.error("--cost-sizes: each cache size must be >= 8")
  res = dict(machine=report.describe(), backend=jax.default_backend(), settings=vars(args))
  model = lm.load(MODEL) if {"quality", "memory", "endless"} & set(parts) else None
  for part in parts:
    print(f"{part}:", file=sys.stderr)
    res[part] = {
      "quality": lambda: quality(model, args),
      "cost": lambda: cost(args),
      "memory": lambda: memory(model, args),
      "endless": lambda: endless(model, args),
      "kernel": lambda: kernel(args),
    }[part]()
  report.publish(args.out, "streaming", res, markdown(res))
  return 0


if __name__ == "__main__":
  sys.exit(main())
