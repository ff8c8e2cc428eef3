"""Dense KV cache: a pytree of per-layer keys/values stacked on a leading layer axis."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.cache.view import CACHE, Keys, Slots, View, new_keys

# logical axes of a K/V array [L, B, K, S, H]; shardings derive from each cache's AXES
LAYOUT = ("layers", "batch", "kv_heads", "cache_len", "head_dim")


class StackedSlots:
  """size, batch and slots() of a cache whose own fields k, v are [L, B, K, S, H] (LAYOUT)."""

  k: jax.Array
  v: jax.Array

  @property
  def size(self) -> int:
    return self.k.shape[3]

  @property
  def batch(self) -> int:
    return self.k.shape[1]

  def slots(self) -> Slots:
    """k, v [L, B, K, S, H]: what the decoder's layers read, each its own layer, in place."""
    return Slots(self.k, self.v)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache(StackedSlots):
  """Keys after RoPE. Invariants: row b's slots [0, length[b]) hold its tokens in order,
  `pos[b, s]` is the position of the token in slot s (nondecreasing; equal to s unless
  coprocessor latents share a position), slots at and past `length[b]` are free
  (their contents are undefined and never attended).

  k, v: [L, B, K, S, H] (kv heads before slots: attention reads each (row, head) as one
  contiguous [S, H] matrix, so no step transposes the cache); pos: [B, S] int32; length: [B]
  int32.
  """

  AXES: ClassVar[dict[str, tuple[str, ...]]] = {
    "k": LAYOUT,
    "v": LAYOUT,
    "pos": ("batch", "cache_len"),
    "length": ("batch",),
  }

  k: jax.Array
  v: jax.Array
  pos: jax.Array
  length: jax.Array

  @classmethod
  def init(
    cls, *, n_layers: int, batch: int, size: int, n_kv_heads: int, head_dim: int, dtype=jnp.float32
  ) -> KVCache:
    shape = (n_layers, batch, n_kv_heads, size, head_dim)
    return cls(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      pos=jnp.full((batch, size), -1, jnp.int32),
      length=jnp.zeros((batch,), jnp.int32),
    )

  def visible(self) -> jax.Array:
    """[B, S] bool: the filled slots."""
    return jnp.arange(self.size)[None, :] < self.length[:, None]

  def next_position(self) -> jax.Array:
    """[B] int32: the position of each row's next token, one past the highest position it
    holds and at least 0 (= length, unless coprocessor latents were inserted at earlier
    positions)."""
    return jnp.maximum(jnp.max(jnp.where(self.visible(), self.pos, -1), axis=1) + 1, 0)

  def view(self, T: int, positions: jax.Array | None = None, mask: jax.Array | None = None) -> View:
    """How T new tokens attend: the filled slots, then themselves causally.

    positions: [B, T], default next_position() + arange(T). mask: [B, T, S + T] bool over
    (slots, new tokens) replacing the default; unfilled slots stay masked."""
    S = self.size
    if positions is None:
      positions = self.next_position()[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    cache_mask, new_mask = (None, None) if mask is None else (mask[:, :, :S], mask[:, :, S:])
    return View(
      q_pos=(positions,),
      new_pos=positions,
      blocks=(
        Keys(CACHE, 0, self.visible(), positions, self.pos, mask=cache_mask),
        new_keys(positions, new_mask),
      ),
    )

  def write(
    self,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    n_new: jax.Array,
    layers: tuple[int, int] | None = None,
    advance: bool = True,
  ) -> KVCache:
    """Stores T new tokens per row at slots [length, length + T); advances length by n_new.

    k, v: [L', B, K, T, H] for the layers `layers` = [start, stop) (all when None);
    positions: [B, T]; n_new: [B] count of real (non-padding) tokens, <= T. With
    advance=False the length stays, so a later write for other layers of the same tokens
    lands in the same slots. Slots past `size` are dropped: callers check capacity first.
    """
    start, stop = layers or (0, self.k.shape[0])
    B, T = positions.shape
    slots = self.length[:, None] + jnp.arange(T)[None, :]  # [B, T]
    new_k = scatter_slots(self.k, k, slots, start, stop)
    new_v = scatter_slots(self.v, v, slots, start, stop)
    rows = jnp.arange(B)[:, None]
    real = jnp.arange(T)[None, :] < n_new[:, None]
    pos = self.pos.at[rows, slots].set(jnp.where(real, positions, -1), mode="drop")
    length = self.length + n_new if advance else self.length
    return KVCache(k=new_k, v=new_v, pos=pos, length=length)


def scatter_slots(
  dst: jax.Array, src: jax.Array, slots: jax.Array, start: int, stop: int
) -> jax.Array:
  """dst [L, B, K, S, H] with layers [start, stop) of src [L', B, K, T, H] written at slots
  [B, T] (per row; slots >= S are dropped)."""
  rows = jnp.arange(slots.shape[0])[:, None]
  # the advanced indices (rows, slots) move to the front: the update is [B, T, L', K, H]
  upd = src.astype(dst.dtype).transpose(1, 3, 0, 2, 4)
  return dst.at[start:stop, rows, :, slots].set(upd, mode="drop")
