"""What a step's T new tokens attend to: query RoPE frames and blocks of keys.

Every cache describes its read as a `View`, and the decoder applies that view in every layer.
Keys come in blocks (the cache's slots, a shared prefix, the step's new tokens), so attending
to a cache never copies it into a concatenated buffer. RoPE scores depend only on query
position minus key position, so a cache may rotate queries and keys in any frame that gives
each (query, key) pair its intended distance; each block names the query frame it is scored
in. The dense cache needs one frame; the sink cache two (in-cache positions for the sinks,
stream offsets for the rolling window, which differ per query inside a chunk that evicts as it
goes), and it reads its slots itself, in one kernel (`View.cache_read`), leaving only the new
tokens as blocks.

Which keys a query sees is stated as factors, not as a [T, S] array, so attention can build
the mask one key block at a time and skip blocks no query sees (`kvjax.lm.attention`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

NEW = "new"  # Keys.source of the step's own tokens
SHARED = "shared"  # Keys.source of a prefix every row reads (`kvjax.cache.prefix`)
CACHE = "cache"  # Keys.source of the cache's own slots (all of them, read at the layer)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
  """What a step's layers read from a cache: every layer stacked on the leading L axis, each
  layer read at its own index in place (never copied whole). k, v: [L, B, K, S, H] the rows'
  own slots (Keys source CACHE); shared_k, shared_v: [L, K, S0, H] a prefix stored once that
  every row reads (source SHARED; `kvjax.cache.prefix`), or None."""

  k: jax.Array
  v: jax.Array
  shared_k: jax.Array | None = None
  shared_v: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Keys:
  """One key block of S' keys for T queries.

  source: NEW (the step's T tokens, rotated at View.new_pos), SHARED (the slots of a prefix
    stored once for all rows, keys [K, S', H] with no batch axis) or CACHE (every slot of the
    cache's layer, S' = S).
  frame: index into View.q_pos of the query rotation this block is scored against.
  valid: [B or 1, S'] bool, the keys that hold a token.
  q_pos: [B, T], k_pos: [B or 1, S'] int, the positions the model is meant to see (their
    difference is the distance that sliding-window layers limit to < window).
  causal: key s is seen only by queries t >= s (a block of the step's own tokens, S' == T).
  mask: [B, T, S'] bool or None, a further explicit mask (draft trees, packed documents).
  full: every key is valid (`valid` is all true), so attention may skip masking the blocks a
    causal order alone decides.

  Query t sees key s iff valid[s] & (not causal or s <= t) & mask[t, s], and on a
  sliding-window layer q_pos[t] - k_pos[s] < window.
  """

  source: str
  frame: int
  valid: jax.Array
  q_pos: jax.Array
  k_pos: jax.Array
  causal: bool = False
  mask: jax.Array | None = None
  full: bool = False


@dataclasses.dataclass(frozen=True)
class View:
  """q_pos: per frame, [B, T] RoPE positions of the queries. new_pos: [B, T] RoPE positions of
  the new keys (frame 0's). rotated: the cache stores keys after RoPE (else before; the decoder
  hands the cache's `write` keys in the form it stores). cache_read: when set, the cache's
  slots are read by this function instead of by blocks: cache_read(q [B, T, N, H] before RoPE,
  k, v [B, K, S, H] the layer's slots, *, freq, window, scale, softcap) -> (o, lse), a partial
  softmax for `attend(partial=...)`; freq [H/2] is the layer's own RoPE (layers may differ).
  reads_new: cache_read also reads the step's own keys, given as `new=(k [B, K, T, H] rotated
  at new_pos, v)`, and `blocks` is empty. key_pos: [B, S] the RoPE positions cache_read
  rotates the slots' keys to, when it rotates them itself: the decoder then computes their
  tables once per forward and hands each layer `rotation=(cos, sin)` [B, S, H/2]."""

  q_pos: tuple[jax.Array, ...]
  new_pos: jax.Array
  blocks: tuple[Keys, ...]
  rotated: bool = True
  cache_read: Callable[..., tuple[jax.Array, jax.Array]] | None = None
  reads_new: bool = False
  key_pos: jax.Array | None = None


def new_keys(positions: jax.Array, mask: jax.Array | None = None, frame: int = 0) -> Keys:
  """The step's own T tokens as keys: causal unless `mask` [B, T, T] says otherwise.
  positions: [B, T]."""
  T = positions.shape[1]
  return Keys(
    NEW,
    frame,
    jnp.ones((1, T), bool),
    positions,
    positions,
    causal=mask is None,
    mask=mask,
    full=True,
  )


def causal(positions: jax.Array, mask: jax.Array | None = None) -> View:
  """The view without a cache: the T tokens attend among themselves, causally unless `mask`
  [B, T, T] says otherwise. positions: [B, T]."""
  return View(q_pos=(positions,), new_pos=positions, blocks=(new_keys(positions, mask),))
