"""Shared-prefix cache: one prefix stored once, read by B rows that each continue it.

Skeleton-of-Thought expands P points of one skeleton at once: every row starts with the same
question + skeleton tokens. Broadcasting a dense cache to P rows would store that prefix P
times; this cache keeps it once, with no batch axis, and gives each row slots only for its own
tokens. Attention reads the prefix as one key block that every row's queries score against
(`kvjax.lm.attention.attend` takes a block with keys [S, K, H]), so a decode step reads the
prefix's keys once for all rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.cache.dense import KVCache
from kvjax.cache.view import SHARED, Keys, Slots, View


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefixCache:
  """prefix: a one-row KVCache holding the shared tokens (slots [0, prefix.length[0])).
  rows: a B-row KVCache of each row's own tokens, at positions after the prefix's.

  Reads as a dense cache whose row b holds the prefix then rows' slots of b; writes go to
  `rows`. Shapes: prefix.k [L, 1, K, S0, H]; rows.k [L, B, K, S, H] (same L, K, H, dtype).
  Shardings: each field is a KVCache with its own AXES (the one-row prefix is replicated
  over the batch axis, since 1 row divides no data axis).
  """

  prefix: KVCache
  rows: KVCache

  @property
  def size(self) -> int:
    return self.rows.size

  @property
  def batch(self) -> int:
    return self.rows.batch

  @property
  def length(self) -> jax.Array:
    """[B] tokens each row reads: the prefix's and its own."""
    return self.prefix.length[0] + self.rows.length

  def next_position(self) -> jax.Array:
    """[B] int32: one past the highest position a row holds (the prefix's when it has none)."""
    return jnp.maximum(self.rows.next_position(), self.prefix.next_position()[0])

  def slots(self) -> Slots:
    """What the decoder's layers read, each its own layer, in place: the rows' k, v
    [L, B, K, S, H] and the prefix's [L, K, S0, H] as the shared slots."""
    return Slots(self.rows.k, self.rows.v, self.prefix.k[:, 0], self.prefix.v[:, 0])

  def view(self, T: int, positions: jax.Array | None = None, mask: jax.Array | None = None) -> View:
    """T new tokens per row attend to the prefix, their row's slots, then causally to
    themselves. positions: [B, T], default next_position() + arange(T)."""
    if mask is not None:
      raise ValueError("a PrefixCache takes no explicit mask: its rows read the whole prefix")
    if positions is None:
      positions = self.next_position()[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    own = self.rows.view(T, positions)
    shared = Keys(SHARED, 0, self.prefix.visible()[:1], positions, self.prefix.pos[:1])
    return dataclasses.replace(own, blocks=(shared, *own.blocks))

  def write(
    self,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    n_new: jax.Array,
    layers: tuple[int, int] | None = None,
    advance: bool = True,
  ) -> PrefixCache:
    """Stores the new tokens in the rows' slots (see `KVCache.write`)."""
    return PrefixCache(self.prefix, self.rows.write(k, v, positions, n_new, layers, advance))
