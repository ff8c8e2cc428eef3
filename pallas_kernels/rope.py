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
  angles = positions[..., None].astype(jnp.float32) * freq  # [B, T, H/2]
  head_axis = 1 if heads_first else 2
  sin = jnp.expand_dims(jnp.sin(angles), head_axis)
  cos = jnp.expand_dims(jnp.cos(angles), head_axis)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
