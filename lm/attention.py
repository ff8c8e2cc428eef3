"""Masked grouped-query attention over several key blocks with one joint softmax.

Keys may come in blocks (the cache's slots, then the step's new tokens) so that attending to
a cache never copies it into a concatenated buffer; each block carries its own queries.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked query gives no NaN


def attend(blocks: Sequence[tuple[jax.Array, jax.Array, jax.Array, jax.Array]], *,
           scale: float, softcap: float | None = None,
           partial: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """Softmax attention over the union of key/value blocks, each scored with its own queries.

  Each block is (q [B, T, N, H], k [B, S, K, H], v [B, S, K, H], mask [B, T, S] bool), with N a
  multiple of K (query head n reads kv head n // (N // K)); k and v may be [S, K, H], keys
  every row reads (a shared prefix), scored without broadcasting them over B. The blocks' queries are the same
  tokens, possibly rotated in different RoPE frames (see `kvjax.cache.view`). partial: the
  softmax over further keys computed elsewhere (a kernel), as (o [B, T, N, H] float32 its
  normalized output, lse [B, T, N] its log-sum-exp), merged into the same softmax. Scores and
  softmax in float32; returns [B, T, N, H] in q's dtype.
  """
  q0 = blocks[0][0]
  B, T, N, H = q0.shape
  K = blocks[0][1].shape[-2]
  G = N // K
  scores = []
  for q, k, _, mask in blocks:
    qg = q.reshape(B, T, K, G, H)
    s = jnp.einsum(f"btkgh,{_keys(k)}->bkgts", qg, k,
                   preferred_element_type=jnp.float32) * scale
    if softcap is not None:
      s = jnp.tanh(s / softcap) * softcap
    scores.append(jnp.where(mask[:, None, None], s, NEG))
  scores = jnp.concatenate(scores, axis=-1)                      # [B, K, G, T, S]
  out = jnp.zeros((B, T, K, G, H), jnp.float32)
  if partial is None:
    probs = jax.nn.softmax(scores, axis=-1)
  else:
    o, lse = partial
    lse = lse.reshape(B, T, K, G).transpose(0, 2, 3, 1)[..., None]  # [B, K, G, T, 1]
    m = jnp.maximum(scores.max(-1, keepdims=True), lse)
    e, e_partial = jnp.exp(scores - m), jnp.exp(lse - m)
    denom = e.sum(-1, keepdims=True) + e_partial
    probs = e / denom
    w = (e_partial / denom)[..., 0].transpose(0, 3, 1, 2)[..., None]  # [B, T, K, G, 1]
    out = w * o.reshape(B, T, K, G, H)
  start = 0
  for _, k, v, _ in blocks:
    p = probs[..., start:start + k.shape[-3]].astype(v.dtype)
    out += jnp.einsum(f"bkgts,{_keys(v)}->btkgh", p, v, preferred_element_type=jnp.float32)
    start += k.shape[-3]
  return out.reshape(B, T, N, H).astype(q0.dtype)


def _keys(k: jax.Array) -> str:
  """The einsum letters of a key/value block: per row, or shared by every row."""
  return "bskh" if k.ndim == 4 else "skh"
