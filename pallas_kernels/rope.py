"""Rotary position embeddings applied to queries and keys (the rotate-half layout of Hugging
Face checkpoints). Here, below the caches and the core, because the kernels rotate the keys
they read; the inverse frequencies of a model's layers are `kvjax.lm.rope.layer_freqs`."""

import jax
import jax.numpy as jnp


def apply(
  x: jax.Array, positions: jax.Array, freq: jax.Array, *, heads_first: bool = False
) -> jax.Array:
  """Rotates x [B, T, N, H] (heads_first: [B, N, T, H], the caches' layout) by positions
  [B, T]; computed in float32, returned in x.dtype."""
  return rotate(x, *tables(positions, freq), heads_first=heads_first)


def tables(positions: jax.Array, freq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) [B, T, H/2] float32 of the angles positions [B, T] x freq [H/2]."""
  angles = positions[..., None].astype(jnp.float32) * freq
  return jnp.cos(angles), jnp.sin(angles)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array, *, heads_first: bool = False) -> jax.Array:
  """`apply` with its tables (cos, sin) [B, T, H/2] given: computed once, they can serve many
  layers (XLA:CPU would otherwise evaluate each angle's sine and cosine inside the rotation's
  fused loop, once per head and half)."""
  head_axis = 1 if heads_first else 2
  sin, cos = jnp.expand_dims(sin, head_axis), jnp.expand_dims(cos, head_axis)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
