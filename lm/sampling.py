"""Token sampling: greedy, temperature, top-k, top-p. Config is static (hashable)."""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
  """temperature 0 is greedy (argmax; top_k/top_p unused). top_k 0 and top_p 1.0 disable."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    t = self.temperature
    if not (_real(t) and (t == 0 or (math.isfinite(t) and t >= 1e-6))):
      raise ValueError(f"temperature must be 0 (greedy) or a finite number >= 1e-6; got {t!r}")
    if not (
      isinstance(self.top_k, numbers.Integral)
      and not isinstance(self.top_k, bool)
      and self.top_k >= 0
    ):
      raise ValueError(f"top_k must be an int >= 0 (0 = off); got {self.top_k!r}")
    if not (_real(self.top_p) and 0 < self.top_p <= 1):
      raise ValueError(f"top_p must be in (0, 1] (1 = off); got {self.top_p!r}")
    # plain Python numbers keep the config hashable and its jit cache key stable
    object.__setattr__(self, "temperature", float(t))
    object.__setattr__(self, "top_k", int(self.top_k))
    object.__setattr__(self, "top_p", float(self.top_p))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def _real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x)


def filter_logits(logits: jax.Array, s: Sampling) -> jax.Array:
  """logits [B, V] float32 -> tempered logits with everything outside top-k / top-p at -inf."""
  logits = logits / s.temperature
  if s.top_k:
    kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    drop_sorted = before >= s.top_p  # keep the smallest prefix whose mass reaches top_p
    drop = (
      jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    )
    logits = jnp.where(drop, -jnp.inf, logits)
  return logits


def sample(logits: jax.Array, key: jax.Array | None, s: Sampling) -> jax.Array:
  """logits [B, V] -> tokens [B] int32."""
  if s.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, s), axis=-1).astype(jnp.int32)
