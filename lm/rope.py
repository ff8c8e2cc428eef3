"""Rotary position embeddings (the rotate-half layout of Hugging Face checkpoints)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.lm.config import Config


def inv_freq(cfg: Config) -> np.ndarray:
  """[H/2] float32 inverse frequencies, with `linear` or `llama3` scaling applied."""
  H = cfg.head_dim
  freq = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.float32) / H))
  if cfg.rope_type == "linear":
    return (freq / cfg.rope_factor).astype(np.float32)
  if cfg.rope_type == "llama3":
    low_wavelen = cfg.rope_original_max_position / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_position / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > low_wavelen, freq / cfg.rope_factor, freq)
    smooth = ((cfg.rope_original_max_position / wavelen - cfg.rope_low_freq_factor)
              / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return freq


def apply(x: jax.Array, positions: jax.Array, freq: jax.Array, *,
          heads_first: bool = False) -> jax.Array:
  """Rotates x [B, T, N, H] (heads_first: [B, N, T, H], the caches' layout) by positions
  [B, T]; computed in float32, returned in x.dtype."""
  angles = positions[..., None].astype(jnp.float32) * freq  # [B, T, H/2]
  head_axis = 1 if heads_first else 2
  sin = jnp.expand_dims(jnp.sin(angles), head_axis)
  cos = jnp.expand_dims(jnp.cos(angles), head_axis)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
