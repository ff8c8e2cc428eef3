"""Flash decoding's last step: merge the partial softmaxes of key splits into one.

A kernel whose grid splits a row's keys into C chunks (so one long cache feeds many programs)
leaves per chunk a normalized output and its log-sum-exp; this merge is a few XLA ops over
[..., C, R] values, nothing of the size of the cache.
"""

import jax
import jax.numpy as jnp

from kvjax.lm.attention import NEG


def merge(o: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """o [..., C, R, H] float32 (each split's softmax-weighted values, 0 when it saw no key),
  lse [..., C, R, 1] (NEG when it saw none) -> (o [..., R, H], lse [..., R, 1]) of the union."""
  m = lse.max(axis=-3, keepdims=True)
  w = jnp.where(lse > NEG / 2, jnp.exp(lse - m), 0.0)               # [..., C, R, 1]
  l = w.sum(axis=-3)
  safe = jnp.where(l > 0, l, 1.0)
  return (w * o).sum(axis=-3) / safe, jnp.where(l > 0, m[..., 0, :, :] + jnp.log(safe), NEG)


def split_sizes(S: int, block: int, steps: int) -> tuple[int, int, int]:
  """(bs, chunk, n_split) for S keys: key blocks of bs slots (a power of two <= min(block, S)),
  `steps` of them per program (fewer when S is short), n_split programs per (row, kv head)."""
  bs = 1 << (min(block, S).bit_length() - 1)
  chunk = bs * max(1, min(steps, -(-S // bs)))
  return bs, chunk, -(-S // chunk)


def cdiv_pow2(x, d: int):
  """ceil(x / d) for a power of two d, as shifts (traced ints; negative x gives <= 0)."""
  return (x + d - 1) >> (d.bit_length() - 1)
