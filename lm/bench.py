"""Decode and prefill speed of one model on this machine, against its memory-bandwidth bound.

    kvjax bench --model DIR_OR_NAME [--batches 1,8] [--contexts 256,4096] [--json]

A decode cell (batch B, context C) prefills B random prompts of C tokens and times
`new_tokens` greedy steps of the jitted decode loop (every row runs every step; compilation
excluded, one warm-up run first). Its bound is the bytes one step must read, every weight that
a step touches once plus K and V at the mean context C + new_tokens / 2, over the memory
bandwidth measured in the same run (a large array copy: bytes read + written per second); the
cell reports the fraction of that bound it reaches. A prefill cell times one prompt of P tokens.
Medians of `repeats` runs, cells interleaved per repeat so that every cell sees the same load.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.lm.generate import generate
from kvjax.lm.model import Model


def bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> dict[str, float]:
  """Memory bandwidth of the default device in GB/s: `copy` (bytes read + written per second
  by a copy of an nbytes array; on the CPU a host memcpy, elsewhere a jitted copy on the device)
  and `read` (bytes per second of a jitted sum). Best of `repeats`."""
  n = nbytes // 4
  x = jnp.ones((n,), jnp.float32)
  if jax.default_backend() == "cpu":
    a, b = np.ones(n, np.float32), np.empty(n, np.float32)
    copy = lambda: np.copyto(b, a)
  else:
    f = jax.jit(lambda x: x + 1.0)
    copy = lambda: f(x).block_until_ready()
  total = jax.jit(jnp.sum)
  read = lambda: total(x).block_until_ready()
  out = {}
  for name, fn, moved in (("copy", copy, 2 * nbytes), ("read", read, nbytes)):
    fn()
    best = min(_seconds(fn) for _ in range(repeats))
    out[name] = moved / best / 1e9
  return out


def _seconds(fn: Callable[[], object]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def step_bytes(model: Model, batch: int, context: float) -> dict[str, float]:
  """Bytes one decode step reads: every param but the embedding table (a step reads B of its
  rows; a tied table is read whole as the LM head), and K and V of `context` slots per row."""
  cfg = model.cfg
  params = model.params()
  weights = sum(x.nbytes for x in jax.tree.leaves(params))
  if not cfg.tie_embeddings:
    weights -= params["embed"].nbytes
  itemsize = jnp.dtype(model.dtype).itemsize
  kv = 2 * cfg.n_layers * batch * cfg.n_kv_heads * cfg.head_dim * context * itemsize
  return dict(weights=float(weights), kv=float(kv), total=float(weights + kv))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Grid:
  """What to measure: decode cells batches x contexts, prefill cells of `prefill` tokens."""

  batches: tuple[int, ...] = (1, 8)
  contexts: tuple[int, ...] = (256, 4096)
  prefill: tuple[int, ...] = (256, 1024, 4096)
  new_tokens: int = 32
  repeats: int = 3
  seed: int = 0

  def check(self, model: Model) -> None:
    """ValueError unless every cell fits the model's context."""
    for name in ("batches", "contexts", "prefill"):
      values = getattr(self, name)
      if any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be integers >= 1; got {list(values)}")
    for name in ("new_tokens", "repeats"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
    # a decode cell runs new_tokens steps after its context; a prefill cell samples one token
    need = max((*(c + self.new_tokens for c in self.contexts), *(p + 1 for p in self.prefill)))
    if need > model.cfg.max_position:
      raise ValueError(
        f"the grid needs {need} positions (contexts {list(self.contexts)} + "
        f"{self.new_tokens} new tokens, prefill {list(self.prefill)} + 1), more "
        f"than the model's {model.cfg.max_position} positions"
      )


def prompts(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
  """[B, P] random token ids (the same for every implementation measured)."""
  return np.random.RandomState(seed).randint(0, vocab, (batch, length)).astype(np.int64)


def decode(model: Model, ids: np.ndarray, new_tokens: int) -> float:
  """Seconds per greedy decode step of lm.generate after prompts ids [B, C] (every row runs
  every step: no stop tokens)."""
  out = generate(model, ids.tolist(), max_new_tokens=new_tokens, stop_tokens=[])
  return out.stats["decode_s"] / new_tokens


def prefill(model: Model, ids: np.ndarray) -> float:
  """Seconds of lm.generate's prefill of prompts ids [B, P]."""
  return generate(model, ids.tolist(), max_new_tokens=1, stop_tokens=[]).stats["prefill_s"]


def cells(grid: Grid) -> list[tuple[str, int, int]]:
  """("decode", B, C) for every batch x context, then ("prefill", 1, P)."""
  return [("decode", b, c) for b in grid.batches for c in grid.contexts] + [
    ("prefill", 1, p) for p in grid.prefill
  ]


def run(
  model: Model,
  grid: Grid,
  *,
  peers: Mapping[str, Callable] | None = None,
  progress: Callable[[str], None] | None = None,
) -> dict:
  """Measures every cell of the grid: a warm-up round (kvjax's every cell, each peer's first),
  then `repeats` rounds over all cells.

  peers: {name: fn(kind, ids, new_tokens) -> seconds (per decode step, or of the prefill)},
  other implementations measured on the same prompts, interleaved with kvjax cell by cell.
  Returns {machine, bandwidth_gbs, grid, peers: [names], cells: [...]}; each cell has kind,
  batch, length, kvjax_s (median), runs, for decode cells mean_context, bytes_per_step,
  bound_s, fraction (bound / measured), and per peer peers[name] = {s (median), runs, ratio
  (s / kvjax_s: > 1 means kvjax is faster), and for decode cells fraction}.
  """
  grid.check(model)
  peers = dict(peers or {})
  if "kvjax" in peers:
    raise ValueError("a peer cannot be named 'kvjax'")
  vocab = model.cfg.vocab_size
  todo = [(kind, b, n, prompts(b, n, vocab, grid.seed)) for kind, b, n in cells(grid)]
  sides = {
    "kvjax": lambda kind, ids: (
      decode(model, ids, grid.new_tokens) if kind == "decode" else prefill(model, ids)
    )
  }
  for name, fn in peers.items():
    sides[name] = functools.partial(lambda fn, kind, ids: fn(kind, ids, grid.new_tokens), fn)
  times = {(name, i): [] for name in sides for i in range(len(todo))}
  # round 0 warms up: kvjax compiles a program per cell's shapes, so it runs every cell; the
  # peers compile nothing per shape and warm up on the first cell only (on a real model's grid
  # a peer's warm-up round would be most of its cost: batch 32 prefills 65,536 tokens)
  for r in range(grid.repeats + 1):
    for i, (kind, b, n, ids) in enumerate(todo):
      if progress:
        progress(
          f"{'warm-up' if r == 0 else f'round {r}/{grid.repeats}'}: {kind} B={b} "
          f"{'C' if kind == 'decode' else 'P'}={n}"
        )
      for name, fn in sides.items():
        if r == 0 and i and name != "kvjax":
          continue
        t = fn(kind, ids)
        if r:
          times[name, i].append(t)
  bw = bandwidth()
  out = []
  for i, (kind, b, n, _) in enumerate(todo):
    cell = dict(
      kind=kind,
      batch=b,
      length=n,
      kvjax_s=statistics.median(times["kvjax", i]),
      runs=times["kvjax", i],
    )
    if kind == "decode":
      ctx = n + grid.new_tokens / 2
      nb = step_bytes(model, b, ctx)
      cell.update(mean_context=ctx, bytes_per_step=nb, bound_s=nb["total"] / (bw["copy"] * 1e9))
      cell["fraction"] = cell["bound_s"] / cell["kvjax_s"]
      cell["kvjax_tok_s"] = b / cell["kvjax_s"]
    else:
      cell["kvjax_tok_s"] = b * n / cell["kvjax_s"]
    cell["peers"] = {}
    for name in peers:
      s = statistics.median(times[name, i])
      cell["peers"][name] = dict(s=s, runs=times[name, i], ratio=s / cell["kvjax_s"])
      if kind == "decode":
        cell["peers"][name]["fraction"] = cell["bound_s"] / s
    out.append(cell)
  return dict(
    machine=machine(), bandwidth_gbs=bw, grid=dataclasses.asdict(grid), peers=list(peers), cells=out
  )


def machine() -> dict:
  return dict(
    backend=jax.default_backend(),
    device=str(jax.devices()[0]),
    device_kind=jax.devices()[0].device_kind,
    platform=platform.platform(),
    processor=platform.processor() or platform.machine(),
    jax=jax.__version__,
  )


def markdown(report: dict) -> str:
  """The decode and prefill tables of `run`'s report, a pair of columns per peer."""
  bw = report["bandwidth_gbs"]
  peers = report.get("peers", [])
  cols = "".join(f" | {p} ms/step | kvjax speed / {p}" for p in peers)
  rule = " | ---: | ---:" * len(peers)
  lines = [
    f"Measured bandwidth: {bw['copy']:.1f} GB/s (array copy, read + write), "
    f"{bw['read']:.1f} GB/s (read).",
    "",
    f"| batch | context | kvjax ms/step | MB read/step | bound ms | kvjax share of bound{cols} |",
    f"| ---: | ---: | ---: | ---: | ---: | ---:{rule} |",
  ]
  for c in report["cells"]:
    if c["kind"] != "decode":
      continue
    row = (
      f"| {c['batch']} | {c['length']} | {c['kvjax_s'] * 1e3:.2f} | "
      f"{c['bytes_per_step']['total'] / 1e6:.1f} | {c['bound_s'] * 1e3:.2f} | "
      f"{c['fraction']:.0%}"
    )
    row += "".join(
      f" | {c['peers'][p]['s'] * 1e3:.2f} | {c['peers'][p]['ratio']:.2f}" for p in peers
    )
    lines.append(row + " |")
  cols = "".join(f" | {p} tokens/s | kvjax / {p}" for p in peers)
  lines += ["", f"| prefill tokens | kvjax tokens/s{cols} |", f"| ---: | ---:{rule} |"]
  for c in report["cells"]:
    if c["kind"] != "prefill":
      continue
    row = f"| {c['length']} | {c['kvjax_tok_s']:,.0f}"
    row += "".join(
      f" | {c['length'] / c['peers'][p]['s']:,.0f} | {c['peers'][p]['ratio']:.2f}" for p in peers
    )
    lines.append(row + " |")
  return "\n".join(lines) + "\n"


def parse_ints(text: str) -> tuple[int, ...]:
  """'1,8' -> (1, 8); ValueError with the expected form otherwise."""
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    raise ValueError(f"expected comma-separated integers such as 1,8; got {text!r}") from None
  if not values or min(values) < 1:
    raise ValueError(f"expected comma-separated integers >= 1; got {text!r}")
  return values
