"""Text generation and scoring: tokenising, padding to buckets, stop handling, timing.

Python orchestration lives here; everything per token runs in the jitted steps of `steps`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.lm import distributed, engine, steps
from kvjax.lm.detokenize import detokenize, outputs, timed
from kvjax.lm.engine import (
  NonFiniteError,
  Prompt,
  check_context,
  nbytes,
  new_cache,
  pad,
  tokenize,
)
from kvjax.lm.model import Model
from kvjax.lm.sampling import Sampling
from kvjax.lm.stats import decode_stats

__all__ = [
  "Generation",
  "NonFiniteError",
  "Prefill",
  "Prompt",
  "check_context",
  "detokenize",
  "generate",
  "generate_iter",
  "nbytes",
  "new_cache",
  "outputs",
  "pad",
  "score",
]


class Prefill(Protocol):
  """A request's prefill done another way than `engine.prefill` (the coprocessor's augmented
  prefill): rows of prompt ids -> (logits [B, V] of the next token, the cache, early [B, k]
  int32 tokens already sampled and fed (k >= 0; they come first in the output), prefill_s,
  compile_s). The cache must have room for max_new_tokens - k more tokens."""

  def __call__(
    self,
    model: Model,
    rows: list[list[int]],
    max_new_tokens: int,
    *,
    sampling: Sampling,
    key: jax.Array,
  ): ...


@dataclasses.dataclass
class Generation:
  """texts: the continuation of each prompt (stop token and stop string excluded).
  tokens: generated ids per prompt; a stop token that ended a row is its last id.
  finish: per prompt, "stop_token", "stop_string" or "length".
  stats: prefill_s, decode_s, decode_tokens_per_s, compile_s, prompt_tokens, new_tokens,
  cache_bytes (the decode cache's arrays)."""

  texts: list[str]
  tokens: list[list[int]]
  prompt_tokens: list[list[int]]
  finish: list[str]
  stats: dict[str, float]


def generate(
  model: Model,
  prompts: Prompt | Sequence[Prompt],
  *,
  max_new_tokens: int = 64,
  sampling: Sampling | None = None,
  key: jax.Array | None = None,
  stop: Sequence[str] = (),
  stop_tokens: Sequence[int] | None = None,
  chat: bool = False,
  prefill: Prefill | None = None,
) -> Generation:
  """Generates a continuation for each prompt in one batch (rows may differ in length).

  prompts: a string, token ids, or a list of either. sampling: greedy by default; anything
  else needs `key`. stop_tokens: default the model's eos ids. stop: strings that end a row
  (checked on the decoded text; the text is cut before them). chat: wrap each prompt as a
  user message with the model's chat template. prefill: a request's prefill done another way
  (a `Prefill`, e.g. `kvjax.coprocessor.Coprocessor.prefiller(delay)`: latents augment the
  cache); default `engine.prefill` (`kvjax.coprocessor.generate` is the coprocessor's entry).
  """
  req = engine.request(model, prompts, max_new_tokens, sampling, key, stop, stop_tokens, chat)
  rows, sampling, key = req.rows, req.sampling, req.key
  early = np.zeros((len(rows), 0), np.int32)
  if prefill is None:
    logits, cache, prefill_s, compile_p = engine.prefill(model, rows, max_new_tokens)
  else:
    logits, cache, early, prefill_s, compile_p = prefill(
      model, rows, max_new_tokens, sampling=sampling, key=key
    )
    key = jax.random.fold_in(key, early.shape[1])
  cache_bytes = nbytes(cache)
  out, counts, decode_s, compile_d = _decode(
    model, cache, logits, key, max_new_tokens - early.shape[1], req
  )
  if early.shape[1]:  # tokens sampled before delayed latents arrived come first
    out, counts = _join(early, out, counts, req.stop_ids)
  texts, tokens, finish = outputs(model, out, counts, req.stop, req.stop_ids)
  stats = decode_stats(
    prefill_s=prefill_s,
    decode_s=decode_s,
    compile_s=compile_p + compile_d,
    prompt_tokens=sum(map(len, rows)),
    new_tokens=int(counts.sum()),
    cache_bytes=cache_bytes,
  )
  return Generation(texts, tokens, rows, finish, stats)


def _decode(
  model: Model, cache, logits: jax.Array, key: jax.Array, n: int, req: engine.Request
) -> tuple[np.ndarray, np.ndarray, float, float]:
  """Decodes up to n tokens per row from the prefill's logits [B, V] and cache (donated) in
  one `steps.decode_loop` call -> (tokens [B, M], counts [B] (every process's rows), decode
  seconds, compile seconds); raises NonFiniteError for a row that sampled from NaN logits."""
  dec, decode_s, compile_s = steps.timed(
    model,
    steps.decode_loop,
    cache,
    logits,
    key,
    jnp.int32(n),
    jnp.asarray(req.stop_ids, jnp.int32),
    sampling=req.sampling,
    max_steps=steps.bucket(n),
  )
  out, counts, bad = distributed.fetch((dec.tokens, dec.counts, dec.bad))
  del dec  # the decode cache
  engine.check_finite(model, bad, "generate")
  return out, counts, decode_s, compile_s


def _join(
  early: np.ndarray, out: np.ndarray, counts: np.ndarray, stop_ids: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
  """early [B, k] then out [B, M] (counts [B]) as one output, a row ending at its first stop."""
  k = early.shape[1]
  joined = np.concatenate([early, out], axis=1)
  total = k + counts
  for b in range(len(early)):
    hits = [i for i in range(k) if early[b, i] in stop_ids]
    if hits:
      total[b] = hits[0] + 1
  return joined, total


def generate_iter(
  model: Model,
  prompt: Prompt,
  *,
  max_new_tokens: int = 256,
  sampling: Sampling | None = None,
  key: jax.Array | None = None,
  stop: Sequence[str] = (),
  stop_tokens: Sequence[int] | None = None,
  chat: bool = False,
  stats: dict | None = None,
) -> Iterator[str]:
  """Yields the continuation of one prompt as text pieces while it is generated (one jitted
  step per token: sampling and the decode step fused, one dispatch). Stops at a stop token, a
  stop string (not yielded) or the limit.

  stats: a dict to fill, once the stream ends, with prefill_s, decode_s, compile_s,
  prompt_tokens, new_tokens, decode_tokens_per_s and finish (as `generate` reports them;
  decode_s also counts the detokenisation, everything between the caller's pieces)."""
  engine.require_tokenizer(model, "generate_iter")
  if not isinstance(prompt, str) and len(prompt) and not isinstance(prompt[0], (int, np.integer)):
    raise ValueError(
      "generate_iter takes one prompt (a string or token ids); use generate for a batch"
    )
  req = engine.request(model, prompt, max_new_tokens, sampling, key, stop, stop_tokens, chat)
  rows, sampling, key, stop, stop_ids = req.rows, req.sampling, req.key, req.stop, set(req.stop_ids)
  logits, cache, prefill_s, compile_s = engine.prefill(model, rows, max_new_tokens)
  acc = dict(decode_s=0.0, compile_s=compile_s)

  def tokens() -> Iterator[int]:
    nonlocal logits, cache
    for step in range(max_new_tokens):  # one dispatch and one host read per token
      (tok, bad, logits, cache), c = steps.call(
        model,
        steps.sample_decode,
        cache,
        logits,
        key,
        jnp.int32(step),
        sampling=sampling,
      )
      acc["compile_s"] += c
      tok, bad = distributed.fetch((tok, bad))
      engine.check_finite(model, bad, f"generate_iter (token {step})")
      yield int(tok[0])

  done: dict = {}
  yield from timed(detokenize(model, tokens(), stop, stop_ids, done), acc)
  if stats is not None:
    stats.update(
      decode_stats(
        prefill_s=prefill_s,
        decode_s=acc["decode_s"],
        compile_s=acc["compile_s"],
        prompt_tokens=len(rows[0]),
        new_tokens=done["n"],
        finish=done["finish"],
      )
    )


def score(model: Model, token_ids) -> np.ndarray | list[np.ndarray]:
  """Full-sequence logits with no cache: the ground truth every cache trick is tested against.

  token_ids: [T] -> [T, V]; [B, T] -> [B, T, V]; a list of rows of different lengths -> a list
  of [T_b, V] arrays. float32 numpy.
  """
  if isinstance(token_ids, (np.ndarray, jax.Array)):
    if np.ndim(token_ids) not in (1, 2):
      raise ValueError(f"token_ids must be [T] or [B, T]; got shape {np.shape(token_ids)}")
    single = np.ndim(token_ids) == 1
    rows = [list(r) for r in np.atleast_2d(np.asarray(token_ids))]
  else:
    rows = list(token_ids)
    single = bool(rows) and isinstance(rows[0], (int, np.integer))
    rows = [rows] if single else rows
  if any(isinstance(r, str) for r in rows):
    raise TypeError("score takes token ids, not text: encode with model.tokenizer first")
  rows = tokenize(model, rows, chat=False)
  ragged = len({len(r) for r in rows}) > 1
  longest = max(map(len, rows))
  if longest > model.cfg.max_position:
    raise ValueError(
      f"a row of {longest} tokens exceeds the model's context of {model.cfg.max_position} positions"
    )
  tokens = pad(rows, steps.bucket(longest, minimum=8))
  logits, _ = steps.call(model, steps.score, jnp.asarray(tokens))
  logits = distributed.fetch(logits)
  engine.check_finite(
    model, [not np.isfinite(logits[b, : len(r)]).all() for b, r in enumerate(rows)], "score"
  )
  if ragged:
    return [logits[b, : len(r)] for b, r in enumerate(rows)]
  out = logits[:, : len(rows[0])]
  return out[0] if single else out
