"""Text generation and scoring: tokenising, padding to buckets, stop handling, timing.

Python orchestration lives here; everything per token runs in the jitted steps of `steps`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.dense import KVCache
from kvjax.lm import steps
from kvjax.lm.model import Model
from kvjax.lm.sampling import Sampling

Prompt = str | Sequence[int]


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


def _tokenize(model: Model, prompts: Prompt | Sequence[Prompt], chat: bool) -> list[list[int]]:
  """Each prompt as a list of token ids; text goes through the tokenizer (or chat template)."""
  if isinstance(prompts, str) or (len(prompts) and not isinstance(prompts[0], str)
                                  and np.ndim(prompts[0]) == 0):
    prompts = [prompts]
  if not len(prompts):
    raise ValueError("prompts is empty: pass a string, a list of strings or of token-id lists")
  rows = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      if model.tokenizer is None:
        raise ValueError("the model has no tokenizer (no tokenizer.json): pass token ids")
      if chat:
        p = model.tokenizer.apply_chat_template([{"role": "user", "content": p}])
      ids = model.tokenizer.encode(p, add_special_tokens=not chat)
    else:
      arr = np.asarray(p)
      if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"prompt {i} must be a string or a flat sequence of int token ids; "
                         f"got a {arr.dtype} array of shape {arr.shape}")
      ids = arr.astype(np.int64).tolist()
    if not ids:
      raise ValueError(f"prompt {i} is empty: it needs at least one token")
    bad = [t for t in ids if not 0 <= t < model.cfg.vocab_size]
    if bad:
      raise ValueError(f"prompt {i} has token ids {bad[:5]} outside [0, {model.cfg.vocab_size})")
    rows.append(ids)
  return rows


def new_cache(model: Model, batch: int, size: int) -> KVCache:
  """An empty dense cache for `batch` rows of `size` slots, laid out like the params."""
  cfg = model.cfg
  cache = KVCache.init(n_layers=cfg.n_layers, batch=batch, size=size,
                       n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, dtype=model.dtype)
  if model.mesh is not None:
    from kvjax.lm import sharding
    cache = sharding.shard_cache(cache, model.mesh, model.rules)
  return cache


def pad(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
  """rows right-padded with 0 to [B, width] int32."""
  tokens = np.zeros((len(rows), width), np.int32)
  for b, ids in enumerate(rows):
    tokens[b, :len(ids)] = ids
  return tokens


def check_context(model: Model, rows: Sequence[Sequence[int]], max_new_tokens: int) -> None:
  """Refuses prompts that cannot take max_new_tokens more tokens within the model's context."""
  longest = max(map(len, rows))
  if longest + max_new_tokens > model.cfg.max_position:
    raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                     f"model's context of {model.cfg.max_position} positions")


def nbytes(tree) -> int:
  """Bytes of a pytree's arrays (a cache's memory)."""
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def _prefill(model: Model, rows: list[list[int]], max_new_tokens: int):
  """Pads rows to a length bucket and prefills a cache with room for max_new_tokens more."""
  check_context(model, rows, max_new_tokens)
  longest = max(map(len, rows))
  P = steps.bucket(longest)
  tokens = pad(rows, P)
  lengths = np.array([len(r) for r in rows], np.int32)
  cache = new_cache(model, len(rows), steps.bucket(max(P, longest + max_new_tokens)))
  t0 = time.perf_counter()
  (logits, cache), compile_s = steps.call(model, steps.prefill, model.state, cache,
                                    jnp.asarray(tokens), jnp.asarray(lengths))
  logits.block_until_ready()
  return logits, cache, time.perf_counter() - t0 - compile_s, compile_s


def _check(model: Model, max_new_tokens: int, sampling: Sampling | None, key) -> Sampling:
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1; got {max_new_tokens!r}")
  sampling = sampling or Sampling()
  if not isinstance(sampling, Sampling):
    raise TypeError(f"sampling must be a kvjax.lm.Sampling; got {type(sampling).__name__}")
  if not sampling.greedy and key is None:
    raise ValueError("sampling with temperature > 0 needs an explicit PRNG key: "
                     "key=jax.random.key(seed)")
  return sampling


def _stop_ids(model: Model, stop_tokens: Sequence[int] | None) -> list[int]:
  ids = list(model.eos_ids if stop_tokens is None else stop_tokens)
  bad = [t for t in ids if not 0 <= t < model.cfg.vocab_size]
  if bad:
    raise ValueError(f"stop_tokens {bad} outside [0, {model.cfg.vocab_size})")
  return ids


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


def outputs(model: Model, out: np.ndarray, counts: np.ndarray, stop: Sequence[str],
            stop_ids: Sequence[int]) -> tuple[list[str], list[list[int]], list[str]]:
  """(texts, tokens, finish) of generated rows out [B, >= counts] cut at counts [B], as
  `Generation` reports them."""
  texts, tokens, finish = [], [], []
  for b in range(len(counts)):
    ids = out[b, :counts[b]].tolist()
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


def generate(model: Model, prompts: Prompt | Sequence[Prompt], *, max_new_tokens: int = 64,
             sampling: Sampling | None = None, key: jax.Array | None = None,
             stop: Sequence[str] = (), stop_tokens: Sequence[int] | None = None,
             chat: bool = False, coprocessor=None, delay: int = 0) -> Generation:
  """Generates a continuation for each prompt in one batch (rows may differ in length).

  prompts: a string, token ids, or a list of either. sampling: greedy by default; anything
  else needs `key`. stop_tokens: default the model's eos ids. stop: strings that end a row
  (checked on the decoded text; the text is cut before them). chat: wrap each prompt as a
  user message with the model's chat template. coprocessor: a `kvjax.coprocessor.Coprocessor`
  for this model: its latents augment the cache before the prompt's last token (see
  `kvjax.coprocessor.generate`); delay: they arrive that many tokens late.
  """
  sampling = _check(model, max_new_tokens, sampling, key)
  rows = _tokenize(model, prompts, chat)
  stop = [stop] if isinstance(stop, str) else list(stop)
  if stop and model.tokenizer is None:
    raise ValueError("stop strings need the model's tokenizer")
  stop_ids = _stop_ids(model, stop_tokens)
  stop_ids += [-1] * (steps.bucket(len(stop_ids), minimum=4) - len(stop_ids))  # one shape
  key = jax.random.key(0) if key is None else key
  early = np.zeros((len(rows), 0), np.int32)
  if coprocessor is None:
    if delay:
      raise ValueError("delay applies only with a coprocessor")
    logits, cache, prefill_s, compile_p = _prefill(model, rows, max_new_tokens)
  else:
    from kvjax.coprocessor.generate import prefill as augmented
    logits, cache, early, prefill_s, compile_p = augmented(
        model, coprocessor, rows, max_new_tokens, delay=delay, sampling=sampling, key=key)
    key = jax.random.fold_in(key, early.shape[1])
  cache_bytes = nbytes(cache)
  rest = max_new_tokens - early.shape[1]
  t0 = time.perf_counter()
  (out, counts, cache), compile_d = steps.call(
      model, steps.decode_loop, model.state, cache, logits, key, jnp.int32(rest),
      jnp.asarray(stop_ids, jnp.int32), sampling=sampling, max_steps=steps.bucket(rest))
  out, counts = np.asarray(out), np.asarray(counts)
  decode_s = time.perf_counter() - t0 - compile_d
  del cache
  if early.shape[1]:  # tokens sampled before delayed latents arrived come first
    out, counts = _join(early, out, counts, stop_ids)
  texts, tokens, finish = outputs(model, out, counts, stop, stop_ids)
  new = int(counts.sum())
  stats = dict(prefill_s=prefill_s, decode_s=decode_s, compile_s=compile_p + compile_d,
               prompt_tokens=sum(map(len, rows)), new_tokens=new, cache_bytes=cache_bytes,
               decode_tokens_per_s=new / decode_s if decode_s > 0 else float("nan"))
  return Generation(texts, tokens, rows, finish, stats)


def _join(early: np.ndarray, out: np.ndarray, counts: np.ndarray,
          stop_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """early [B, k] then out [B, M] (counts [B]) as one output, a row ending at its first stop."""
  k = early.shape[1]
  joined = np.concatenate([early, out], axis=1)
  total = k + counts
  for b in range(len(early)):
    hits = [i for i in range(k) if early[b, i] in stop_ids]
    if hits:
      total[b] = hits[0] + 1
  return joined, total


def stream(model: Model, prompt: Prompt, *, max_new_tokens: int = 256,
           sampling: Sampling | None = None, key: jax.Array | None = None,
           stop: Sequence[str] = (), stop_tokens: Sequence[int] | None = None,
           chat: bool = False, stats: dict | None = None) -> Iterator[str]:
  """Yields the continuation of one prompt as text pieces while it is generated (one jitted
  step per token: sampling and the decode step fused, one dispatch). Stops at a stop token, a
  stop string (not yielded) or the limit.

  stats: a dict to fill, once the stream ends, with prefill_s, decode_s, compile_s,
  prompt_tokens, new_tokens, decode_tokens_per_s and finish (as `generate` reports them)."""
  if model.tokenizer is None:
    raise ValueError("stream needs the model's tokenizer")
  sampling = _check(model, max_new_tokens, sampling, key)
  if not isinstance(prompt, str) and len(prompt) and not isinstance(prompt[0], (int, np.integer)):
    raise ValueError("stream takes one prompt (a string or token ids); use generate for a batch")
  rows = _tokenize(model, prompt, chat)
  stop = [stop] if isinstance(stop, str) else list(stop)
  stop_ids = set(_stop_ids(model, stop_tokens))
  logits, cache, prefill_s, compile_s = _prefill(model, rows, max_new_tokens)
  key = jax.random.key(0) if key is None else key
  decode_s = 0.0

  def tokens() -> Iterator[int]:
    nonlocal logits, cache, decode_s, compile_s
    for step in range(max_new_tokens):  # one dispatch and one host read per token
      t0 = time.perf_counter()
      (tok, logits, cache), c = steps.call(model, steps.sample_decode, model.state, cache,
                                           logits, key, jnp.int32(step), sampling=sampling)
      tok = int(tok[0])
      decode_s += time.perf_counter() - t0 - c
      compile_s += c
      yield tok

  done: dict = {}
  yield from detokenize(model, tokens(), stop, stop_ids, done)
  if stats is not None:
    n = len(done["ids"])
    stats.update(prefill_s=prefill_s, decode_s=decode_s, compile_s=compile_s,
                 prompt_tokens=len(rows[0]), new_tokens=n, finish=done["finish"],
                 decode_tokens_per_s=n / decode_s if decode_s > 0 else float("nan"))


def detokenize(model: Model, tokens: Iterator[int], stop: Sequence[str], stop_ids: set[int],
               done: dict) -> Iterator[str]:
  """Yields the text of `tokens` as it becomes final, pulling one token per piece: it ends at a
  stop token or a stop string (neither yielded) or when `tokens` runs out ("length"). Text that
  may start a stop string or an unfinished UTF-8 character is held back until it is decided.
  Fills `done` with ids (every token pulled, a stop token included) and finish."""
  ids: list[int] = []
  done.update(ids=ids, finish="length")
  emitted = 0
  hold = max((len(s) for s in stop), default=1) - 1  # chars that may start a stop string
  for tok in tokens:
    ids.append(tok)
    if tok in stop_ids:
      done["finish"] = "stop_token"
      return
    text = model.tokenizer.decode(ids)
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    if cut >= 0:
      done["finish"] = "stop_string"
      if cut > emitted:
        yield text[emitted:cut]
      return
    ready = len(text) - hold
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
      ready = min(ready, len(text) - 1)
    if ready > emitted:
      yield text[emitted:ready]
      emitted = ready
  text = model.tokenizer.decode(ids)
  if len(text) > emitted:
    yield text[emitted:]


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
  rows = _tokenize(model, rows, chat=False)
  ragged = len({len(r) for r in rows}) > 1
  longest = max(map(len, rows))
  if longest > model.cfg.max_position:
    raise ValueError(f"a row of {longest} tokens exceeds the model's context of "
                     f"{model.cfg.max_position} positions")
  tokens = pad(rows, steps.bucket(longest, minimum=8))
  logits, _ = steps.call(model, steps.score, model.state, jnp.asarray(tokens))
  logits = np.asarray(logits)
  if ragged:
    return [logits[b, :len(r)] for b, r in enumerate(rows)]
  out = logits[:, :len(rows[0])]
  return out[0] if single else out
