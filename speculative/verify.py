"""How a draft tree attends when the target verifies it (EAGLE): a `View` for the decoder.

The T tree tokens of a row see every filled slot of its KVCache and, among themselves, only
their ancestors and themselves, all in one pass of the tree-attention kernel
(`kvjax.pallas_kernels.tree_attention`: the cache's slots and the tree's own keys under one
softmax). The decoder takes it as `Decoder(..., view=tree_view(cache, positions, tree))`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.cache.dense import KVCache
from kvjax.cache.view import View
from kvjax.lm import rope
from kvjax.pallas_kernels import tree_attention as kernel


def tree_view(cache: KVCache, positions: jax.Array, tree: jax.Array) -> View:
  """positions: [B, T] (length + the node's depth); tree: [B, T, T] bool, tree[b, i, j] = node
  j is node i or one of its ancestors."""
  if not isinstance(cache, KVCache):
    raise TypeError(f"a tree is verified against a KVCache; got {type(cache).__name__}")
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
