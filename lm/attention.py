"""Masked grouped-query attention over several key blocks with one joint softmax.

Keys may come in blocks (the cache's slots, then the step's new tokens) so that attending to
a cache never copies it into a concatenated buffer; each block carries its own queries.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked query gives no NaN


def attend(blocks: Sequence[tuple[jax.Array, jax.Array, jax.Array, jax.Array]], *,
           scale: float, softcap: float | None = None) -> jax.Array:
  """Softmax attention over the union of key/value blocks, each scored with its own queries.

  Each block is (q [B, T, N, H], k [B, S, K, H], v [B, S, K, H], mask [B, T, S] bool), with N a
  multiple of K (query head n reads kv head n // (N // K)). The blocks' queries are the same
  tokens, possibly rotated in different RoPE frames (see `kvjax.cache.view`). Scores and
  softmax in float32; returns [B, T, N, H] in q's dtype.
  """
  q0 = blocks[0][0]
  B, T, N, H = q0.shape
  K = blocks[0][1].shape[2]
  scores = []
  for q, k, _, mask in blocks:
    qg = q.reshape(B, T, K, N // K, H)
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
      s = jnp.tanh(s / softcap) * softcap
    scores.append(jnp.where(mask[:, None, None], s, NEG))
  probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
  out = jnp.zeros((B, T, K, N // K, H), jnp.float32)
  start = 0
  for _, k, v, _ in blocks:
    p = probs[..., start:start + k.shape[1]].astype(v.dtype)
    out += jnp.einsum("bkgts,bskh->btkgh", p, v, preferred_element_type=jnp.float32)
    start += k.shape[1]
  return out.reshape(B, T, N, H).astype(q0.dtype)
