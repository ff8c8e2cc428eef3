"""Tree attention: T draft-tree tokens read a dense cache and their own ancestry (EAGLE).

Speculative decoding verifies a whole draft tree in one target forward: every tree token
attends to the row's filled cache slots and, among the tree tokens, to its ancestors and
itself. The cache (`kvjax.cache.dense.KVCache`) holds keys after RoPE, and the caller rotates
the queries and the tree's own keys, so the kernel scores plain dot products. It covers every
key of the step (cache and tree) and returns the softmax as (o, lse), the partial-softmax
contract of `kvjax.pallas_kernels.sink_attention` (`kvjax.lm.attention.attend(partial=...)`).

Per row b, tree token i (position q_pos[b, i]):
  sees cache slot s iff s < length[b], and on sliding-window layers (window > 0)
    q_pos[b, i] - pos[b, s] < window;
  sees tree token j iff tree_mask[b, i, j], and on sliding-window layers
    q_pos[b, i] - q_pos[b, j] < window.

    tree_attention(q, k, v, length, k_new, v_new, q_pos, pos, tree_mask, scale=...)

dispatches to the Pallas kernel on GPU/TPU and to `reference` (plain XLA) elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kvjax.pallas_kernels import splits
from kvjax.pallas_kernels.precision import einsum_f32

STEPS = 4  # key blocks per program: a chunk of STEPS * block slots
LENGTH, WINDOW = range(2)  # the columns of the kernel's per-row scalar table (SMEM)


def tree_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  length: jax.Array,
  k_new: jax.Array,
  v_new: jax.Array,
  q_pos: jax.Array,
  pos: jax.Array,
  tree_mask: jax.Array,
  *,
  scale: float,
  window: jax.Array | int = 0,
  softcap: float | None = None,
  impl: str | None = None,
  interpret=False,
  block: int = 128,
  steps: int = STEPS,
) -> tuple[jax.Array, jax.Array]:
  """A draft tree's attention over the cache and its own ancestry, as a softmax (o, lse).

  q: [B, T, N, H] queries of the T tree tokens, after RoPE.
  k, v: [B, K, S, H] one layer of a dense cache (keys after RoPE), N % K == 0; slots
    [0, length[b]) are filled, the rest are never read into the result (any contents).
  length: [B] int, filled slots per row. pos: [B, S] int, the position in each slot.
  k_new, v_new: [B, K, T, H] the tree tokens' keys (after RoPE) and values.
  q_pos: [B, T] int, the tree tokens' positions.
  tree_mask: [B, T, T] bool, tree_mask[b, i, j] = token i sees token j (ancestor or self).
  window: sliding window of the layer (0 = none), an int or an int32 scalar (traced is fine).
  impl: "pallas" or "xla"; None picks Pallas on GPU/TPU, else XLA. interpret: for "pallas"
    off-device: True (generic interpreter) or `pltpu.InterpretParams()` (TPU semantics).
  block: cache slots per key block of the kernel (rounded down to a power of two <= S);
  steps: key blocks per program (the grid splits each row's cache into chunks of steps *
    block slots).
  Returns o [B, T, N, H] float32 (softmax-weighted values over the visible keys, 0 for a query
  that sees none) and lse [B, T, N] float32 (their log-sum-exp, NEG when none).
  """
  _check(q, k, v, length, k_new, v_new, q_pos, pos, tree_mask)
  launch = splits.launch(impl, interpret, block, steps)
  window = jnp.asarray(window, jnp.int32)
  args = (q, k, v, length, k_new, v_new, q_pos, pos, tree_mask)
  if launch is None:
    return reference(*args, scale=scale, window=window, softcap=softcap)
  return _pallas(*args, scale=scale, window=window, softcap=softcap, launch=launch)


def _check(q, k, v, length, k_new, v_new, q_pos, pos, tree_mask):
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(
      f"q must be [B, T, N, H] and k, v [B, K, S, H]; got q{list(q.shape)}, k{list(k.shape)}"
    )
  B, T, N, H = q.shape
  _, K, S, _ = k.shape
  if k.shape != v.shape or k.shape[0] != B or k.shape[3] != H or S < 1 or N % K:
    raise ValueError(
      f"k and v must both be [B={B}, K, S >= 1, H={H}] with N={N} a multiple "
      f"of K; got k{list(k.shape)}, v{list(v.shape)}"
    )
  if k_new.shape != (B, K, T, H) or v_new.shape != (B, K, T, H):
    raise ValueError(
      f"k_new and v_new must both be [B, K, T, H] = {[B, K, T, H]}; got "
      f"k_new{list(k_new.shape)}, v_new{list(v_new.shape)}"
    )
  for name, x, shape in (("length", length, (B,)), ("q_pos", q_pos, (B, T)), ("pos", pos, (B, S))):
    if jnp.shape(x) != shape or not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
      raise ValueError(
        f"{name} must be an int array of shape {shape}; got "
        f"{jnp.asarray(x).dtype}{list(jnp.shape(x))}"
      )
  if jnp.shape(tree_mask) != (B, T, T) or jnp.asarray(tree_mask).dtype != jnp.bool_:
    raise ValueError(
      f"tree_mask must be a bool array of shape ({B}, {T}, {T}) (T from q); got "
      f"{jnp.asarray(tree_mask).dtype}{list(jnp.shape(tree_mask))}"
    )


# ---- visibility, shared by the kernel and the reference (broadcasting int arrays) ----


def _sees_slot(slot, slot_pos, length, q_pos, window):
  """Whether a query at q_pos sees cache slot `slot` holding position slot_pos."""
  return (slot < length) & ((window == 0) | (q_pos - slot_pos < window))


def _sees_tree(tree_mask, q_pos, window):
  """tree_mask [B, T, T] narrowed to the sliding window: [B, T, T] bool."""
  dist = q_pos[:, :, None] - q_pos[:, None, :]
  return tree_mask & ((window == 0) | (dist < window))


# ---- plain XLA ----


def reference(
  q,
  k,
  v,
  length,
  k_new,
  v_new,
  q_pos,
  pos,
  tree_mask,
  *,
  scale: float,
  window=0,
  softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """`tree_attention` in plain XLA (same arguments and results)."""
  B, T, N, H = q.shape
  K, S = k.shape[1], k.shape[2]
  G = N // K
  length, q_pos = length.astype(jnp.int32), q_pos.astype(jnp.int32)
  slot = jnp.arange(S, dtype=jnp.int32)[None, None]  # [1, 1, S]
  vis = jnp.concatenate(
    [
      _sees_slot(
        slot, pos[:, None].astype(jnp.int32), length[:, None, None], q_pos[..., None], window
      ),
      _sees_tree(tree_mask, q_pos, window),
    ],
    axis=-1,
  )[:, None, None]  # [B, 1, 1, T, S+T]
  v = jnp.where((slot[0] < length[:, None])[:, None, :, None], v, 0)  # free slots: any bits
  # operands in the cache's dtype (as the kernel reads them), products in float32
  qg = q.astype(k.dtype).reshape(B, T, K, G, H)
  s = jnp.concatenate(
    [einsum_f32("btkgh,bksh->bkgts", qg, keys.astype(k.dtype)) for keys in (k, k_new)], axis=-1
  )  # [B, K, G, T, S+T]
  probs, lse = splits.softmax(s, vis, scale=scale, softcap=softcap)
  o = sum(
    einsum_f32("bkgts,bksh->btkgh", p.astype(v.dtype), vals.astype(v.dtype))
    for p, vals in ((probs[..., :S], v), (probs[..., S:], v_new))
  )
  return o.reshape(B, T, N, H), lse


# ---- Pallas ----


def _pallas(
  q, k, v, length, k_new, v_new, q_pos, pos, tree_mask, *, scale, window, softcap, launch
):
  """Flash decoding over a grid (row, kv head, key split): each program reads one chunk of
  `steps` key blocks of `bs` cache slots of one (row, kv head) in place from the cache's
  [B, K, S, H] layout, with an online softmax across its blocks up to the row's length (a
  dynamic trip count: blocks of free slots are never read); the first chunk also scores the
  T tree keys. `splits.merge` joins the chunks' partial softmaxes. Every grid axis is
  parallel.

  Query rows are laid out (G, Tp) per kv head, Tp a power of two >= 16 (row r is tree token
  r & (Tp - 1); Triton's dot needs >= 16 rows, TPU tiles 8); the tree's keys are padded to Tp
  (padding masked). Blocks: queries (R, H), keys (chunk, H) with H the whole last dim and
  chunk a multiple of 8 (TPU tiling); a last chunk past S is masked and its values zeroed.
  The slots' positions come pre-cut into the same blocks ([n_split, n_sub, bs]) and the tree
  mask (narrowed to the window) pre-tiled to the query rows ([R, Tp]), so the kernel only
  slices along sublanes. launch (a `splits.Launch`): the lowering (Mosaic TPU with scalars in
  SMEM, or Triton) and the block sizes."""
  layout = splits.sizes(q, k, launch.block, launch.steps)
  _, _, _, H, _, S, _, Tp, R, bs, chunk, _ = layout
  n_sub = chunk // bs
  operands = _operands(
    q, k, v, length, k_new, v_new, q_pos, pos, tree_mask, window, Tp=Tp, chunk=chunk, bs=bs
  )
  head = lambda n: pl.BlockSpec((None, None, n, H), lambda b, h, c: (b, h, 0, 0))
  row = lambda *shape: pl.BlockSpec((None, *shape), lambda b, h, c: (b,) + (0,) * len(shape))
  kernel = functools.partial(_kernel, bs=bs, n_sub=n_sub, S=S, scale=scale, softcap=softcap)
  args = (q, k, v, length, k_new, v_new, q_pos, pos, tree_mask, window)
  cost = pl.estimate_cost(
    lambda *a: reference(*a[:-1], scale=scale, window=a[-1], softcap=softcap),
    *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args),
  )
  in_specs = [
    head(R),
    splits.kv_spec(layout),
    splits.kv_spec(layout),
    head(Tp),
    head(Tp),
    row(R, 1),
    pl.BlockSpec((None, None, n_sub, bs), lambda b, h, c: (b, c, 0, 0)),
    row(R, Tp),
  ]
  return splits.call(kernel, operands, in_specs, layout, launch, cost=cost, name="tree_attention")


def _operands(q, k, v, length, k_new, v_new, q_pos, pos, tree_mask, window, *, Tp, chunk, bs):
  """The kernel's operands in its layout: (meta [B, 2] (LENGTH, WINDOW), queries [B, K, R, H],
  k, v, the tree's keys and values [B, K, Tp, H], query positions [B, R, 1], slot positions
  [B, n_split, n_sub, bs] (-1 past S), tree mask [B, R, Tp] int)."""
  B, T = q.shape[:2]
  K, S = k.shape[1], k.shape[2]
  G = q.shape[2] // K
  i32 = jnp.int32

  def pad_t(x, axes):  # pads the tree axes `axes` of x from T to Tp
    return jnp.pad(x, [(0, Tp - T) if a in axes else (0, 0) for a in range(x.ndim)])

  qr = splits.pack_queries(q.astype(k.dtype), K, Tp)  # [B, K, R, H]
  q_rows = jnp.tile(pad_t(q_pos.astype(i32), (1,)), (1, G))[..., None]  # [B, R, 1]
  n_split = -(-S // chunk)
  slot_pos = jnp.pad(pos.astype(i32), ((0, 0), (0, n_split * chunk - S)), constant_values=-1)
  slot_pos = slot_pos.reshape(B, n_split, chunk // bs, bs)  # the key blocks' positions
  seen = pad_t(_sees_tree(tree_mask, q_pos.astype(i32), window), (1, 2))
  seen = jnp.tile(seen, (1, G, 1)).astype(i32)  # [B, R, Tp]
  kn = pad_t(k_new.astype(k.dtype), (2,))  # [B, K, Tp, H]
  vn = pad_t(v_new.astype(v.dtype), (2,))
  meta = jnp.stack([length.astype(i32), jnp.broadcast_to(window, (B,)).astype(i32)], axis=1)
  return meta, qr, k, v, kn, vn, q_rows, slot_pos, seen


def _kernel(
  meta_ref,
  q_ref,
  k_ref,
  v_ref,
  kn_ref,
  vn_ref,
  qp_ref,
  sp_ref,
  seen_ref,
  o_ref,
  lse_ref,
  *,
  bs,
  n_sub,
  S,
  scale,
  softcap,
):
  """One (row b, kv head, chunk c): q_ref [R, H]; k_ref, v_ref [chunk, H] slots
  [c * chunk, (c + 1) * chunk); kn_ref, vn_ref [Tp, H]; qp_ref [R, 1] query positions; sp_ref
  [n_sub, bs] slot positions per key block; seen_ref [R, Tp] int tree mask; o_ref [R, H];
  lse_ref [R, 1]."""
  b, c = pl.program_id(0), pl.program_id(2)
  length, window = meta_ref[b, LENGTH], meta_ref[b, WINDOW]
  R, H = q_ref.shape
  c0 = c * (bs * n_sub)
  q_pos = qp_ref[...]  # [R, 1]
  q = q_ref[...]  # [R, H]
  update = functools.partial(splits.online_step, scale=scale, softcap=softcap)

  def body(j, carry):
    """Key block j of the chunk. Masks are built at full shape from iotas (no broadcasting of
    boolean vectors)."""
    lo = j * bs
    slot = c0 + lo + jax.lax.broadcasted_iota(jnp.int32, (R, bs), 1)  # [R, bs]
    vis = _sees_slot(slot, sp_ref[pl.ds(j, 1), :], length, q_pos, window)
    vals = v_ref[pl.ds(lo, bs), :]  # [bs, H]
    live = c0 + lo + jax.lax.broadcasted_iota(jnp.int32, (bs, H), 0) < length
    vals = jnp.where(live, vals, jnp.zeros_like(vals))  # free slots: any bits
    return update(carry, splits.dot_nt(q, k_ref[pl.ds(lo, bs), :]), vis, vals)

  n_live = jnp.clip(splits.cdiv_pow2(jnp.minimum(length, S) - c0, bs), 0, n_sub)
  carry = jax.lax.fori_loop(0, n_live, body, splits.start(R, H))
  tree_vis = (seen_ref[...] != 0) & (c == 0)  # [R, Tp]: chunk 0 only
  o_ref[...], lse_ref[...] = splits.finish(
    update(carry, splits.dot_nt(q, kn_ref[...]), tree_vis, vn_ref[...])
  )
