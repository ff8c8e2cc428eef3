"""StreamingLLM: quality, per-token cost and memory of the sink cache vs its baselines, one run.

    python benchmarks/streaming.py                      # all parts, ~23 min on 2 CPU cores
    python benchmarks/streaming.py --parts cost,kernel  # on a GPU: the cost and kernel rows

Parts (--parts, comma-separated):
  quality  Perplexity of --model (default the bundled `shakespeare`) on the first --tokens
           tokens of a held-out play (test split, not a comedy) through each cache policy
           (`kvjax.lm.streaming.perplexity`: per-token eviction, chunks of 256 per forward):
           `dense` once (on as many tokens as the model's context holds), then per cache
           size in --cache-sizes `window` (no sinks), `recompute` (the last C tokens
           recomputed from scratch, for every --recompute-every-th token, the quality
           baseline) and `sink` with 1/2/4/8 sinks (window = C - sinks), the shape of the
           StreamingLLM paper's Table 2; with a PNG of perplexity over position.
  cost     Per-token latency at cache sizes --cost-sizes of a random-weight model with
           --model's shape and room for twice the largest size: `sink` = one jitted decode
           step over a full sink cache (4 sinks); `recompute` = one jitted forward over the
           last S tokens (what the recompute baseline pays per token). Medians of --repeats
           timed steps after a warm-up, alternating the two; ratio recompute / sink.
  memory   Streams --memory-tokens tokens (the held-out plays one after another, cycled
           when too few) through a 4 + --stream-window sink cache, 512 per forward:
           cache bytes, the process's resident memory and the perplexity of the latest
           4,096 tokens at each power of two.
  endless  One sampled stream of --endless-tokens tokens through a 4 + --stream-window sink cache
           (`streaming.Session`, as `kvjax stream` runs it): wall time per token between
           the pieces the caller receives over each doubling of the stream, and what the
           text bookkeeping costs per token (incremental detokenisation vs a decode of the
           whole reply so far, the cost of re-decoding at every token).
  kernel   Sink-attention decode latency, Pallas kernel vs the XLA reference
           (`kvjax.pallas_kernels.sink_attention`), one layer, batch 8, 32 query / 8 kv heads,
           head dim 128, bf16, at each cost size. Only on GPU/TPU: on CPU Pallas runs only
           interpreted, so the part is reported as not run.

Writes <out>/streaming_<backend>.json (machine, settings, every measurement),
<out>/streaming_<backend>.md (the tables, also printed) and, with the quality part,
<out>/streaming_<backend>_ppl.png; a --model other than the default adds its name and a
subset of --parts adds theirs (streaming_<name>_<part>-<part>_<backend>.*).

    python benchmarks/streaming.py --model smollm2-135m-instruct --parts quality \
        --tokens 20480 --cache-sizes 256,1024 --recompute-every 128
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
from tqdm import tqdm

from kvjax import lm
from kvjax.cache.sink import SinkCache
from kvjax.lm import steps, streaming
from kvjax.lm.cli import checked, positive
from kvjax.lm.detokenize import Detokenizer

MODEL = "shakespeare"
PARTS = ("quality", "cost", "memory", "endless", "kernel")
SINKS = (1, 2, 4, 8)  # sink 0 is the window row
BLOCK = 512  # tokens per point of the perplexity-over-position curve


def _held_out_plays(model, **filters) -> list[tuple[str, np.ndarray]]:
  """(title, token ids) of each held-out play (the corpus's test split, `filters` applied)."""
  from kvjax.train import corpus

  docs = corpus.load_documents(corpus.builder(), "test", **filters)
  return [(d.title, np.asarray(model.tokenizer.encode(d.text), np.int32)) for d in docs]


def held_out_tokens(model, n: int) -> tuple[np.ndarray, str]:
  """The first n tokens of the first held-out non-comedy play (test split), and its title."""
  for title, ids in _held_out_plays(model, exclude_genres=["comedy"]):
    if len(ids) >= n:
      return ids[:n], title
  raise SystemExit(f"no held-out play has {n} tokens")


def _ppl(nll: np.ndarray) -> float | None:
  """exp(mean) over the scored (non-NaN) tokens; None when none was scored."""
  nll = nll[~np.isnan(nll)]
  return float(np.exp(nll.mean())) if len(nll) else None


def _ratio(a: np.ndarray, b: np.ndarray, after: int) -> float | None:
  """ppl of a / ppl of b over the positions both scored past `after` (by nll [N] by position,
  NaN where unscored); None when there are none."""
  both = ~np.isnan(a) & ~np.isnan(b) & (np.arange(len(a)) > after)
  return _ppl(a[both]) / _ppl(b[both]) if both.any() else None


def quality(model, args) -> dict:
  """The paper's Table 2 on one held-out text: dense once (on as many tokens as the model's
  context holds), then per cache size C window (no sinks), recompute (every
  --recompute-every-th token after the first window) and sink with SINKS sinks + C - s.
  Each row's ppl is over the tokens it scored; `vs_recompute` and `vs_dense` compare it with
  recompute's and dense's on the tokens both scored after the cache first evicted (positions
  > C: the first C tokens see the same context under every policy)."""
  ids, title = held_out_tokens(model, args.tokens)
  n_dense = min(len(ids), model.cfg.max_position)
  runs = [("dense", None, dict(cache="dense"))]  # (name, cache size, perplexity's kwargs)
  for C in args.cache_sizes:
    runs += [
      ("window", C, dict(cache="window", window=C)),
      ("recompute", C, dict(cache="recompute", window=C, every=args.recompute_every)),
    ]
    runs += [(f"sink {k}", C, dict(cache="sink", n_sink=k, window=C - k)) for k in SINKS]
  rows, by_pos = [], {}  # by_pos: nll by position (index in ids), NaN where unscored
  for name, C, kw in runs:
    t0 = time.perf_counter()
    r = streaming.perplexity(
      model, ids[:n_dense] if C is None else ids, progress=not args.quiet, **kw
    )
    layout = "all" if C is None else f"{kw.get('n_sink', 0)} + {kw['window']}"
    print(f"  {name:10s} {layout:>11s}  ppl {r.ppl:8.3f}", file=sys.stderr)
    by_pos[name, C] = np.full(len(ids), np.nan)
    by_pos[name, C][r.positions] = r.nll
    rows.append(
      dict(
        name=name,
        cache_size=C,
        layout=layout,
        ppl=r.ppl,
        tokens=r.tokens,
        peak_cache_tokens=r.peak_cache_tokens,
        ms_per_token=r.ms_per_token,
        wall_s=time.perf_counter() - t0,
      )
    )
  for row in rows:  # recompute and dense come before the rows they are compared with
    C, nll = row["cache_size"], by_pos[row["name"], row["cache_size"]]
    row["vs_recompute"] = _ratio(nll, by_pos["recompute", C], after=C) if C else None
    row["vs_dense"] = _ratio(nll, by_pos["dense", None], after=C or 0)
    row["block_ppl"] = [_ppl(nll[lo : lo + BLOCK]) for lo in range(1, len(ids), BLOCK)]
  return dict(
    model=args.model,
    text=title,
    tokens=len(ids),
    dense_tokens=n_dense,
    cache_sizes=args.cache_sizes,
    recompute_every=args.recompute_every,
    block=BLOCK,
    rows=rows,
  )


def plot_quality(q: dict, path: str) -> None:
  """Perplexity over position (per BLOCK tokens): window vs sink 4 (and dense), per cache."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sizes = q["cache_sizes"]
  fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
  x = [min(lo + q["block"], q["tokens"]) for lo in range(1, q["tokens"], q["block"])]
  for ax, C in zip(axes[0], sizes):
    for r in q["rows"]:
      if r["cache_size"] in (C, None) and r["name"] in ("dense", "window", "sink 4"):
        y = [np.nan if v is None else v for v in r["block_ppl"]]
        label = f"{r['name']} ({r['layout']})" if r["cache_size"] else "dense"
        ax.plot(x, y, label=label, lw=1.2)
    ax.axvline(C, color="grey", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel(f"perplexity per {q['block']} tokens")
    ax.set_title(f"{q['model']}, cache {C} slots")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def cost_model(name: str, max_size: int):
  """A random model with the shape of model `name` and room for 2 * max_size positions."""
  cfg = lm.load(name).cfg
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
  model = cost_model(args.model, max(args.cost_sizes))
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
  return dict(model=f"random, shape of {args.model}", dtype=str(model.dtype), rows=rows)


def held_out_stream(model, n: int) -> tuple[np.ndarray, str]:
  """n tokens of the held-out plays (test split, every genre) one after another, cycled when
  they hold fewer, and what they are."""
  plays = [ids for _, ids in _held_out_plays(model)]
  text = np.concatenate(plays)
  what = f"the {len(plays)} held-out plays one after another ({len(text):,} tokens"
  what += f", cycled {-(-n // len(text))}x)" if n > len(text) else ")"
  return np.tile(text, -(-n // len(text)))[:n], what


def memory(model, args) -> dict:
  """--memory-tokens of held-out text through one n_sink + --stream-window sink cache, fed
  in chunks of 512 (per-token eviction): at each power of two of the stream, the cache's
  bytes and tokens, the process's resident memory and the perplexity of the latest 4,096."""
  n, W = args.memory_tokens, args.stream_window
  ids, text = held_out_stream(model, n + 1)
  cache = SinkCache.init(**model.cfg.cache_dims, batch=1, n_sink=4, window=W, dtype=model.dtype)
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
  C, rows, nll, t0 = 512, [], np.zeros(n, np.float32), time.perf_counter()
  bar = tqdm(total=n, desc="memory", unit="tok", disable=args.quiet, dynamic_ncols=True)
  for lo in range(0, n, C):
    done = min(lo + C, n)
    (part, cache), _ = steps.call(
      model,
      steps.nll_chunk,
      cache,
      jnp.asarray(np.pad(ids[lo:done], (0, C - (done - lo)))[None]),
      jnp.asarray(np.pad(ids[lo + 1 : done + 1], (0, C - (done - lo)))[None]),
      jnp.asarray([done - lo], jnp.int32),
    )
    nll[lo:done] = np.asarray(part[0])[: done - lo]
    bar.update(done - lo)
    marks = [m for m in (2**i for i in range(12, 40)) if lo < m <= done]
    marks += [n] if done == n and n not in marks else []
    for m in marks:
      rows.append(
        dict(
          tokens=m,
          cache_tokens=int(cache.length[0]),
          cache_bytes=sum(x.nbytes for x in jax.tree.leaves(cache)),
          rss_mib=report.rss_mib(),
          segment_ppl=float(np.exp(nll[max(0, m - 4096) : m].mean())),
          elapsed_s=time.perf_counter() - t0,
        )
      )
  bar.close()
  return dict(model=args.model, window=W, text=text, cache_bytes=cache_bytes, rows=rows)


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
    window=args.stream_window,
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
      rss.append(report.rss_mib())
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
    model=args.model,
    window=args.stream_window,
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
  def num(v, fmt):
    return "-" if v is None else format(v, fmt)

  every = q.get("recompute_every", 1)
  title = (
    f"**Quality**: `{q['model']}`, {q['tokens']:,} tokens of *{q['text']}* (held out), "
    f"fed through each cache (chunks evict per token, as if fed one at a time); dense "
    f"on the first {q['dense_tokens']:,} tokens"
    + (f"; recompute scores every {every}th token after its first window" if every > 1 else "")
    + ". vs recompute / vs dense: perplexity ratio on the tokens both scored past the first "
    "C (where eviction starts)."
  )
  return _table(
    title,
    ["cache", "slots", "sinks + window", "tokens", "ppl", "vs recompute", "vs dense", "ms/token"],
    [
      [
        r["name"],
        num(r["cache_size"], ","),
        r["layout"],
        f"{r['tokens']:,}",
        f"{r['ppl']:.2f}",
        num(r["vs_recompute"], ".3f"),
        num(r["vs_dense"], ".3f"),
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
    f"**Memory** (`{m.get('model', MODEL)}`, 4 + {m.get('window', 252)} sink cache, "
    f"{m['cache_bytes']:,} bytes; {m['text']}):",
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
    f"**Endless stream, per-token wall time** (`{e.get('model', MODEL)}`, "
    f"4 + {e.get('window', 252)} sink "
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
    "--model",
    default=MODEL,
    help=f"model name or directory for quality, cost, memory, endless (default {MODEL})",
  )
  p.add_argument(
    "--cache-sizes",
    default="256",
    help="comma-separated cache slots (sinks + window) for the quality part, each >= 9",
  )
  p.add_argument(
    "--recompute-every",
    type=positive,
    default=1,
    help="recompute scores every K-th token after its first window (default 1: all)",
  )
  p.add_argument("--cost-sizes", default="256,512,1024,2048,4096")
  p.add_argument("--memory-tokens", type=positive, default=131072)
  p.add_argument(
    "--stream-window",
    type=positive,
    default=252,
    help="window slots beside 4 sinks for the memory and endless parts (default 252)",
  )
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
  for flag, least in (("cost_sizes", 8), ("cache_sizes", 9)):
    text = getattr(args, flag)
    try:
      setattr(args, flag, [int(x) for x in text.split(",")])
    except ValueError:
      p.error(f"--{flag.replace('_', '-')}: expected comma-separated integers; got {text!r}")
    if min(getattr(args, flag)) < least:
      p.error(f"--{flag.replace('_', '-')}: each cache size must be >= {least}")
  res = dict(machine=report.describe(), backend=jax.default_backend(), settings=vars(args))
  model = lm.load(args.model) if {"quality", "memory", "endless"} & set(parts) else None
  for part in parts:
    print(f"{part}:", file=sys.stderr)
    res[part] = {
      "quality": lambda: quality(model, args),
      "cost": lambda: cost(args),
      "memory": lambda: memory(model, args),
      "endless": lambda: endless(model, args),
      "kernel": lambda: kernel(args),
    }[part]()
  name = "streaming" if args.model == MODEL else f"streaming_{os.path.basename(args.model)}"
  if set(parts) != set(PARTS):
    name += "_" + "-".join(parts)
  stem = report.publish(args.out, name, res, markdown(res))
  if "quality" in res:
    plot_quality(res["quality"], stem + "_ppl.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
