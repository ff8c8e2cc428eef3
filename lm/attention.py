"""Masked grouped-query attention over several key blocks with one joint softmax, blocked.

Keys come in blocks (the cache's slots, a shared prefix, the step's new tokens), each scored
with its own rotation of the queries (`kvjax.cache.view`). Which keys a query sees is given by
factors (`Keys`: valid slots, causal order, positions for the sliding window, an optional
explicit mask), so masks are built per key block and never as a [T, S] array for long T.

A block longer than `block_k` keys is read `block_k` slots at a time with an online softmax
(flash attention in plain XLA): only the key blocks that some query of the query block can see
are visited (a dynamic trip count: the filled part of a cache, the causal triangle, the sliding
window), and queries are taken `block_q` at a time, so no [T, S] scores exist for long T. Cached
K/V are read from the cache's stacked [L, B, K, S, H] arrays `block_k` slots of one layer at a
time (a dynamic slice per block, which XLA's CPU backend materialises as a block-sized copy
before the dot); no step copies or transposes a layer's whole cache.

`reference` is the same attention with one unblocked softmax: the ground truth tests compare
against.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kvjax.cache.view import Keys, new_keys
from kvjax.pallas_kernels.splits import NEG

BLOCK_K = 256  # key slots per block of the online softmax
BLOCK_Q = 256  # queries per block when T is long
BLOCK_K_FEW = 512  # key slots per block when T <= FEW queries (decode): fewer, longer steps
FEW = 16
# the training forward scores a block of up to this many (query, key) pairs in one step: its
# backward keeps the [T, S] probabilities anyway, and one matmul beats a loop of small ones
# on the CPU (a 12-layer d 256 model at T = 1,024: 554 against 387 tokens/s)
TRAIN_ONE_STEP = 2048 * 2048


@dataclasses.dataclass(frozen=True)
class KeyBlock:
  """One key block and the queries scored against it.

  q: [B, T, N, H] queries, rotated in this block's frame. k, v: [B, K, S, H] per-row keys, or
  [K, S, H] keys every row reads (a shared prefix), each optionally with a leading layer axis
  read at `layer` (a traced int: the cache's stacked arrays, read in place). keys: which keys
  each query sees (`kvjax.cache.view.Keys`, whose factors are sized S)."""

  q: jax.Array
  k: jax.Array
  v: jax.Array
  keys: Keys
  layer: jax.Array | None = None

  @property
  def size(self) -> int:
    return self.k.shape[-2]


@dataclasses.dataclass(frozen=True)
class Training:
  """The training forward (never passed by an inference path): attention loops of static
  length, so reverse-mode differentiation works at any length (blocks no query sees are masked
  instead of skipped), and dropout. rate: residual dropout of each layer's attention and MLP
  outputs; attn_rate: of the attention probabilities; key: a PRNG key, folded per layer and
  per (query block, key block)."""

  rate: float = 0.0
  attn_rate: float = 0.0
  key: jax.Array | None = None


def attend(
  blocks: Sequence[KeyBlock],
  *,
  scale: float,
  softcap: float | None = None,
  window: jax.Array | int = 0,
  partial: tuple[jax.Array, jax.Array] | None = None,
  block_k: int | None = None,
  block_q: int | None = None,
  differentiable: bool = False,
  dropout: tuple[float, jax.Array] | None = None,
) -> jax.Array:
  """Softmax attention over the union of the blocks' keys.

  window: the layer's sliding window (0 = none): a query sees only keys at distance < window.
  partial: the softmax over further keys computed elsewhere (a kernel), as (o [B, T, N, H]
  float32 its normalized output, lse [B, T, N] its log-sum-exp, NEG when empty), merged into
  the same softmax. block_k, block_q: key slots and queries per block (default the module's
  BLOCK_K, BLOCK_Q, read at trace time; BLOCK_K_FEW keys for up to FEW queries). differentiable:
  loops of static length (reverse-mode differentiable; every key block is visited, those no
  query sees masked), for training; else the trip counts skip them. dropout:
  (rate, key) drops each attention probability with that rate (the rest scaled by 1 / (1 -
  rate); the softmax's normaliser is the undropped one), the mask drawn per (block, query
  block, key block) from key. Scores and
  softmax in float32; returns [B, T, N, H] in q's dtype; a query that sees no key gets 0.
  """
  q0 = blocks[0].q
  B, T, N, H = q0.shape
  block_k = block_k or (BLOCK_K_FEW if T <= FEW else BLOCK_K)
  block_q = block_q or BLOCK_Q
  window = jnp.asarray(window, jnp.int32)
  parts = [
    _block(
      b,
      scale,
      softcap,
      window,
      block_k,
      block_q,
      differentiable,
      None if dropout is None else (dropout[0], jax.random.fold_in(dropout[1], i)),
    )
    for i, b in enumerate(blocks)
  ]
  if partial is not None:
    o, lse = partial
    K = parts[0][0].shape[1]
    m = _heads_first(lse.astype(jnp.float32), K)  # [B, K, G, T]
    l = (m > NEG / 2).astype(jnp.float32)
    acc = _heads_first(o.astype(jnp.float32), K) * l[..., None]  # [B, K, G, T, H]
    parts.append((acc, m, l))
  m = parts[0][1]
  for _, mi, _ in parts[1:]:
    m = jnp.maximum(m, mi)
  acc, l = 0.0, 0.0
  for ai, mi, li in parts:
    w = jnp.exp(mi - m)
    acc, l = acc + ai * w[..., None], l + li * w
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [B, K, G, T, H]
  return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q0.dtype)


def _heads_first(x: jax.Array, K: int) -> jax.Array:
  """[B, T, N, ...] -> [B, K, G, T, ...]."""
  B, T, N = x.shape[:3]
  x = x.reshape(B, T, K, N // K, *x.shape[3:])
  return jnp.moveaxis(x, 1, 3)


def _read(a: jax.Array, layer, lo, n: int) -> jax.Array:
  """Slots [lo, lo + n) of a key/value operand: [B, K, n, H] or [K, n, H] (lo + n <= S)."""
  if layer is not None:
    idx = (layer,) + (0,) * (a.ndim - 3) + (lo, 0)
    return jax.lax.dynamic_slice(a, idx, (1, *a.shape[1:-2], n, a.shape[-1]))[0]
  idx = (0,) * (a.ndim - 2) + (lo, 0)
  return jax.lax.dynamic_slice(a, idx, (*a.shape[:-2], n, a.shape[-1]))


def _take(x: jax.Array | None, axis: int, lo, n: int):
  return None if x is None else jax.lax.dynamic_slice_in_dim(x, lo, n, axis)


def _scores_step(carry, qg, k, v, sees, scale, softcap, drop=None):
  """One online-softmax step. qg [B, K, G, tq, H]; k, v [B, K, n, H] or [K, n, H]; sees
  [B, tq, n] bool, or None when every query sees every key; carry (acc [B, K, G, tq, H],
  m, l [B, K, G, tq]) float32; drop: (rate, key) of this step's probabilities, or None."""
  acc, m, l = carry
  kk = "bknh" if k.ndim == 4 else "knh"
  s = jnp.einsum(f"bkgth,{kk}->bkgtn", qg, k, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    s = jnp.tanh(s / softcap) * softcap
  if sees is not None:  # None: every query sees every key of the block (no mask to apply)
    vis = sees[:, None, None]  # [B, 1, 1, tq, n]
    s = jnp.where(vis, s, NEG)
  m_new = jnp.maximum(m, s.max(-1))
  e = jnp.exp(s - m_new[..., None])
  if sees is not None:
    e = jnp.where(vis, e, 0.0)
  alpha = jnp.exp(m - m_new)
  kept = e
  if drop is not None:
    rate, key = drop
    kept = jnp.where(jax.random.bernoulli(key, 1.0 - rate, e.shape), e / (1.0 - rate), 0.0)
  pv = jnp.einsum(f"bkgtn,{kk}->bkgth", kept.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return acc * alpha[..., None] + pv, m_new, l * alpha + e.sum(-1)


def _sees(keys: Keys, t0, tq: int, s0, n: int, window) -> jax.Array:
  """[B, tq, n] bool: whether queries [t0, t0 + tq) see keys [s0, s0 + n) of the block."""
  valid = _take(keys.valid, 1, s0, n)[:, None, :]  # [B|1, 1, n]
  q_pos = _take(keys.q_pos, 1, t0, tq)[:, :, None]  # [B, tq, 1]
  k_pos = _take(keys.k_pos, 1, s0, n)[:, None, :]  # [B|1, 1, n]
  sees = valid & ((window == 0) | (q_pos - k_pos < window))
  if keys.causal:
    t = t0 + jnp.arange(tq)[:, None]
    sees = sees & (s0 + jnp.arange(n)[None, :] <= t)[None]
  if keys.mask is not None:
    sees = sees & _take(_take(keys.mask, 1, t0, tq), 2, s0, n)
  return sees


def _block(
  blk: KeyBlock,
  scale,
  softcap,
  window,
  block_k: int,
  block_q: int,
  differentiable: bool = False,
  dropout=None,
):
  """(acc [B, K, G, T, H], m, l [B, K, G, T]) float32: the unnormalized softmax of one block;
  differentiable, dropout: see `attend`."""

  def drop_at(t0, s0):
    if dropout is None:
      return None
    return dropout[0], jax.random.fold_in(jax.random.fold_in(dropout[1], t0), s0)

  q, keys = blk.q, blk.keys
  B, T, N, H = q.shape
  K = blk.k.shape[-3]
  G = N // K
  S = blk.size
  f32 = jnp.float32
  qg = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H], once
  if (block_k >= S and block_q >= T) or (differentiable and S * T <= TRAIN_ONE_STEP):
    # one step: no loop
    init = (
      jnp.zeros((B, K, G, T, H), f32),
      jnp.full((B, K, G, T), NEG, f32),
      jnp.zeros((B, K, G, T), f32),
    )
    k, v = _read(blk.k, blk.layer, 0, S), _read(blk.v, blk.layer, 0, S)
    return _scores_step(
      init, qg, k, v, _sees(keys, 0, T, 0, S, window), scale, softcap, drop_at(0, 0)
    )

  bk, bq = min(block_k, S), min(block_q, T)
  n_kb, n_qb = -(-S // bk), -(-T // bq)
  # which key blocks any query can see at all: filled slots, and per query block the causal
  # bound and the sliding window's lower bound (positions in the window's frame)
  kb_lo = jnp.minimum(jnp.arange(n_kb) * bk, S - bk)  # clamped block starts
  slot = jnp.arange(S)
  rows = max(keys.valid.shape[0], keys.k_pos.shape[0])
  valid = jnp.broadcast_to(keys.valid, (rows, S))
  last = jnp.max(jnp.where(valid, slot, -1))  # last filled slot
  none = jnp.iinfo(jnp.int32).min
  k_pos_max = jnp.where(valid, jnp.broadcast_to(keys.k_pos, (rows, S)), none).max(0)  # [S]
  kb_max = jax.ops.segment_max(k_pos_max, slot // bk, n_kb)  # [n_kb], none: empty

  def q_block(t0):
    """acc, m, l of queries [t0, t0 + bq)."""
    hi = jnp.minimum(last // bk + 1, n_kb)  # blocks past `last`: empty
    if keys.causal:
      hi = jnp.minimum(hi, (t0 + bq - 1) // bk + 1)
    q_min = _take(keys.q_pos, 1, t0, bq).min()
    far = (window > 0) & ((kb_max == none) | (q_min - kb_max >= window))  # [n_kb] unseen
    lo = jnp.where(far.all(), n_kb, jnp.argmin(far))
    lo = jnp.minimum(lo, hi)
    qb = _take(qg, 3, t0, bq)

    def body(j, carry, masked=True):
      s0 = kb_lo[j]
      k, v = _read(blk.k, blk.layer, s0, bk), _read(blk.v, blk.layer, s0, bk)
      sees = (
        _sees(keys, t0, bq, s0, bk, window) & (s0 + jnp.arange(bk) >= j * bk) if masked else None
      )
      return _scores_step(carry, qb, k, v, sees, scale, softcap, drop_at(t0, s0))

    init = (
      jnp.zeros((B, K, G, bq, H), f32),
      jnp.full((B, K, G, bq), NEG, f32),
      jnp.zeros((B, K, G, bq), f32),
    )
    if differentiable:  # static trip count: every key block, the unseen ones masked
      return jax.lax.fori_loop(0, n_kb, body, init)
    if keys.full and keys.causal and keys.mask is None:
      # blocks wholly below the causal diagonal (and not clamped) need no mask when there is
      # no window: every query of the block sees every key
      split = jnp.where(window == 0, jnp.clip((t0 + 1) // bk, lo, min(S // bk, n_kb)), lo)
      split = jnp.minimum(split, hi)
      init = jax.lax.fori_loop(lo, split, functools.partial(body, masked=False), init)
      lo = split
    return jax.lax.fori_loop(lo, hi, body, init)

  if n_qb == 1:
    return q_block(0)
  out = (
    jnp.zeros((B, K, G, T, H), f32),
    jnp.full((B, K, G, T), NEG, f32),
    jnp.zeros((B, K, G, T), f32),
  )

  def q_body(i, out):
    t0 = jnp.minimum(i * bq, T - bq)  # the last block overlaps: its rows are recomputed alike
    part = q_block(t0)
    return tuple(jax.lax.dynamic_update_slice_in_dim(o, p, t0, axis=3) for o, p in zip(out, part))

  return jax.lax.fori_loop(0, n_qb, q_body, out)


CAUSAL_IMPLS = ("xla", "cudnn", "tpu_flash")


def causal(
  q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, impl: str | None = None
) -> jax.Array:
  """Causal self-attention of a prompt with no cache, no window and no softcap (the prefill
  of most models), through the best kernel of the device: one dispatch.

  q [B, T, N, H] and k, v [B, K, T, H] (the caches' layout), N % K == 0, query t sees keys
  [0, t]. impl: "xla" (`attend`: blocked online softmax, the CPU path and the reference),
  "cudnn" (`jax.nn.dot_product_attention`, cuDNN's flash attention on GPU, XLA elsewhere) or
  "tpu_flash" (`jax.experimental.pallas.ops.tpu.flash_attention`, whose blocks need T % 128
  == 0); None picks by backend (on TPU the XLA path for a T the kernel cannot tile).
  Returns [B, T, N, H] in q's dtype."""
  B, T, N, H = q.shape
  if impl is None:
    impl = {"gpu": "cudnn", "tpu": "tpu_flash"}.get(jax.default_backend(), "xla")
    impl = "xla" if impl == "tpu_flash" and T % 128 else impl
  if impl not in CAUSAL_IMPLS:
    raise ValueError(f"impl must be one of {CAUSAL_IMPLS} or None; got {impl!r}")
  K = k.shape[1]
  if impl == "xla":
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return attend([KeyBlock(q, k, v, new_keys(positions))], scale=scale)
  if impl == "cudnn":
    out = jax.nn.dot_product_attention(
      q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), scale=scale, is_causal=True
    )
    return out.astype(q.dtype)
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

  G = N // K
  kv = lambda a: jnp.repeat(a, G, axis=1) if G > 1 else a
  out = tpu_flash.flash_attention(
    q.transpose(0, 2, 1, 3), kv(k), kv(v), causal=True, sm_scale=scale
  )
  return out.transpose(0, 2, 1, 3).astype(q.dtype)


def reference(
  blocks: Sequence[KeyBlock],
  *,
  scale: float,
  softcap: float | None = None,
  window: jax.Array | int = 0,
  partial: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
  """`attend` with every block read whole and one softmax: [B, T, S] masks and scores."""
  big = 1 << 30
  return attend(
    blocks, scale=scale, softcap=softcap, window=window, partial=partial, block_k=big, block_q=big
  )
