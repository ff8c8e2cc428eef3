"""A StreamingLLM session: endless generation or a multi-turn chat in constant memory (a
SinkCache of n_sink + window slots is all it ever holds)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.sink import SinkCache
from kvjax.lm import engine, steps
from kvjax.lm.detokenize import detokenize, timed
from kvjax.lm.engine import check_request, stop_ids
from kvjax.lm.model import Model
from kvjax.lm.sampling import Sampling
from kvjax.lm.stats import tokens_per_s


class Session:
  """A StreamingLLM session: endless generation or a multi-turn chat in n_sink + window slots.

      s = Session(model, n_sink=4, window=252)
      for piece in s.turn("ROMEO:", max_new_tokens=64): ...        # a reply of <= 64 tokens
      for piece in s.turn("JULIET:", max_new_tokens=None): ...     # endless (stop token ends)

  The session's SinkCache (batch 1) is all the memory it ever holds. A turn feeds its prompt in
  chunks of `chunk` tokens, then samples one jitted decode step per token. When the prompt and
  the reply budget fit the window together, the turn first evicts the oldest tokens to make room
  for both (the per-turn policy of the paper's chat demo); otherwise (endless generation, long
  prompts) tokens are evicted one by one as they arrive (per-token policy). Each sampled token
  (a stop token included) enters the cache in the dispatch that samples it.

  stats: tokens_generated, prompt_tokens, peak_cache_tokens (most tokens held at once),
  prefill_s, decode_s (the seconds spent producing the replies' text: decode steps and
  detokenisation, compile excluded), compile_s, tokens_per_s (generated tokens per decode_s).
  """

  def __init__(
    self,
    model: Model,
    *,
    n_sink: int = 4,
    window: int,
    chunk: int | None = None,
    sampling: Sampling | None = None,
    key: jax.Array | None = None,
    stop_tokens: Sequence[int] | None = None,
  ):
    engine.require_tokenizer(model, "a streaming session")
    if not isinstance(n_sink, int) or n_sink < 0:
      raise ValueError(f"n_sink must be an int >= 0; got {n_sink!r}")
    if not isinstance(window, int) or window < 1:
      raise ValueError(
        f"window must be an int >= 1 (the cache needs room besides its "
        f"{n_sink} sinks); got {window!r}"
      )
    if n_sink + window > model.cfg.max_position:
      raise ValueError(
        f"sinks + window = {n_sink + window} exceeds the model's context of "
        f"{model.cfg.max_position} positions"
      )
    chunk = min(window, 256) if chunk is None else chunk
    if not isinstance(chunk, int) or not 1 <= chunk <= window:
      raise ValueError(
        f"chunk must be an int in [1, window={window}] (a prefill chunk must fit "
        f"the window); got {chunk!r}"
      )
    self.model, self.chunk = model, chunk
    self.sampling = check_request(model, 1, sampling, key)
    self.key = jax.random.key(0) if key is None else key
    self.stop_ids = set(stop_ids(model, stop_tokens))
    self.cache = SinkCache.init(
      **model.cfg.cache_dims, batch=1, n_sink=n_sink, window=window, dtype=model.dtype
    )
    self.logits: jax.Array | None = None  # [1, V] for the next token, once anything is fed
    self.steps = 0  # sampling steps so far (folded into the key)
    self.stats = dict(
      tokens_generated=0,
      prompt_tokens=0,
      peak_cache_tokens=0,
      prefill_s=0.0,
      decode_s=0.0,
      compile_s=0.0,
      tokens_per_s=float("nan"),
    )

  def _held(self) -> None:
    self.stats["peak_cache_tokens"] = max(
      self.stats["peak_cache_tokens"], int(self.cache.length[0])
    )

  def feed(self, ids: list[int]) -> None:
    """Feeds token ids into the cache in chunks without replying (evicting per token if they
    overflow the window); a turn feeds its prompt through it. Subclasses that keep more
    state per token (a speculating session's draft head) extend it."""
    C = self.chunk
    for lo in range(0, len(ids), C):
      part = ids[lo : lo + C]
      tokens = np.zeros((1, C), np.int32)
      tokens[0, : len(part)] = part
      (self.logits, self.cache), seconds, c = steps.timed(
        self.model,
        steps.extend,
        self.cache,
        jnp.asarray(tokens),
        jnp.asarray([len(part)], jnp.int32),
      )
      self.stats["prefill_s"] += seconds
      self.stats["compile_s"] += c

  def turn(
    self,
    prompt: str | Sequence[int] = "",
    *,
    max_new_tokens: int | None = 64,
    stop: Sequence[str] = (),
    chat: bool = False,
    done: dict | None = None,
    keep_ids: bool = True,
  ) -> Iterator[str]:
    """Feeds `prompt` (text, or token ids; may be empty after the first turn to continue),
    then yields the reply's text as it is generated: at most max_new_tokens tokens (None: no
    limit), ending early at a stop token or stop string (neither yielded). chat: wrap the
    prompt as a user message with the model's chat template. done: filled at the end with the
    reply's ids (keep_ids=False: only their number n, so that an endless reply holds constant
    memory) and finish ("stop_token", "stop_string" or "length")."""
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
      raise ValueError(f"max_new_tokens must be an int >= 1 or None; got {max_new_tokens!r}")
    stop = [stop] if isinstance(stop, str) else list(stop)
    tok = self.model.tokenizer
    if isinstance(prompt, str):
      first = self.logits is None
      if chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}])
      ids = tok.encode(prompt, add_special_tokens=first and not chat) if prompt else []
    else:
      ids = [int(t) for t in prompt]
      bad = [t for t in ids if not 0 <= t < self.model.cfg.vocab_size]
      if bad:
        raise ValueError(f"prompt token ids {bad[:5]} outside [0, {self.model.cfg.vocab_size})")
    if not ids and self.logits is None:
      raise ValueError("the first turn needs a non-empty prompt")
    if max_new_tokens is not None and len(ids) + max_new_tokens <= self.cache.window:
      self._held()
      self.cache = self.cache.make_room(len(ids) + max_new_tokens)
    self.stats["prompt_tokens"] += len(ids)
    self.feed(ids)
    done = {} if done is None else done
    try:
      yield from timed(
        detokenize(
          self.model, self.stream_ids(max_new_tokens), stop, self.stop_ids, done, keep_ids=keep_ids
        ),
        self.stats,
      )
    finally:
      self._held()
      s = self.stats
      s["tokens_per_s"] = tokens_per_s(s["tokens_generated"], s["decode_s"])

  def stream_ids(self, limit: int | None) -> Iterator[int]:
    """The reply's token ids as they are sampled (at most `limit`; None: no limit), each in
    the cache by the time it is yielded (steps.sample_decode: sampled and fed in one
    dispatch), so a consumer may stop after any of them. A turn detokenizes it."""
    n = 0
    while True:
      (tok, bad, self.logits, self.cache), c = steps.call(
        self.model,
        steps.sample_decode,
        self.cache,
        self.logits,
        self.key,
        jnp.int32(self.steps),
        sampling=self.sampling,
      )
      tok, bad = jax.device_get((tok, bad))
      engine.check_finite(self.model, bad, f"streaming session (token {self.steps})")
      tok = int(tok[0])
      self.stats["compile_s"] += c
      self.steps += 1
      self.stats["tokens_generated"] += 1
      n += 1
      yield tok
      if limit is not None and n >= limit:
        return
