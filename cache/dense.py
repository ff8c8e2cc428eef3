"""Dense KV cache: a pytree of per-layer keys/values stacked on a leading layer axis."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kvjax.cache.view import NEW, Keys, View


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k", "v", "pos", "length"], meta_fields=[])
@dataclasses.dataclass
class KVCache:
  """Keys after RoPE. Invariants: row b's slots [0, length[b]) hold its tokens in order,
  `pos[b, s]` is the position of the token in slot s (nondecreasing; equal to s unless
  coprocessor latents share a position), slots at and past `length[b]` are free
  (their contents are undefined and never attended).

  k, v: [L, B, S, K, H]; pos: [B, S] int32; length: [B] int32.
  """

  k: jax.Array
  v: jax.Array
  pos: jax.Array
  length: jax.Array

  @classmethod
  def init(cls, *, n_layers: int, batch: int, size: int, n_kv_heads: int, head_dim: int,
           dtype=jnp.float32) -> KVCache:
    shape = (n_layers, batch, size, n_kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               pos=jnp.full((batch, size), -1, jnp.int32), length=jnp.zeros((batch,), jnp.int32))

  @property
  def size(self) -> int:
    return self.k.shape[2]

  @property
  def batch(self) -> int:
    return self.k.shape[1]

  def layer_slots(self, start: int, stop: int) -> tuple[jax.Array, jax.Array]:
    """(k, v) [L', B, S, K, H] of layers [start, stop): what the decoder scans over."""
    return self.k[start:stop], self.v[start:stop]

  def visible(self) -> jax.Array:
    """[B, S] bool: the filled slots."""
    return jnp.arange(self.size)[None, :] < self.length[:, None]

  def next_position(self) -> jax.Array:
    """[B] int32: the position of each row's next token, one past the highest position it
    holds and at least 0 (= length, unless coprocessor latents were inserted at earlier
    positions)."""
    return jnp.maximum(jnp.max(jnp.where(self.visible(), self.pos, -1), axis=1) + 1, 0)

  def view(self, T: int, positions: jax.Array | None = None,
           mask: jax.Array | None = None) -> View:
    """How T new tokens attend: the filled slots, then themselves causally.

    positions: [B, T], default next_position() + arange(T). mask: [B, T, S + T] bool over (slots, new
    tokens) replacing the default; unfilled slots stay masked."""
    B, S = self.batch, self.size
    if positions is None:
      positions = self.next_position()[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    if mask is None:
      cache_mask = jnp.broadcast_to(self.visible()[:, None], (B, T, S))
      new_mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    else:
      cache_mask, new_mask = mask[:, :, :S] & self.visible()[:, None], mask[:, :, S:]
    return View(q_pos=(positions,), new_pos=positions, blocks=(
        Keys((0, S), 0, cache_mask, positions[:, :, None] - self.pos[:, None, :]),
        Keys(NEW, 0, new_mask, positions[:, :, None] - positions[:, None, :])))

  def tree_view(self, positions: jax.Array, tree: jax.Array) -> View:
    """How T draft-tree tokens attend (EAGLE verification): every filled slot, and among
    themselves the tree's ancestry, in one kernel (`kvjax.pallas_kernels.tree_attention`).

    positions: [B, T] (length + the node's depth); tree: [B, T, T] bool, tree[b, i, j] = node
    j is node i or one of its ancestors."""
    read = functools.partial(_tree_read, length=self.length, pos=self.pos, q_pos=positions,
                             tree=tree)
    return View(q_pos=(positions,), new_pos=positions, blocks=(), cache_read=read,
                reads_new=True)

  def write(self, k: jax.Array, v: jax.Array, positions: jax.Array, n_new: jax.Array,
            layers: tuple[int, int] | None = None, advance: bool = True) -> KVCache:
    """Stores T new tokens per row at slots [length, length + T); advances length by n_new.

    k, v: [L', B, T, K, H] for the layers `layers` = [start, stop) (all when None);
    positions: [B, T]; n_new: [B] count of real (non-padding) tokens, <= T. With
    advance=False the length stays, so a later write for other layers of the same tokens
    lands in the same slots. Slots past `size` are dropped: callers check capacity first.
    """
    start, stop = layers or (0, self.k.shape[0])
    B, T = positions.shape
    slots = self.length[:, None] + jnp.arange(T)[None, :]  # [B, T]
    rows = jnp.arange(B)[:, None]
    new_k = self.k.at[start:stop, rows, slots].set(k.astype(self.k.dtype), mode="drop")
    new_v = self.v.at[start:stop, rows, slots].set(v.astype(self.v.dtype), mode="drop")
    real = jnp.arange(T)[None, :] < n_new[:, None]
    pos = self.pos.at[rows, slots].set(jnp.where(real, positions, -1), mode="drop")
    length = self.length + n_new if advance else self.length
    return KVCache(k=new_k, v=new_v, pos=pos, length=length)


def _tree_read(q, k, v, *, new, freq, window, scale, softcap, length, pos, q_pos, tree):
  from kvjax.lm import rope  # here: the kernel module imports kvjax.lm, which imports this one
  from kvjax.pallas_kernels import tree_attention as kernel
  q = rope.apply(q, q_pos, freq)
  return kernel.tree_attention(q, k, v, length, *new, q_pos, pos, tree, scale=scale,
                               window=window, softcap=softcap)
