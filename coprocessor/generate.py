"""The augmented prefill behind `kvjax.lm.generate(..., coprocessor=)`.

An augmentation point p sits before the prompt's last token x_p (so that every generated
token follows the latents, as in training): the base prefills x_<p, the coprocessor reads
that cache, and the latents go in at the next positions; x_p is fed after them and its
logits give the first new token. With delay k (the asynchronous setting) the latents read
from x_<p arrive k tokens late: x_p and the first k - 1 new tokens are fed before them, and
the k-th new token, sampled from unaugmented logits, is fed right after them.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.coprocessor import model as cpm
from kvjax.lm import steps
from kvjax.lm.model import Model
from kvjax.lm.sampling import Sampling, sample


def prefill(model: Model, cop: cpm.Coprocessor, rows: list[list[int]], max_new_tokens: int,
            *, delay: int, sampling: Sampling, key: jax.Array):
  """(logits [B, V] of the next token after the latents, cache, early [B, delay] int32 (the
  tokens sampled before the latents arrived), prefill_s, compile_s) for prompts `rows`."""
  from kvjax.lm.generate import new_cache
  cpm.check(cop.cc, model.cfg)
  if not isinstance(delay, (int, np.integer)) or isinstance(delay, bool) or delay < 0:
    raise ValueError(f"delay must be an int >= 0; got {delay!r}")
  if delay >= max_new_tokens:
    raise ValueError(f"delay {delay} >= max_new_tokens {max_new_tokens}: the latents would "
                     "arrive after the last new token")
  N = cop.n_latents
  longest = max(map(len, rows))
  if longest + N + max_new_tokens > model.cfg.max_position:
    raise ValueError(f"prompt ({longest} tokens) + {N} latents + max_new_tokens "
                     f"({max_new_tokens}) exceeds the model's context of "
                     f"{model.cfg.max_position} positions")
  B = len(rows)
  P = steps.bucket(longest)
  tokens = np.zeros((B, P), np.int32)
  for b, ids in enumerate(rows):
    tokens[b, :len(ids) - 1] = ids[:-1]
  last = jnp.asarray([[ids[-1]] for ids in rows], jnp.int32)
  one = jnp.ones((B,), jnp.int32)
  cache = new_cache(model, B, steps.bucket(longest + N + max_new_tokens))
  t0 = time.perf_counter()
  compile_s = 0.0

  def call(fn, *args, **static):
    nonlocal compile_s
    out, c = steps.call(model, fn, model.state, *args, **static)
    compile_s += c
    return out

  _, cache = call(steps.prefill, cache, jnp.asarray(tokens),
                  jnp.asarray([len(r) - 1 for r in rows], jnp.int32))
  if delay == 0:
    cache = cpm.augment(model, cop, cache)
    logits, cache = call(steps.extend, cache, last, one)
    jax.block_until_ready(logits)
    return logits, cache, np.zeros((B, 0), np.int32), time.perf_counter() - t0 - compile_s, \
        compile_s
  latents = cpm.latents(model, cop, cache)
  logits, cache = call(steps.extend, cache, last, one)
  early = []
  for i in range(delay - 1):  # tokens sampled and fed before the latents arrive
    tok, logits, cache = call(steps.sample_decode, cache, logits, key, jnp.int32(i),
                              sampling=sampling)
    early.append(tok)
  early.append(sample(logits, jax.random.fold_in(key, delay - 1), sampling))  # fed after them
  cache = cpm.insert(model, cop, latents, cache)
  logits, cache = call(steps.decode_step, cache, early[-1])
  jax.block_until_ready(logits)
  return (logits, cache, np.stack([np.asarray(t) for t in early], 1).astype(np.int32),
          time.perf_counter() - t0 - compile_s, compile_s)
