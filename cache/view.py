"""What a step's T new tokens attend to: query RoPE frames and blocks of keys.

Every cache describes its read as a `View`, and the decoder applies that view in every layer.
Keys come in blocks (slices of the cache, the step's new tokens), so attending to a cache never
copies it into a concatenated buffer. RoPE scores depend only on query position minus key
position, so a cache may rotate queries and keys in any frame that gives each (query, key)
pair its intended distance; each block names the query frame it is scored in. The dense cache
needs one frame; the sink cache two (in-cache positions for the sinks, stream offsets for the
rolling window, which differ per query inside a chunk that evicts as it goes), and it reads its
slots itself, in one kernel (`View.cache_read`), leaving only the new tokens as blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

NEW = "new"  # Keys.source of the step's own tokens
SHARED = "shared"  # Keys.source of a prefix every row reads (`kvjax.cache.prefix`)


@dataclasses.dataclass(frozen=True)
class Keys:
  """One key block for T queries.

  source: NEW (the step's T tokens, rotated at View.new_pos), SHARED (the slots of a prefix
    stored once for all rows, keys [S', K, H] with no batch axis) or (lo, hi), the cache slots
    [lo, hi) of the layer (S' = hi - lo).
  frame: index into View.q_pos of the query rotation this block is scored against.
  mask: [B, T, S'] bool, which keys each query sees.
  dist: [B, T, S'] int, query position minus key position in the positions the model is meant
    to see (sliding-window layers additionally require dist < window).
  """

  source: str | tuple[int, int]
  frame: int
  mask: jax.Array
  dist: jax.Array


@dataclasses.dataclass(frozen=True)
class View:
  """q_pos: per frame, [B, T] RoPE positions of the queries. new_pos: [B, T] RoPE positions of
  the new keys (frame 0's). rotated: the cache stores keys after RoPE (else before; the decoder
  hands the cache's `write` keys in the form it stores). cache_read: when set, the cache's
  slots are read by this function instead of by blocks: cache_read(q [B, T, N, H] before RoPE,
  k, v [B, S, K, H] the layer's slots, *, freq, window, scale, softcap) -> (o, lse), a partial
  softmax for `attend(partial=...)`. reads_new: cache_read also reads the step's own keys,
  given as `new=(k [B, T, K, H] rotated at new_pos, v)`, and `blocks` is empty."""

  q_pos: tuple[jax.Array, ...]
  new_pos: jax.Array
  blocks: tuple[Keys, ...]
  rotated: bool = True
  cache_read: Callable[..., tuple[jax.Array, jax.Array]] | None = None
  reads_new: bool = False


def causal(positions: jax.Array, mask: jax.Array | None = None) -> View:
  """The view without a cache: the T tokens attend among themselves, causally unless `mask`
  [B, T, T] says otherwise. positions: [B, T]."""
  B, T = positions.shape
  if mask is None:
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
  dist = positions[:, :, None] - positions[:, None, :]
  return View(q_pos=(positions,), new_pos=positions, blocks=(Keys(NEW, 0, mask, dist),))
