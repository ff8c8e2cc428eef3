"""Sink-aware rolling attention: T queries read a StreamingLLM cache (kvjax.cache.sink).

The cache holds, per row, n_sink sink slots and a ring of W slots with keys stored *before*
RoPE (layout in `kvjax.cache.sink`). The attention computes each slot's stream token from the
row's fill level, assigns it its in-cache position (sinks 0..n_sink-1, then the kept window in
chronological order), rotates the keys by those positions and attends, all in one pass over the
cache. It covers the cache part of a step's read only and returns the partial softmax (o, lse),
which the caller merges with the step's own tokens (`kvjax.lm.attention.attend(partial=...)`).

Per query j (stream index i = count + t_j; t_j = j unless the queries are a draft tree, where
t_j is node j's depth), the per-token policy of the cache:
  sees sink slot s < min(count, n_sink), scored at distance p - s, where p is its in-cache
    position (i for i < n_sink, else n_sink + i - first);
  sees the kept window tokens idx in [first, i), first = max(start, i - W + 1), at distance
    i - idx;
  and on sliding-window layers (window > 0) only keys at distance < window.
RoPE scores depend only on the distance, so the window is scored in one frame per row (keys at
idx - base, queries at i - base) and the sinks in another (keys at s, queries at p).

    sink_attention(q, k, v, count, start, n_sink=4, freq=rope.inv_freq(cfg, layer=l), scale=...)

dispatches to the Pallas kernel on GPU/TPU and to `reference` (plain XLA) elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kvjax.pallas_kernels import rope, splits
from kvjax.pallas_kernels.precision import einsum_f32

STEPS = 4  # key blocks per program: a chunk of STEPS * block slots
COUNT, START, WINDOW = range(3)  # the columns of the kernel's per-row scalar table (SMEM)


def sink_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  count: jax.Array,
  start: jax.Array,
  *,
  n_sink: int,
  freq: jax.Array,
  scale: float,
  window: jax.Array | int = 0,
  softcap: float | None = None,
  impl: str | None = None,
  interpret=False,
  block: int = 128,
  steps: int = STEPS,
  rotation: tuple[jax.Array, jax.Array] | None = None,
  offsets: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The cache part of a step's attention, as a partial softmax.

  q: [B, T, N, H] queries before RoPE of stream tokens count + offsets (default
    count..count+T-1).
  k, v: [B, K, n_sink + W, H] one layer of a SinkCache (keys before RoPE); N % K == 0.
  count, start: [B] int, the cache's fill levels (`SinkCache.count`, `.start`).
  freq: [H/2] RoPE inverse frequencies. window: sliding window of the layer (0 = none).
  impl: "pallas" or "xla"; None picks Pallas on GPU/TPU, else XLA. interpret: for "pallas"
    off-device: True (generic interpreter) or `pltpu.InterpretParams()` (TPU semantics).
  block: slots per key block (rounded down to a power of two <= S); steps: key blocks per
    program (the grid splits each row's keys into chunks of steps * block slots).
  offsets: [B, T] int >= 0, each query's stream offset from count (default arange(T); a
    draft tree's nodes give their depths: the nodes of one depth read the same cache keys).
  rotation: the RoPE tables (cos, sin) [B, S, H/2] of `key_positions`, when the caller has
    them (the XLA path uses them; the kernels compute their own).
  Returns o [B, T, N, H] float32 (softmax-weighted values over the visible cache keys, 0 for a
  query that sees none) and lse [B, T, N] float32 (their log-sum-exp, NEG when none).
  """
  B, T = _check(q, k, v, count, start, n_sink, freq, offsets)[:2]
  launch = splits.launch(impl, interpret, block, steps)
  window = jnp.asarray(window, jnp.int32)
  offsets = _offsets(offsets, B, T)
  geometry = dict(n_sink=n_sink, freq=freq, scale=scale, window=window, softcap=softcap)
  if launch is None:
    return reference(q, k, v, count, start, **geometry, rotation=rotation, offsets=offsets)
  return _pallas(q, k, v, count, start, offsets, **geometry, launch=launch)


def _offsets(offsets: jax.Array | None, B: int, T: int) -> jax.Array:
  """[B, T] int32 stream offsets of the queries (default 0..T-1 in every row)."""
  if offsets is None:
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return jnp.asarray(offsets, jnp.int32)


def _check(q, k, v, count, start, n_sink, freq, offsets=None):
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(
      f"q must be [B, T, N, H] and k, v [B, K, S, H]; got q{list(q.shape)}, k{list(k.shape)}"
    )
  B, T, N, H = q.shape
  _, K, S, _ = k.shape
  if k.shape != v.shape or k.shape[0] != B or k.shape[3] != H or N % K:
    raise ValueError(
      f"k and v must both be [B={B}, K, S, H={H}] with N={N} a multiple of K; "
      f"got k{list(k.shape)}, v{list(v.shape)}"
    )
  if not isinstance(n_sink, int) or not 0 <= n_sink < S:
    raise ValueError(
      f"n_sink must be an int in [0, S={S}) (the ring needs >= 1 slot); got {n_sink!r}"
    )
  for name, x in (("count", count), ("start", start)):
    if jnp.shape(x) != (B,) or not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
      raise ValueError(
        f"{name} must be an int array of shape ({B},); got "
        f"{jnp.asarray(x).dtype}{list(jnp.shape(x))}"
      )
  if jnp.shape(freq) != (H // 2,) or H % 2:
    raise ValueError(f"freq must be [H/2] = [{H // 2}] (even H); got {list(jnp.shape(freq))}")
  if offsets is not None and (
    jnp.shape(offsets) != (B, T) or not jnp.issubdtype(jnp.asarray(offsets).dtype, jnp.integer)
  ):
    raise ValueError(
      f"offsets must be an int array of shape ({B}, {T}) (each query's stream offset); got "
      f"{jnp.asarray(offsets).dtype}{list(jnp.shape(offsets))}"
    )
  return B, T, N, H


# ---- the cache's geometry, shared by the kernel and the reference (broadcasting int arrays) ----


def query_positions(t, count, start, n_sink: int, W: int):
  """t: query offsets in the step; count, start broadcast against t. Returns (i stream index,
  first oldest window token seen, p in-cache position, window-frame position i - base, base).
  Shared with `SinkCache.view`, which scores the step's own tokens in the same two frames."""
  i = count + t
  first = jnp.maximum(start, i - W + 1)
  p = jnp.where(i < n_sink, i, n_sink + i - first)
  base = jnp.maximum(start, count - W + 1) - n_sink
  return i, first, p, i - base, base


def key_positions(count: jax.Array, start: jax.Array, n_sink: int, S: int) -> jax.Array:
  """[B, S] int32: the RoPE position each slot's key is rotated to, in its frame (sinks at
  their slot, window keys in the window frame), for caches at count, start [B]."""
  c, st = count[:, None].astype(jnp.int32), start[:, None].astype(jnp.int32)
  _, _, _, _, base = query_positions(jnp.zeros((1, 1), jnp.int32), c, st, n_sink, S - n_sink)
  slot = jnp.arange(S, dtype=jnp.int32)[None]
  return _slots(slot, c, st, base, n_sink, S - n_sink)[2]


def _slots(slot, count, start, base, n_sink: int, W: int):
  """slot: cache slot indices. Returns (idx: the stream token a slot holds, kept: whether it is
  held, rope position of its key in its frame)."""
  last = count - 1
  wraps = n_sink // W + 2  # keeps the remainder's argument >= 0 (count >= 0, slot < n_sink + W)
  ring = last - jax.lax.rem(last - slot + wraps * W, W)
  sink = slot < n_sink
  idx = jnp.where(sink, slot, ring)
  kept = jnp.where(sink, slot < count, (ring >= start) & (ring >= n_sink) & (ring <= last))
  return idx, kept, jnp.where(sink, slot, idx - base)


def _visible(slot, idx, kept, i, first, p, n_sink: int, window):
  """Whether a query (i, first, p) sees a slot (idx, kept): shapes broadcast."""
  sink = slot < n_sink
  dist = jnp.where(sink, p - slot, i - idx)
  return kept & (sink | (idx >= first)) & ((window == 0) | (dist < window))


# ---- plain XLA ----


def reference(
  q,
  k,
  v,
  count,
  start,
  *,
  n_sink: int,
  freq,
  scale: float,
  window=0,
  softcap: float | None = None,
  rotation: tuple[jax.Array, jax.Array] | None = None,
  offsets: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """`sink_attention` in plain XLA (same arguments and results)."""
  B, T, N, H = q.shape
  K, S = k.shape[1], k.shape[2]
  G, W = N // K, S - n_sink
  c, st = count[:, None].astype(jnp.int32), start[:, None].astype(jnp.int32)
  t = _offsets(offsets, B, T)
  i, first, p, q_win, base = query_positions(t, c, st, n_sink, W)  # [B, T]; base [B, 1]
  slot = jnp.arange(S, dtype=jnp.int32)[None]
  idx, kept, k_pos = _slots(slot, c, st, base, n_sink, W)  # [B, S]
  k = rope.rotate(k, *(rotation or rope.tables(k_pos, freq)), heads_first=True)

  def scores(q_pos, keys):  # operands in their dtype, products in float32
    qg = rope.apply(q, q_pos, freq).reshape(B, T, K, G, H)
    return einsum_f32("btkgh,bksh->bkgts", qg, keys)

  s = scores(q_win, k[:, :, n_sink:])
  if n_sink:
    s = jnp.concatenate([scores(p, k[:, :, :n_sink]), s], axis=-1)
  vis = _visible(
    slot[:, None],
    idx[:, None],
    kept[:, None],
    i[..., None],
    first[..., None],
    p[..., None],
    n_sink,
    window,
  )[:, None, None]  # [B, 1, 1, T, S]
  probs, lse = splits.softmax(s, vis, scale=scale, softcap=softcap)
  o = einsum_f32("bkgts,bksh->btkgh", probs.astype(v.dtype), v)
  return o.reshape(B, T, N, H), lse


# ---- Pallas ----


def _pallas(
  q, k, v, count, start, offsets, *, n_sink, freq, scale, window, softcap, launch: splits.Launch
):
  """Flash decoding over a grid (row, kv head, key split): each program reads one chunk of
  `steps` key blocks of `bs` slots of one (row, kv head) in place from the cache's
  [B, K, S, H] layout, carries an online softmax across its blocks (stopping at the row's
  filled slots), and leaves a partial softmax; `splits.merge` joins the chunks. Every grid
  axis is parallel: no program waits for another, so a long cache feeds many cores.

  Query rows are laid out (G, Tp) per kv head, Tp a power of two >= 16 (Triton's dot needs
  >= 16 rows, TPU tiles 8), each row's stream offset beside it in an [R, 1] block. Blocks are
  (R, H) queries and (chunk, H) keys: H is the whole last dim and chunk a multiple of 8 (TPU
  tiling); a last chunk past S is masked (its slots >= S are never seen, their values
  zeroed). launch: the lowering (Mosaic TPU with scalars in SMEM, or Triton) and the block
  sizes."""
  layout = splits.sizes(q, k, launch.block, launch.steps)
  B, T, _, H, K, S, G, Tp, R, bs, chunk, _ = layout
  meta = jnp.stack(
    [
      count.astype(jnp.int32),
      start.astype(jnp.int32),
      jnp.broadcast_to(window, (B,)).astype(jnp.int32),
    ],
    axis=1,
  )  # [B, 3]: COUNT, START, WINDOW
  freq2 = jnp.concatenate([freq, freq]).astype(jnp.float32)[None]  # [1, H]
  # [B, G Tp, 1] each query row's stream offset, in the rows' (G, Tp) order
  offs = jnp.tile(jnp.pad(offsets, ((0, 0), (0, Tp - T))), (1, G))[..., None]
  operands = (meta, splits.pack_queries(q, K, Tp), offs, k, v, jnp.asarray(_rotate_half(H)), freq2)
  kernel = functools.partial(
    _kernel,
    n_sink=n_sink,
    W=S - n_sink,
    S=S,
    bs=bs,
    n_sub=chunk // bs,
    scale=scale,
    softcap=softcap,
  )
  cost = _cost(
    q, k, v, count, start, n_sink=n_sink, freq=freq, scale=scale, window=window, softcap=softcap
  )
  in_specs = [
    pl.BlockSpec((None, None, R, H), lambda b, h, c: (b, h, 0, 0)),  # query rows [B, K, R, H]
    pl.BlockSpec((None, R, 1), lambda b, h, c: (b, 0, 0)),  # their stream offsets [B, R, 1]
    splits.kv_spec(layout),
    splits.kv_spec(layout),
    pl.BlockSpec((H, H), lambda b, h, c: (0, 0)),
    pl.BlockSpec((1, H), lambda b, h, c: (0, 0)),
  ]
  return splits.call(kernel, operands, in_specs, layout, launch, cost=cost, name="sink_attention")


def _rotate_half(H: int) -> np.ndarray:
  """[H, H] float32 rot with x @ rot = rotate_half(x) = [-x2, x1] (RoPE as a matmul)."""
  half = H // 2
  rot = np.zeros((H, H), np.float32)
  rot[np.arange(half) + half, np.arange(half)] = -1.0
  rot[np.arange(half), np.arange(half) + half] = 1.0
  return rot


def _cost(q, k, v, count, start, *, n_sink, freq, scale, window, softcap) -> pl.CostEstimate:
  """The kernel's cost estimate: that of `reference` on the same operands."""
  return pl.estimate_cost(
    lambda q, k, v, c, s, f, w: reference(
      q, k, v, c, s, n_sink=n_sink, freq=f, scale=scale, window=w, softcap=softcap
    ),
    *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, count, start, freq, window)),
  )


def _kernel(
  meta_ref,
  q_ref,
  offs_ref,
  k_ref,
  v_ref,
  rot_ref,
  freq_ref,
  o_ref,
  lse_ref,
  *,
  n_sink,
  W,
  S,
  bs,
  n_sub,
  scale,
  softcap,
):
  """One (row b, kv head, chunk c): q_ref [R, H]; offs_ref [R, 1] the query rows' stream
  offsets; k_ref, v_ref [chunk, H] slots
  [c * chunk, (c + 1) * chunk); o_ref [R, H]; lse_ref [R, 1]."""
  b, c = pl.program_id(0), pl.program_id(2)
  count, start, window = meta_ref[b, COUNT], meta_ref[b, START], meta_ref[b, WINDOW]
  R, H = q_ref.shape
  f32 = jnp.float32
  c0 = c * (bs * n_sub)  # the chunk's first slot
  t = offs_ref[...]
  i, first, p, q_win, base = query_positions(t, count, start, n_sink, W)  # [R, 1]
  freq, rot = freq_ref[...], rot_ref[...]

  def tables(pos):  # pos [n, 1] -> RoPE (cos, sin) [n, H]
    angle = pos.astype(f32) * freq
    return jnp.cos(angle), jnp.sin(angle)

  def rotary(x, cos_sin):  # x [n, H] f32
    turned = jnp.dot(x, rot, preferred_element_type=f32, precision=jax.lax.Precision.HIGHEST)
    return x * cos_sin[0] + turned * cos_sin[1]

  dtype = k_ref.dtype
  q = q_ref[...].astype(f32)
  q_w = rotary(q, tables(q_win)).astype(dtype)
  q_s = rotary(q, tables(p)).astype(dtype) if n_sink else None

  def body(j, carry, dual):
    """Key block j of the chunk: its slots' geometry and RoPE tables, then one online step."""
    lo = j * bs
    col = c0 + lo + jax.lax.broadcasted_iota(jnp.int32, (bs, 1), 0)  # [bs, 1] for keys
    row = c0 + lo + jax.lax.broadcasted_iota(jnp.int32, (1, bs), 1)  # [1, bs] for scores
    _, kept_col, key_pos = _slots(col, count, start, base, n_sink, W)
    idx, kept, _ = _slots(row, count, start, base, n_sink, W)
    vis = _visible(row, idx, kept, i, first, p, n_sink, window) & (row < S)  # [R, bs]
    keys = rotary(k_ref[pl.ds(lo, bs), :].astype(f32), tables(key_pos)).astype(dtype)
    s = splits.dot_nt(q_w, keys)  # [R, bs]
    if dual:
      s = jnp.where(row < n_sink, splits.dot_nt(q_s, keys), s)
    vals = v_ref[pl.ds(lo, bs), :]
    live = jnp.broadcast_to(kept_col & (col < S), vals.shape)  # past S: any bits
    vals = jnp.where(live, vals, jnp.zeros_like(vals))
    return splits.online_step(carry, s, vis, vals, scale=scale, softcap=softcap)

  filled = jnp.minimum(count, S)  # slots at and past `count` were never written
  n_live = jnp.clip(splits.cdiv_pow2(filled - c0, bs), 0, n_sub)
  carry = splits.start(R, H)
  if n_sink:  # leading blocks holding sink slots score against both query frames
    n_dual = jnp.clip(splits.cdiv_pow2(n_sink - c0, bs), 0, n_live)
    carry = jax.lax.fori_loop(0, n_dual, functools.partial(body, dual=True), carry)
  else:
    n_dual = 0
  carry = jax.lax.fori_loop(n_dual, n_live, functools.partial(body, dual=False), carry)
  o_ref[...], lse_ref[...] = splits.finish(carry)
