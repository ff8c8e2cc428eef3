"""Flash decoding's pieces shared by the kernels: the online-softmax step a program runs per key
block, its finish, and the merge of the key splits' partial softmaxes.

A kernel whose grid splits a row's keys into C chunks (so one long cache feeds many programs)
leaves per chunk a normalized output and its log-sum-exp; the merge is a few XLA ops over
[..., C, R] values, nothing of the size of the cache.
"""

import jax
import jax.numpy as jnp

from kvjax.lm.attention import NEG


def online_step(carry, s, vis, vals, *, scale: float, softcap: float | None):
  """One online-softmax step inside a kernel: carry (m, l [R, 1], acc [R, H]) float32, raw
  scores s [R, n], vis [R, n] bool, values vals [n, H] (zeroed where not visible)."""
  m, l, acc = carry
  s = s * scale
  if softcap is not None:
    s = jnp.tanh(s / softcap) * softcap
  s = jnp.where(vis, s, NEG)
  m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
  e = jnp.where(vis, jnp.exp(s - m_new), 0.0)
  alpha = jnp.exp(m - m_new)
  acc = alpha * acc + jnp.dot(e.astype(vals.dtype), vals, preferred_element_type=jnp.float32)
  return m_new, alpha * l + e.sum(axis=1, keepdims=True), acc


def start(R: int, H: int):
  """The carry of a program that has seen no key yet."""
  f32 = jnp.float32
  return jnp.full((R, 1), NEG, f32), jnp.zeros((R, 1), f32), jnp.zeros((R, H), f32)


def finish(carry) -> tuple[jax.Array, jax.Array]:
  """(o [R, H], lse [R, 1]) of a program's carry: 0 and NEG for a row that saw no key."""
  m, l, acc = carry
  has = l > 0
  safe = jnp.where(has, l, 1.0)
  return acc / safe, jnp.where(has, m + jnp.log(safe), NEG)


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
