"""The request engine every generation path shares: prompts to token rows, the request's checks,
stop ids, padding to a length bucket, the cache of a request and its prefill. Turning generated
ids back into text is `kvjax.lm.detokenize`'s.

`kvjax.lm.generate`, token streaming, StreamingLLM, Skeleton-of-Thought expansion, EAGLE, the
coprocessor and DroidSpeak all set requests up through these functions.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.dense import KVCache
from kvjax.lm import sharding, steps
from kvjax.lm.model import Model
from kvjax.lm.sampling import Sampling

Prompt = str | Sequence[int]


def tokenize(model: Model, prompts: Prompt | Sequence[Prompt], chat: bool) -> list[list[int]]:
  """Each prompt as a list of token ids; text goes through the tokenizer (or chat template)."""
  if isinstance(prompts, str) or (
    len(prompts) and not isinstance(prompts[0], str) and np.ndim(prompts[0]) == 0
  ):
    prompts = [prompts]
  if not len(prompts):
    raise ValueError("prompts is empty: pass a string, a list of strings or of token-id lists")
  rows = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      require_tokenizer(model, "a text prompt (pass token ids instead)")
      if chat:
        p = model.tokenizer.apply_chat_template([{"role": "user", "content": p}])
      ids = model.tokenizer.encode(p, add_special_tokens=not chat)
    else:
      arr = np.asarray(p)
      if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(
          f"prompt {i} must be a string or a flat sequence of int token ids; "
          f"got a {arr.dtype} array of shape {arr.shape}"
        )
      ids = arr.astype(np.int64).tolist()
    if not ids:
      raise ValueError(f"prompt {i} is empty: it needs at least one token")
    bad = [t for t in ids if not 0 <= t < model.cfg.vocab_size]
    if bad:
      raise ValueError(f"prompt {i} has token ids {bad[:5]} outside [0, {model.cfg.vocab_size})")
    rows.append(ids)
  return rows


@dataclasses.dataclass(frozen=True)
class Request:
  """A checked generation request. rows: each prompt's token ids; sampling; key: the PRNG key
  (key(0) for greedy requests that gave none); stop: stop strings (non-empty only with a
  tokenizer); stop_ids: the ids that end a row, padded with -1 to one compiled shape."""

  rows: list[list[int]]
  sampling: Sampling
  key: jax.Array
  stop: list[str]
  stop_ids: list[int]


def request(
  model: Model,
  prompts: Prompt | Sequence[Prompt],
  max_new_tokens: int,
  sampling: Sampling | None,
  key,
  stop: str | Sequence[str],
  stop_tokens: Sequence[int] | None,
  chat: bool,
) -> Request:
  """Every request's setup: the prompts tokenized and checked, the sampling and key checked,
  the stop strings and ids. Arguments as for `kvjax.lm.generate`, in its order (the entry
  points pass them on by position)."""
  sampling = check_request(model, max_new_tokens, sampling, key)
  rows = tokenize(model, prompts, chat)
  stop = [stop] if isinstance(stop, str) else list(stop)
  if stop and model.tokenizer is None:
    raise ValueError("stop strings need the model's tokenizer")
  return Request(
    rows=rows,
    sampling=sampling,
    key=jax.random.key(0) if key is None else key,
    stop=stop,
    stop_ids=padded_stop_ids(model, stop_tokens),
  )


def new_cache(model: Model, batch: int, size: int) -> KVCache:
  """An empty dense cache for `batch` rows of `size` slots, laid out like the params."""
  cache = KVCache.init(**model.cfg.cache_dims, batch=batch, size=size, dtype=model.dtype)
  if model.mesh is not None:
    cache = sharding.shard_cache(cache, model.mesh, model.rules)
  return cache


def pad(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
  """rows right-padded with 0 to [B, width] int32."""
  tokens = np.zeros((len(rows), width), np.int32)
  for b, ids in enumerate(rows):
    tokens[b, : len(ids)] = ids
  return tokens


def check_context(model: Model, rows: Sequence[Sequence[int]], max_new_tokens: int) -> None:
  """Refuses prompts that cannot take max_new_tokens more tokens within the model's context."""
  longest = max(map(len, rows))
  if longest + max_new_tokens > model.cfg.max_position:
    raise ValueError(
      f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
      f"model's context of {model.cfg.max_position} positions"
    )


class NonFiniteError(FloatingPointError):
  """The model's logits became NaN or infinite during a call: its output would be garbage."""


def check_finite(model: Model, bad, what: str) -> None:
  """Raises NonFiniteError if any row of bad [B] bool (a jitted loop's `steps.nonfinite`
  flag, or a host array's) is set, naming the rows and what to try."""
  bad = np.asarray(bad).reshape(-1)
  if bad.any():
    rows = np.flatnonzero(bad).tolist()
    raise NonFiniteError(
      f"{what}: the logits of row(s) {rows[:8]}{' ...' if len(rows) > 8 else ''} became NaN "
      f"or infinite, so the output would be garbage; the weights or activations overflow in "
      f"{model.dtype} (try float32: lm.load(..., dtype=jnp.float32), --dtype float32) or the "
      "checkpoint holds non-finite values (lm.load checks it unless check_finite=False)"
    )


def nbytes(tree) -> int:
  """Bytes of a pytree's arrays (a cache's memory)."""
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def prefill(model: Model, rows: list[list[int]], max_new_tokens: int):
  """Pads rows to a length bucket and prefills a cache with room for max_new_tokens more."""
  check_context(model, rows, max_new_tokens)
  longest = max(map(len, rows))
  P = steps.bucket(longest)
  tokens = pad(rows, P)
  lengths = np.array([len(r) for r in rows], np.int32)
  cache = new_cache(model, len(rows), steps.bucket(max(P, longest + max_new_tokens)))
  (logits, cache), seconds, compile_s = steps.timed(
    model, steps.prefill, cache, jnp.asarray(tokens), jnp.asarray(lengths)
  )
  return logits, cache, seconds, compile_s


def require_tokenizer(model: Model, what: str):
  """model.tokenizer, or a ValueError saying that `what` needs it and which file is missing."""
  if model.tokenizer is None:
    file = os.path.join(model.path, "tokenizer.json") if model.path else None
    why = (
      f"there is no {file}"
      if file and not os.path.exists(file)
      else "this Model has no tokenizer (tokenizer=None)"
    )
    raise ValueError(f"{what} needs the model's tokenizer: {why}")
  return model.tokenizer


def check_request(model: Model, max_new_tokens: int, sampling: Sampling | None, key) -> Sampling:
  """The request's sampling (greedy by default), after checking max_new_tokens and the key: None
  or one JAX PRNG key (a typed key of shape (), or a legacy jax.random.PRNGKey, uint32[2]);
  TypeError saying what a key is otherwise."""
  if (
    isinstance(max_new_tokens, bool)
    or not isinstance(max_new_tokens, (int, np.integer))
    or max_new_tokens < 1
  ):
    raise ValueError(f"max_new_tokens must be an int >= 1; got {max_new_tokens!r}")
  if key is not None:
    shape, dtype = getattr(key, "shape", None), getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    if not ((typed and shape == ()) or (not typed and dtype == np.uint32 and shape == (2,))):
      if typed:
        got = f"an array of keys of shape {shape} (pass one of them)"
      elif shape is not None and dtype is not None:
        kind = "numpy" if isinstance(key, np.ndarray) else "jax"
        got = f"a {kind} {dtype} array of shape {tuple(shape)}"
      else:
        got = type(key).__name__
      raise TypeError(
        f"key must be a JAX PRNG key, e.g. jax.random.key(0) (or a legacy "
        f"jax.random.PRNGKey(0), uint32[2]); got {got}"
      )
  sampling = sampling or Sampling()
  if not isinstance(sampling, Sampling):
    raise TypeError(f"sampling must be a kvjax.lm.Sampling; got {type(sampling).__name__}")
  if not sampling.greedy and key is None:
    raise ValueError(
      "sampling with temperature > 0 needs an explicit PRNG key: key=jax.random.key(seed)"
    )
  return sampling


def stop_ids(model: Model, stop_tokens: Sequence[int] | None) -> list[int]:
  """The ids that end a row: stop_tokens, or the model's eos ids when None (checked)."""
  ids = list(model.eos_ids if stop_tokens is None else stop_tokens)
  bad = [t for t in ids if not 0 <= t < model.cfg.vocab_size]
  if bad:
    raise ValueError(f"stop_tokens {bad} outside [0, {model.cfg.vocab_size})")
  return ids


def padded_stop_ids(model: Model, stop_tokens: Sequence[int] | None) -> list[int]:
  """stop_ids padded with -1 to a bucket of at least 4 entries: one compiled shape for every
  request's stop list."""
  ids = stop_ids(model, stop_tokens)
  return ids + [-1] * (steps.bucket(len(ids), minimum=4) - len(ids))
