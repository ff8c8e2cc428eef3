"""Rotary position embeddings (the rotate-half layout of Hugging Face checkpoints): a config's
inverse frequencies; `apply` rotates (it lives with the kernels, `kvjax.pallas_kernels.rope`)."""

import math

import numpy as np

from kvjax.lm.config import Config
from kvjax.pallas_kernels.rope import apply

__all__ = ["apply", "inv_freq"]


def inv_freq(cfg: Config) -> np.ndarray:
  """[H/2] float32 inverse frequencies, with `linear`, `llama3` or `longrope` scaling applied
  (longrope: its short factors; the attention factor is in `Config.query_scale`)."""
  H = cfg.head_dim
  if cfg.rope_type == "longrope":
    short = np.asarray(cfg.rope_short_factor, np.float32)
    return (1.0 / (short * cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.float32) / H))).astype(
        np.float32)
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
