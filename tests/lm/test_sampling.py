"""Sampled frequencies (kvjax.lm.sampling) against the exact softmax of the tempered, filtered
logits, at temperatures other than 1 and with top-k and top-p, tight enough that a 10%
temperature error or a filter keeping one token too many or too few fails by many sigmas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import lm
from kvjax.lm import sampling as sampling_lib

LOGITS = np.array([2.0, 1.2, 0.5, 0.0, -0.6, -1.5])  # [V], no ties
DRAWS = 200_000
TOLERANCE = 5.0  # sigmas


def exact(t: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
  """[V] float64: softmax(LOGITS / t) restricted to the top_k largest, then to the smallest
  prefix (by decreasing probability) whose renormalised mass reaches top_p, renormalised."""
  z = LOGITS / t
  order = np.argsort(-z)
  keep = np.zeros(len(z), bool)
  keep[order[: top_k or len(z)]] = True
  q = np.where(keep, np.exp(z - z.max()), 0.0)
  q /= q.sum()
  mass = 0.0
  for i in order:  # a token stays while the mass strictly above it is below top_p
    keep[i] &= mass < top_p
    mass += q[i]
  q = np.where(keep, q, 0.0)
  return q / q.sum()


def sigmas(freq: np.ndarray, p: np.ndarray) -> float:
  """max over tokens of |freq - p| in binomial standard deviations of DRAWS draws (a token of
  probability 0 drawn at all counts as infinitely far)."""
  std = np.sqrt(p * (1 - p) / DRAWS)
  dev = np.abs(freq - p)
  return float(
    np.max(np.where(p > 0, dev / np.where(p > 0, std, 1.0), np.where(dev > 0, np.inf, 0.0)))
  )


@functools.partial(jax.jit, static_argnames="s")
def draw(logits: jax.Array, key: jax.Array, s: lm.Sampling) -> jax.Array:
  """DRAWS tokens [DRAWS] from logits [V], in one batched call."""
  return sampling_lib.sample(jnp.broadcast_to(logits, (DRAWS, logits.shape[0])), key, s)


@pytest.mark.parametrize(
  "t, top_k, top_p",
  [
    (0.5, 0, 1.0),
    (2.0, 0, 1.0),  # temperature alone, below and above 1
    (0.7, 3, 1.0),  # top-k
    (1.5, 0, 0.8),  # top-p: 0.401, 0.637, 0.784 above the 4th token, 0.890 the 5th
    (1.6, 5, 0.9),  # both: top-p on the top-5's renormalised mass
  ],
)
def test_sampled_frequencies_are_the_exact_softmax_of_the_filtered_tempered_logits(t, top_k, top_p):
  """200k draws (one fixed key): every token's frequency lies within 5 binomial sigmas of
  the exact distribution, and a filtered-out token is never drawn. The nearby wrong
  distributions (temperature 1.1 t; top_k + 1; top-p keeping one token more or fewer) are
  each more than 10 sigmas away, so any of those bugs fails."""
  want = exact(t, top_k, top_p)
  wrong = [exact(1.1 * t, top_k, top_p)]
  if top_k:
    wrong.append(exact(t, top_k + 1, top_p))
  if top_p < 1:
    kept = int(np.sum(want > 0))
    order = np.argsort(-LOGITS)
    for n in (kept - 1, kept + 1):
      q = np.where(np.isin(np.arange(len(LOGITS)), order[:n]), exact(t, top_k), 0.0)
      wrong.append(q / q.sum())
  assert all(sigmas(w, want) > 10 for w in wrong)  # the bound is tight enough to tell them apart
  toks = draw(
    jnp.asarray(LOGITS, jnp.float32),
    jax.random.key(11),
    lm.Sampling(temperature=t, top_k=top_k, top_p=top_p),
  )
  freq = np.bincount(np.asarray(toks), minlength=len(LOGITS)) / DRAWS
  assert sigmas(freq, want) < TOLERANCE, (freq, want)
