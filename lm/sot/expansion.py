"""Many continuations of one shared prefix, generated in one batch.

Rows that start with the same tokens (Skeleton-of-Thought's point prompts: the question and the
skeleton, then each point's own instruction) are prefilled once: their longest common prefix
goes into a one-row cache that every row reads (`kvjax.cache.prefix.PrefixCache`), each row's
own suffix is prefilled on top, and all rows decode in one batched jitted loop, each stopping on
its own (a stop token, a stop string or its token budget). Greedy rows equal generating each
prompt alone; `share=False` batches the full prompts instead (every row stores the prefix).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.prefix import PrefixCache
from kvjax.lm import steps
from kvjax.lm.detokenize import Detokenizer, outputs
from kvjax.lm.engine import (
  Prompt,
  Request,
  check_context,
  check_finite,
  nbytes,
  new_cache,
  pad,
  prefill,
  request,
)
from kvjax.lm.generate import Generation
from kvjax.lm.model import Model
from kvjax.lm.sampling import Sampling
from kvjax.lm.stats import decode_stats


@dataclasses.dataclass
class Row:
  """One finished row: its index in the batch, text, generated ids, finish reason (as in
  `Generation`) and prompt ids."""

  index: int
  text: str
  tokens: list[int]
  finish: str
  prompt: list[int]


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
  """The number of leading tokens every row shares."""
  n = min(map(len, rows))
  for i in range(n):
    if any(r[i] != rows[0][i] for r in rows[1:]):
      return i
  return n


def expand(
  model: Model,
  prompts: Sequence[Prompt],
  *,
  max_new_tokens: int | Sequence[int] = 64,
  sampling: Sampling | None = None,
  key: jax.Array | None = None,
  stop: Sequence[str] = (),
  stop_tokens: Sequence[int] | None = None,
  chat: bool = False,
  share: bool = True,
) -> Generation:
  """Generates a continuation of every prompt in one batch, prefilling their common prefix once.

  Arguments as in `lm.generate`, except max_new_tokens, which may give each row its own budget.
  share: keep the common prefix once for all rows (False: every row stores its whole prompt).
  stats add prefix_tokens_shared (0 without sharing) and cache_bytes (the decode cache's
  arrays)."""
  stats: dict = {}
  req = request(model, prompts, 1, sampling, key, stop, stop_tokens, chat)  # budgets: per row
  rows = list(_rows(model, req, max_new_tokens, share=share, chunk=None, stats=stats))
  return Generation(
    [r.text for r in rows],
    [r.tokens for r in rows],
    [r.prompt for r in rows],
    [r.finish for r in rows],
    stats,
  )


def expand_stream(
  model: Model,
  prompts: Sequence[Prompt],
  *,
  max_new_tokens: int | Sequence[int] = 64,
  sampling: Sampling | None = None,
  key: jax.Array | None = None,
  stop: Sequence[str] = (),
  stop_tokens: Sequence[int] | None = None,
  chat: bool = False,
  share: bool = True,
  chunk: int | None = 16,
  stats: dict | None = None,
) -> Iterator[Row]:
  """`expand`, yielding rows in order: row i as soon as it and every row before it finished.

  chunk: decode steps per jitted call between checks (None: one call for the whole budget; rows
  then arrive together). Sampling continues one PRNG stream across calls, so the rows are the
  same for any chunk. stats: a dict filled as `expand` reports it once the stream ends."""
  req = request(model, prompts, 1, sampling, key, stop, stop_tokens, chat)  # budgets: per row
  yield from _rows(model, req, max_new_tokens, share=share, chunk=chunk, stats=stats)


def _rows(
  model: Model,
  req: Request,
  max_new_tokens: int | Sequence[int],
  *,
  share: bool,
  chunk: int | None,
  stats: dict | None,
) -> Iterator[Row]:
  """`expand_stream` of a checked request (its max_new_tokens checked here, per row)."""
  rows, stop, stops = req.rows, req.stop, req.stop_ids
  B = len(rows)
  budgets = _budgets(max_new_tokens, B)
  if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
    raise ValueError(f"chunk must be an int >= 1 or None; got {chunk!r}")
  n, logits, cache, prefill_s, compile_s = _prefill(model, rows, int(budgets.max()), share)
  cache_bytes = nbytes(cache)
  run = _Decoding(
    model,
    req,
    budgets=jnp.asarray(budgets),
    per_call=steps.bucket(int(budgets.max())) if chunk is None else chunk,
    logits=logits,
    cache=cache,
  )
  pieces, emitted, outs = [], 0, []
  before = np.zeros(B, np.int32)  # tokens each row had emitted before this call
  watch = [_StopWatch(model.tokenizer, stop) for _ in range(B)] if stop else []
  while emitted < B:
    out, done, counts = run.step()
    pieces.append(out)
    if stop and (hit := _stop_hits(watch, out, before, counts, done)):
      done = run.stop(hit)
    before = counts
    if done[emitted]:
      so_far = np.concatenate(pieces, axis=1)
    while emitted < B and done[emitted]:
      b = emitted
      texts, tokens, finish = outputs(model, so_far[b : b + 1], counts[b : b + 1], stop, stops)
      outs.append(Row(b, texts[0], tokens[0], finish[0], rows[b]))
      emitted += 1
      yield outs[b]
  if stats is not None:
    stats.update(
      decode_stats(
        prefill_s=prefill_s,
        decode_s=run.decode_s,
        compile_s=compile_s + run.compile_s,
        prompt_tokens=sum(map(len, rows)),
        new_tokens=sum(len(r.tokens) for r in outs),
        prefix_tokens_shared=n,
        cache_bytes=cache_bytes,
      )
    )


class _Decoding:
  """The batch's decode, `per_call` steps per `steps.decode_more` call: the device state
  between calls (logits [B, V], the donated cache, done [B], counts [B]), the PRNG stream's
  position and the seconds spent."""

  def __init__(self, model: Model, req: Request, *, budgets, per_call: int, logits, cache):
    self.model, self.req, self.budgets, self.per_call = model, req, budgets, per_call
    self.stop_ids = jnp.asarray(req.stop_ids, jnp.int32)
    self.logits, self.cache = logits, cache
    B = logits.shape[0]
    self.done, self.counts = jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32)
    self.n_steps, self.decode_s, self.compile_s = 0, 0.0, 0.0

  def step(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One call -> (tokens [B, per_call] of its steps, done [B], counts [B]) on the host."""
    dec, seconds, c = steps.timed(
      self.model,
      steps.decode_more,
      self.cache,
      self.logits,
      self.req.key,
      jnp.int32(self.n_steps),
      self.done,
      self.counts,
      self.budgets,
      self.stop_ids,
      sampling=self.req.sampling,
      max_steps=self.per_call,
    )
    self.logits, self.cache, self.done, self.counts = dec.logits, dec.cache, dec.done, dec.counts
    out, done, counts = np.asarray(dec.tokens), np.asarray(dec.done), np.asarray(dec.counts)
    check_finite(self.model, dec.bad, "point expansion")
    self.decode_s += seconds
    self.compile_s += c
    self.n_steps += self.per_call
    return out, done, counts

  def stop(self, rows: Sequence[int]) -> np.ndarray:
    """Ends these rows (their text reached a stop string) -> done [B] on the host."""
    done = np.asarray(self.done).copy()
    done[list(rows)] = True
    self.done = jnp.asarray(done)
    return done


def _prefill(model: Model, rows: list[list[int]], budget: int, share: bool):
  """Prefills every row, their common prefix once when `share` (and it is not a whole row)
  -> (prefix tokens shared, logits [B, V], cache, seconds, compile seconds)."""
  n = common_prefix(rows) if share and len(rows) > 1 else 0
  n = min(n, min(map(len, rows)) - 1)  # every row keeps a token of its own to prefill
  if n > 0:
    return n, *_shared_prefill(model, rows, n, budget)
  return 0, *prefill(model, rows, budget)


def _stop_hits(watch, out: np.ndarray, before: np.ndarray, counts: np.ndarray, done) -> list[int]:
  """The live rows whose text reached a stop string in this call's tokens out [B, C] (row b
  emitted counts[b] - before[b] of them); each row's watch is fed its new tokens."""
  return [
    b
    for b in range(len(watch))
    if before[b] < counts[b] and watch[b].feed(out[b, : counts[b] - before[b]]) and not done[b]
  ]


def _budgets(max_new_tokens, B: int) -> np.ndarray:
  if isinstance(max_new_tokens, (int, np.integer)):
    max_new_tokens = [max_new_tokens] * B
  budgets = list(max_new_tokens)
  if len(budgets) != B or any(
    isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1 for m in budgets
  ):
    raise ValueError(
      f"max_new_tokens must be an int >= 1 or {B} of them (one per prompt); got {max_new_tokens!r}"
    )
  return np.asarray(budgets, np.int32)


class _StopWatch:
  """Whether one row's text has reached a stop string, fed the row's new ids call by call:
  bounded work per token (incremental detokenisation, and a search of the new text after the
  tail of the old that a stop string could start in)."""

  def __init__(self, tokenizer, stop: Sequence[str]):
    self.text, self.stop = Detokenizer(tokenizer), [s for s in stop if s]
    self.keep, self.tail = max(map(len, self.stop), default=1) - 1, ""

  def feed(self, ids: np.ndarray) -> bool:
    seen = self.tail + "".join(self.text.push(int(t)) for t in ids)
    self.tail = seen[len(seen) - self.keep :] if self.keep else ""
    return any(s in seen for s in self.stop)


def _shared_prefill(model: Model, rows: list[list[int]], n: int, budget: int):
  """Prefills the first n tokens (shared by every row) once, then each row's suffix over them.
  Returns (logits [B, V] at each row's last token, PrefixCache, seconds, compile seconds)."""
  check_context(model, rows, budget)
  _, prefix, prefill_s, compile_s = prefill(model, [rows[0][:n]], 0)
  suffixes = [r[n:] for r in rows]
  longest = max(map(len, suffixes))
  tokens = pad(suffixes, steps.bucket(longest, minimum=8))
  own = new_cache(model, len(rows), steps.bucket(longest + budget))
  cache = PrefixCache(prefix=prefix, rows=own)
  (logits, cache), seconds, c = steps.timed(
    model,
    steps.extend,
    cache,
    jnp.asarray(tokens),
    jnp.asarray([len(s) for s in suffixes], jnp.int32),
  )
  return logits, cache, prefill_s + seconds, compile_s + c
