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
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.prefix import PrefixCache
from kvjax.lm import steps
from kvjax.lm.detokenize import Detokenizer, outputs
from kvjax.lm.engine import (
  Prompt,
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
  rows = list(
    expand_stream(
      model,
      prompts,
      max_new_tokens=max_new_tokens,
      sampling=sampling,
      key=key,
      stop=stop,
      stop_tokens=stop_tokens,
      chat=chat,
      share=share,
      chunk=None,
      stats=stats,
    )
  )
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
  req = request(
    model,
    prompts,
    max_new_tokens=1,
    sampling=sampling,
    key=key,
    stop=stop,
    stop_tokens=stop_tokens,
    chat=chat,
  )  # the budgets are checked per row below
  rows, sampling, key, stop, stops = req.rows, req.sampling, req.key, req.stop, req.stop_ids
  B = len(rows)
  budgets = _budgets(max_new_tokens, B)
  if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
    raise ValueError(f"chunk must be an int >= 1 or None; got {chunk!r}")
  n = common_prefix(rows) if share and B > 1 else 0
  n = min(n, min(map(len, rows)) - 1)  # every row keeps a token of its own to prefill
  if n > 0:
    logits, cache, prefill_s, compile_s = _shared_prefill(model, rows, n, int(budgets.max()))
  else:
    logits, cache, prefill_s, compile_s = prefill(model, rows, int(budgets.max()))
  cache_bytes = nbytes(cache)
  per_call = steps.bucket(int(budgets.max())) if chunk is None else chunk

  stop_arr, budget_arr = jnp.asarray(stops, jnp.int32), jnp.asarray(budgets)
  done, counts = jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32)
  pieces, decode_s, n_steps, emitted = [], 0.0, 0, 0
  before = np.zeros(B, np.int32)  # tokens each row had emitted before this call
  watch = [_StopWatch(model.tokenizer, stop) for _ in range(B)] if stop else []
  outs: list = [None] * B
  while emitted < B:
    t0 = time.perf_counter()
    (out, done, counts, bad, logits, cache), c = steps.call(
      model,
      steps.decode_more,
      model.state,
      cache,
      logits,
      key,
      jnp.int32(n_steps),
      done,
      counts,
      budget_arr,
      stop_arr,
      sampling=sampling,
      max_steps=per_call,
    )
    out, done_np, counts_np = np.asarray(out), np.asarray(done), np.asarray(counts)
    check_finite(model, bad, "point expansion")
    decode_s += time.perf_counter() - t0 - c
    compile_s += c
    pieces.append(out)
    n_steps += per_call
    if stop:  # a row whose text reached a stop string is done
      hit = [
        b
        for b in range(B)
        if before[b] < counts_np[b]
        and watch[b].feed(out[b, : counts_np[b] - before[b]])
        and not done_np[b]
      ]
      if hit:
        done_np = done_np.copy()
        done_np[hit] = True
        done = jnp.asarray(done_np)
    before = counts_np
    if emitted < B and done_np[emitted]:
      so_far = np.concatenate(pieces, axis=1)
    while emitted < B and done_np[emitted]:
      b = emitted
      texts, tokens, finish = outputs(model, so_far[b : b + 1], counts_np[b : b + 1], stop, stops)
      outs[b] = Row(b, texts[0], tokens[0], finish[0], rows[b])
      emitted += 1
      yield outs[b]
  if stats is not None:
    new = sum(len(r.tokens) for r in outs)
    stats.update(
      prefill_s=prefill_s,
      decode_s=decode_s,
      compile_s=compile_s,
      prompt_tokens=sum(map(len, rows)),
      new_tokens=new,
      decode_tokens_per_s=new / decode_s if decode_s > 0 else float("nan"),
      prefix_tokens_shared=n,
      cache_bytes=cache_bytes,
    )


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
  t0 = time.perf_counter()
  (logits, cache), c = steps.call(
    model,
    steps.extend,
    model.state,
    cache,
    jnp.asarray(tokens),
    jnp.asarray([len(s) for s in suffixes], jnp.int32),
  )
  logits.block_until_ready()
  return logits, cache, prefill_s + time.perf_counter() - t0 - c, compile_s + c
