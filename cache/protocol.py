"""The cache protocol: what the decoder asks of any cache (dense, sink, shared prefix, the EAGLE
head's), so that a new cache is added without a type check anywhere in the core.

A cache is a pytree (`jax.tree_util.register_dataclass`) whose per-layer arrays are stacked on
a leading L axis in the layout [L, B, K, S, H] (kv heads before slots). A cache of arrays
declares each field's logical axes once (`AXES`, from which
`kvjax.lm.sharding.cache_shardings` derives its shardings); a cache made of caches (the
shared-prefix cache) is sharded through theirs. A step reads it through `slots()` and
`view()` and returns the cache `write` made.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax

from kvjax.cache.view import Slots, View


@runtime_checkable
class Cache(Protocol):
  """size: slots per row (S); batch: rows (B); length: [B] int32 tokens each row reads."""

  @property
  def size(self) -> int: ...

  @property
  def batch(self) -> int: ...

  @property
  def length(self) -> jax.Array: ...

  def slots(self) -> Slots:
    """The arrays the decoder's layers read, each at its own layer index."""
    ...

  def view(self, T: int, positions: jax.Array | None = None, mask: jax.Array | None = None) -> View:
    """How T new tokens per row attend to this cache and to each other. positions: [B, T]
    (default: each row's next positions); mask: [B, T, S + T] bool over (slots, new tokens),
    for caches that take one (others raise ValueError)."""
    ...

  def write(
    self,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    n_new: jax.Array,
    layers: tuple[int, int] | None = None,
    advance: bool = True,
  ) -> Cache:
    """The cache with T new tokens' k, v [L', B, K, T, H] (layers [start, stop), all when
    None) stored at positions [B, T]; n_new [B] real tokens per row; advance=False keeps the
    length (a later write of other layers of the same tokens lands in the same slots)."""
    ...
