"""How a draft tree attends when the target verifies it (EAGLE): a `View` for the decoder.

The T tree tokens of a row see its cache and, among themselves, only their ancestors and
themselves. Over a KVCache they see every filled slot, all in one pass of the tree-attention
kernel (`kvjax.pallas_kernels.tree_attention`: the cache's slots and the tree's own keys
under one softmax); over a StreamingLLM SinkCache each node reads the sinks and the window as
the stream token at its depth would (`SinkCache.tree_view`, the sink-attention kernel with
per-query stream offsets). The decoder takes it as
`Decoder(..., view=tree_view(cache, depth, tree))`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.cache.dense import KVCache
from kvjax.cache.sink import SinkCache
from kvjax.cache.view import View
from kvjax.lm import rope
from kvjax.pallas_kernels import tree_attention as kernel


def tree_view(cache: KVCache | SinkCache, depth: jax.Array, tree: jax.Array) -> View:
  """depth: [B, T] int32 each node's depth under the root (0), the root being the token after
  the cache's last; tree: [B, T, T] bool, tree[b, i, j] = node j is node i or one of its
  ancestors."""
  if isinstance(cache, SinkCache):
    return cache.tree_view(depth, tree)
  if not isinstance(cache, KVCache):
    raise TypeError(
      f"a tree is verified against a KVCache or a SinkCache; got {type(cache).__name__}"
    )
  positions = cache.length[:, None] + depth
  B, T = positions.shape
  if tree.shape != (B, T, T) or tree.dtype != jnp.bool_:
    raise ValueError(
      f"tree must be bool [B, T, T] = {(B, T, T)} for positions {(B, T)}; got "
      f"{tree.dtype} {tuple(tree.shape)}"
    )
  read = functools.partial(_read, length=cache.length, pos=cache.pos, q_pos=positions, tree=tree)
  return View(q_pos=(positions,), new_pos=positions, blocks=(), cache_read=read, reads_new=True)


def _read(q, k, v, *, new, freq, window, scale, softcap, length, pos, q_pos, tree):
  """The View's cache_read: q [B, T, N, H] before RoPE, k, v [B, K, S, H] one layer's slots,
  new: the tree's own (k rotated, v) [B, K, T, H] -> (o, lse) over slots and tree at once."""
  q = rope.apply(q, q_pos, freq)
  return kernel.tree_attention(
    q, k, v, length, *new, q_pos, pos, tree, scale=scale, window=window, softcap=softcap
  )
