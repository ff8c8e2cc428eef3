"""Rotary position embeddings (the rotate-half layout of Hugging Face checkpoints): a config's
inverse frequencies, per layer (Gemma 3's local layers have their own base); `apply` rotates,
`tables` and `rotate` split it in two (they live with the kernels, `kvjax.pallas_kernels.rope`)."""

import math

import numpy as np

from kvjax.lm.config import Config
from kvjax.pallas_kernels.rope import apply, rotate, tables

__all__ = ["apply", "inv_freq", "layer_freqs", "rotate", "tables"]


def layer_freqs(cfg: Config) -> np.ndarray:
  """[L, H/2] float32: layer l's inverse frequencies, `inv_freq(cfg, layer=l)`."""
  return np.stack([inv_freq(cfg, layer=l) for l in range(cfg.n_layers)])


def _base(theta: float, H: int) -> np.ndarray:
  return (1.0 / (theta ** (np.arange(0, H, 2, dtype=np.float32) / H))).astype(np.float32)


def inv_freq(cfg: Config, layer: int | None = None) -> np.ndarray:
  """[H/2] float32 inverse frequencies of `layer` (None: a global layer's): with `linear`,
  `llama3` or `longrope` scaling applied (longrope: its short factors; the attention factor is
  in `Config.query_scale`), except on a sliding-window layer of a config with
  `rope_local_theta`, which rotates by plain RoPE at that base."""
  H = cfg.head_dim
  if layer is not None and cfg.rope_local_theta is not None and cfg.windows[layer]:
    return _base(cfg.rope_local_theta, H)
  freq = _base(cfg.rope_theta, H)
  if cfg.rope_type == "longrope":
    short = np.asarray(cfg.rope_short_factor, np.float32)
    return (1.0 / (short * cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.float32) / H))).astype(
      np.float32
    )
  if cfg.rope_type == "linear":
    return (freq / cfg.rope_factor).astype(np.float32)
  if cfg.rope_type == "llama3":
    low_wavelen = cfg.rope_original_max_position / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_position / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > low_wavelen, freq / cfg.rope_factor, freq)
    smooth = (cfg.rope_original_max_position / wavelen - cfg.rope_low_freq_factor) / (
      cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return freq
