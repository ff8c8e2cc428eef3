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
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.cache.view import Keys, new_keys
from kvjax.pallas_kernels import splits
from kvjax.pallas_kernels.precision import einsum_f32

BLOCK_K = 256  # key slots per block of the online softmax
BLOCK_Q = 256  # queries per block when T is long
FEW = 16
# For up to FEW queries (decode), key blocks hold about this many bytes of keys across the
# batch (B x K x slots x H), between 32 and 512 slots: a block's copy out of the stacked cache
# and its product stay in the core's cache. SmolLM2-135M, decode after 512 tokens, 2-core AMD
# EPYC (ms per step with blocks of 512 -> sized): batch 8 195.5 -> 85.6, batch 32 347.5 -> 241.2
# (benchmarks/profile_decode.py; docs/benchmarks.md).
FEW_BLOCK_BYTES = 512 * 1024
FEW_BLOCK_SLOTS = (32, 512)
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
  BLOCK_K, BLOCK_Q, read at trace time; `few_block` keys for up to FEW queries). differentiable:
  loops of static length (reverse-mode differentiable; every key block is visited, those no
  query sees masked), for training; else the trip counts skip them. dropout:
  (rate, key) drops each attention probability with that rate (the rest scaled by 1 / (1 -
  rate); the softmax's normaliser is the undropped one), the mask drawn per (block, query
  block, key block) from key. Scores and
  softmax in float32; returns [B, T, N, H] in q's dtype; a query that sees no key gets 0.
  """
  q0 = blocks[0].q
  B, T, N, H = q0.shape
  if block_k is None:
    k0 = blocks[0].k
    block_k = few_block(B, k0.shape[-3], H, k0.dtype.itemsize) if T <= FEW else BLOCK_K
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
    K = blocks[0].k.shape[-3]
    o, lse = partial
    parts.append(splits.carry_of(_heads_first(o.astype(jnp.float32), K), _heads_first(lse, K)))
  if len(parts) == 1:
    carry = parts[0]
  else:  # the parts stacked on a new axis -3: [B, K, G, C, T, .]
    carry = splits.combine(tuple(jnp.stack(x, axis=-3) for x in zip(*parts)))
  out, _ = splits.finish(carry)  # [B, K, G, T, H]
  return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q0.dtype)


def few_block(B: int, K: int, H: int, itemsize: int) -> int:
  """Key slots per block when few queries attend (decode): the largest power of two whose keys
  across the batch, B x K x slots x H x itemsize bytes, fit in FEW_BLOCK_BYTES, within
  FEW_BLOCK_SLOTS."""
  lo, hi = FEW_BLOCK_SLOTS
  slots = FEW_BLOCK_BYTES // (B * K * H * itemsize)
  return max(lo, min(hi, 1 << max(slots, 1).bit_length() - 1))


def _heads_first(x: jax.Array, K: int) -> jax.Array:
  """[B, T, N, H] -> [B, K, G, T, H]; [B, T, N] -> [B, K, G, T, 1]."""
  x = x if x.ndim == 4 else x.astype(jnp.float32)[..., None]
  B, T, N, H = x.shape
  return x.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)


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
  """One online-softmax step (`splits.online_step`). qg [B, K, G, tq, H]; k, v [B, K, n, H] or
  [K, n, H]; sees [B, tq, n] bool, or None when every query sees every key; carry (m, l [B, K,
  G, tq, 1], acc [B, K, G, tq, H]) float32; drop: (rate, key) of this step's probabilities, or
  None."""
  kk = "bknh" if k.ndim == 4 else "knh"
  s = einsum_f32(f"bkgth,{kk}->bkgtn", qg, k)
  vis = None if sees is None else sees[:, None, None]  # [B, 1, 1, tq, n]
  return splits.online_step(
    carry,
    s,
    vis,
    v,
    scale=scale,
    softcap=softcap,
    values=f"bkgtn,{kk}->bkgth",
    drop=drop,
  )


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


def _drop_at(dropout, t0, s0):
  """The dropout (rate, key) of the step over queries from t0 and keys from s0, or None."""
  if dropout is None:
    return None
  return dropout[0], jax.random.fold_in(jax.random.fold_in(dropout[1], t0), s0)


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
  """The carry (m, l [B, K, G, T, 1], acc [B, K, G, T, H]) float32 of one block's unnormalized
  softmax; differentiable, dropout: see `attend`."""
  q, keys = blk.q, blk.keys
  B, T, N, H = q.shape
  K = blk.k.shape[-3]
  S = blk.size
  qg = q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H], once
  if (block_k >= S and block_q >= T) or (differentiable and S * T <= TRAIN_ONE_STEP):
    # one step: no loop
    k, v = _read(blk.k, blk.layer, 0, S), _read(blk.v, blk.layer, 0, S)
    sees = _sees(keys, 0, T, 0, S, window)
    return _scores_step(
      splits.start(qg.shape[:4], H), qg, k, v, sees, scale, softcap, _drop_at(dropout, 0, 0)
    )
  scan = _Scan.of(blk, qg, window, even_blocks(S, block_k), min(block_q, T), scale, softcap)
  q_block = functools.partial(scan.q_block, differentiable=differentiable, dropout=dropout)
  n_qb = -(-T // scan.bq)
  if n_qb == 1:
    return q_block(0)

  def q_body(i, out):
    t0 = jnp.minimum(i * scan.bq, T - scan.bq)  # the last block overlaps: its rows recomputed
    part = q_block(t0)
    return tuple(jax.lax.dynamic_update_slice_in_dim(o, p, t0, axis=3) for o, p in zip(out, part))

  return jax.lax.fori_loop(0, n_qb, q_body, splits.start(qg.shape[:4], H))


def even_blocks(S: int, block: int) -> int:
  """The key-block size for S slots read at most `block` at a time: the same number of blocks
  (ceil(S / block)) made as even as possible (rounded up to a multiple of 8), so the last
  block, clamped to end at S, re-reads as few slots as possible (S = 1,088 read 512 at a time:
  three blocks of 368, not of 512 with the last re-reading 448 slots)."""
  if block >= S:
    return S
  n = -(-S // block)  # blocks
  size = -(-S // n)  # ceil(S / n)
  return min(S, block, -(-size // 8) * 8)


@dataclasses.dataclass(frozen=True)
class _Scan:
  """A key block read bk slots at a time for queries bq at a time, and which of its bk-slot
  key blocks any query can see at all: filled slots (up to `last`), and per query block the
  causal bound and the sliding window's lower bound (kb_max: each key block's largest key
  position in the window's frame, `none` for an empty one)."""

  blk: KeyBlock
  qg: jax.Array  # [B, K, G, T, H]
  window: jax.Array
  bk: int
  bq: int
  scale: float
  softcap: float | None
  kb_lo: jax.Array  # [n_kb] the key blocks' starts, the last clamped to end at S
  last: jax.Array  # [] the last filled slot (-1: none)
  kb_max: jax.Array  # [n_kb]

  none: ClassVar[int] = int(jnp.iinfo(jnp.int32).min)

  @classmethod
  def of(cls, blk: KeyBlock, qg, window, bk: int, bq: int, scale, softcap) -> _Scan:
    keys, S = blk.keys, blk.size
    n_kb = -(-S // bk)
    slot = jnp.arange(S)
    rows = max(keys.valid.shape[0], keys.k_pos.shape[0])
    valid = jnp.broadcast_to(keys.valid, (rows, S))
    k_pos = jnp.broadcast_to(keys.k_pos, (rows, S))
    k_pos_max = jnp.where(valid, k_pos, cls.none).max(0)  # [S]
    return cls(
      blk,
      qg,
      window,
      bk,
      bq,
      scale,
      softcap,
      kb_lo=jnp.minimum(jnp.arange(n_kb) * bk, S - bk),
      last=jnp.max(jnp.where(valid, slot, -1)),
      kb_max=jax.ops.segment_max(k_pos_max, slot // bk, n_kb),
    )

  def visible(self, t0) -> tuple[jax.Array, jax.Array]:
    """[lo, hi): the key blocks some query of [t0, t0 + bq) may see."""
    keys, bk, n_kb = self.blk.keys, self.bk, self.kb_lo.shape[0]
    hi = jnp.minimum(self.last // bk + 1, n_kb)  # blocks past `last`: empty
    if keys.causal:
      hi = jnp.minimum(hi, (t0 + self.bq - 1) // bk + 1)
    q_min = _take(keys.q_pos, 1, t0, self.bq).min()
    unseen = (self.window > 0) & ((self.kb_max == self.none) | (q_min - self.kb_max >= self.window))
    lo = jnp.where(unseen.all(), n_kb, jnp.argmin(unseen))
    return jnp.minimum(lo, hi), hi

  def q_block(self, t0, *, differentiable: bool, dropout):
    """The carry of queries [t0, t0 + bq) over the key blocks they can see."""
    blk, keys, bk, bq = self.blk, self.blk.keys, self.bk, self.bq
    S, n_kb = blk.size, self.kb_lo.shape[0]
    qb = _take(self.qg, 3, t0, bq)

    def body(j, carry, masked=True):
      s0 = self.kb_lo[j]
      k, v = _read(blk.k, blk.layer, s0, bk), _read(blk.v, blk.layer, s0, bk)
      sees = None
      if masked:  # a clamped last block: its slots before j * bk were visited already
        sees = _sees(keys, t0, bq, s0, bk, self.window) & (s0 + jnp.arange(bk) >= j * bk)
      drop = _drop_at(dropout, t0, s0)
      return _scores_step(carry, qb, k, v, sees, self.scale, self.softcap, drop)

    init = splits.start(qb.shape[:4], qb.shape[-1])
    if differentiable:  # static trip count: every key block, the unseen ones masked
      return jax.lax.fori_loop(0, n_kb, body, init)
    lo, hi = self.visible(t0)
    if keys.full and keys.causal and keys.mask is None:
      # blocks wholly below the causal diagonal (and not clamped) need no mask when there is
      # no window: every query of the block sees every key
      split = jnp.where(self.window == 0, jnp.clip((t0 + 1) // bk, lo, min(S // bk, n_kb)), lo)
      split = jnp.minimum(split, hi)
      init = jax.lax.fori_loop(lo, split, functools.partial(body, masked=False), init)
      lo = split
    return jax.lax.fori_loop(lo, hi, body, init)


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
  B, T, N, _ = q.shape
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
