"""The request engine every generation path shares: prompts to token rows, the request's checks,
stop ids, padding to a length bucket, the cache of a request and its prefill, and turning
generated ids back into text (whole rows, or incrementally for streaming).

`kvjax.lm.generate`, token streaming, StreamingLLM, Skeleton-of-Thought expansion, EAGLE, the
coprocessor and DroidSpeak all set requests up through these functions.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.dense import KVCache
from kvjax.lm import sharding, steps
from kvjax.lm.detokenize import Detokenizer
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
  *,
  max_new_tokens: int,
  sampling: Sampling | None,
  key,
  stop: str | Sequence[str],
  stop_tokens: Sequence[int] | None,
  chat: bool,
) -> Request:
  """Every request's setup: the prompts tokenized and checked, the sampling and key checked,
  the stop strings and ids. Arguments as for `kvjax.lm.generate`."""
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
  cfg = model.cfg
  cache = KVCache.init(
    n_layers=cfg.n_layers,
    batch=batch,
    size=size,
    n_kv_heads=cfg.n_kv_heads,
    head_dim=cfg.head_dim,
    dtype=model.dtype,
  )
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
  t0 = time.perf_counter()
  (logits, cache), compile_s = steps.call(
    model, steps.prefill, model.state, cache, jnp.asarray(tokens), jnp.asarray(lengths)
  )
  logits.block_until_ready()
  return logits, cache, time.perf_counter() - t0 - compile_s, compile_s


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


def _cut_at_stop(model: Model, ids: list[int], stop: Sequence[str]) -> tuple[str, list[int], bool]:
  """Text before the first stop string, and the shortest token prefix that produces it."""
  text = model.tokenizer.decode(ids)
  hits = [text.find(s) for s in stop if s and s in text]
  if not hits:
    return text, ids, False
  cut = min(hits)
  lo, hi = 1, len(ids)  # smallest n whose decode reaches past the cut point with a stop string
  while lo < hi:
    mid = (lo + hi) // 2
    t = model.tokenizer.decode(ids[:mid])
    if any(s in t[cut:] for s in stop if s):
      hi = mid
    else:
      lo = mid + 1
  return text[:cut], ids[:lo], True


def outputs(
  model: Model, out: np.ndarray, counts: np.ndarray, stop: Sequence[str], stop_ids: Sequence[int]
) -> tuple[list[str], list[list[int]], list[str]]:
  """(texts, tokens, finish) of generated rows out [B, >= counts] cut at counts [B], as
  `Generation` reports them."""
  texts, tokens, finish = [], [], []
  for b in range(len(counts)):
    ids = out[b, : counts[b]].tolist()
    hit_stop = bool(ids) and ids[-1] in stop_ids
    reason = "stop_token" if hit_stop else "length"
    text = ""
    if model.tokenizer is not None:
      text, ids_cut, cut = _cut_at_stop(model, ids[:-1] if hit_stop else ids, stop)
      if cut:
        ids, reason = ids_cut, "stop_string"
    texts.append(text)
    tokens.append(ids)
    finish.append(reason)
  return texts, tokens, finish


def timed(pieces: Iterator[str], stats: dict) -> Iterator[str]:
  """Yields pieces, adding to stats["decode_s"] the seconds spent producing each (decode steps,
  detokenisation, stop checks), less the compile seconds the producer added to
  stats["compile_s"] meanwhile. The consumer's time between pieces is not counted."""
  pieces = iter(pieces)
  while True:
    t0, c0 = time.perf_counter(), stats["compile_s"]
    piece = next(pieces, None)
    stats["decode_s"] += time.perf_counter() - t0 - (stats["compile_s"] - c0)
    if piece is None:
      return
    yield piece


def detokenize(
  model: Model,
  tokens: Iterator[int],
  stop: Sequence[str],
  stop_ids: set[int],
  done: dict,
  *,
  keep_ids: bool = True,
) -> Iterator[str]:
  """Yields the text of `tokens` as it becomes final, pulling one token per piece: it ends at a
  stop token or a stop string (neither yielded) or when `tokens` runs out ("length"). Text that
  may start a stop string or an unfinished UTF-8 character is held back until it is decided.
  Fills `done` with n (tokens pulled, a stop token included), finish and, with keep_ids, ids
  (those tokens; an endless stream that needs none keeps constant memory without them).

  Work per token is bounded (`Detokenizer` decodes a short window of recent ids; stop strings
  are searched in the text not yet yielded, at most the longest stop string plus one piece),
  so an endless stream costs the same per token at its millionth token as at its first."""
  ids: list[int] = []
  done.update(n=0, finish="length", **({"ids": ids} if keep_ids else {}))
  text = Detokenizer(require_tokenizer(model, "detokenisation"))
  hold = max((len(s) for s in stop), default=1) - 1  # chars that may start a stop string
  pending = ""  # decoded, not yet yielded: every stop string that starts here is still unseen

  def cut(pending: str) -> int:
    return min((pending.find(s) for s in stop if s and s in pending), default=-1)

  for tok in tokens:
    done["n"] += 1
    if keep_ids:
      ids.append(tok)
    if tok in stop_ids:
      done["finish"] = "stop_token"
      break
    pending += text.push(tok)
    at = cut(pending)
    if at >= 0:
      done["finish"] = "stop_string"
      if at:
        yield pending[:at]
      return
    if len(pending) > hold:
      yield pending[: len(pending) - hold]
      pending = pending[len(pending) - hold :]
  pending += text.flush()
  at = cut(pending)
  if at >= 0:
    done["finish"] = "stop_string"
    pending = pending[:at]
  if pending:
    yield pending
