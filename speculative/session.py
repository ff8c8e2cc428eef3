"""EAGLE inside a StreamingLLM session: a `kvjax.lm.streaming.Session` that drafts a tree with
a head and verifies it against its sink cache, endlessly, in constant memory.

    from kvjax import lm, speculative
    model = lm.load("shakespeare")
    head = speculative.load_head("shakespeare", model)
    s = speculative.StreamingSession(model, head, n_sink=4, window=252)
    for piece in s.turn("ROMEO:", max_new_tokens=None): ...     # endless, a round at a time

The target's cache is the session's SinkCache (sinks + a ring of `window` slots): a round
verifies the tree with every node reading the sinks and the ring as the stream token at its
depth would (`SinkCache.tree_view`: positions assigned inside the cache, per-token eviction),
writes nothing, and the accepted path is then written into the ring in stream order, evicting
as plain decoding would; rejected nodes never touch it. Greedy output is the plain session's,
token for token; sampled output has its distribution.

The head keeps its own dense cache of pairs (f_i, t_{i+1}) under the same policy: its first
n_sink pairs stay, and before every dispatch the oldest others are evicted so that at most
n_sink + window remain; the survivors slide down and their keys are re-rotated (positions in
the head's cache are its slot indices, as the sink cache's are). Between dispatches it holds at
most n_sink + window + slack pairs (slack: a prompt chunk, or a round's path and draft slots).

Tokens are yielded as a round produces them; a round's path is written into both caches only
once the consumer has taken its tokens (when the next round starts, or when the turn ends
early, at a stop token or a limit, with just the tokens taken), so that the cache ends every
turn holding exactly the tokens yielded, as the plain session's does.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.cache.dense import KVCache
from kvjax.cache.sink import SinkCache
from kvjax.lm import engine, rope, steps
from kvjax.lm.model import Model
from kvjax.lm.sampling import Sampling, sample
from kvjax.lm.steps import nonfinite
from kvjax.lm.streaming import Session
from kvjax.speculative import decoding
from kvjax.speculative import head as heads
from kvjax.speculative.generate import check_tree
from kvjax.speculative.tree import TreeSpec


def evict(hcache: KVCache, n_sink: int, keep: int, freq: jax.Array) -> KVCache:
  """The head's cache with at most `keep` pairs per row: slots [0, n_sink) stay; of the others
  the oldest e = length - keep (if > 0) go, the rest slide down e slots with their keys
  re-rotated by -e positions and their positions lowered by e (a rotation by 0 is exact, so a
  row that evicts nothing is unchanged). freq: [H/2] the head layer's RoPE frequencies."""
  S = hcache.size
  e = jnp.maximum(hcache.length - keep, 0)[:, None]  # [B, 1]
  s = jnp.arange(S)[None]  # [1, S]
  win = s >= n_sink
  src = jnp.where(win, jnp.minimum(s + e, S - 1), s)  # [B, S] the slot each slot takes
  take = lambda a: jnp.take_along_axis(a, src[None, :, None, :, None], axis=3)
  cos, sin = rope.tables(jnp.where(win, -e, 0), freq)  # [B, S, H/2]
  k = jax.vmap(lambda k: rope.rotate(k, cos, sin, heads_first=True))(take(hcache.k))
  pos = jnp.where(win, jnp.take_along_axis(hcache.pos, src, axis=1) - e, hcache.pos)
  return KVCache(k=k, v=take(hcache.v), pos=pos, length=hcache.length - e[:, 0])


def _evicted(head, cache, hcache: KVCache) -> KVCache:
  """`evict` down to the target cache's n_sink + window pairs."""
  freq = jnp.asarray(rope.inv_freq(head.hc.layer, layer=0))
  return evict(hcache, cache.n_sink, cache.size, freq)


@functools.partial(
  jax.jit, static_argnames=("graphdef", "head_graphdef"), donate_argnames=("cache", "hcache")
)
def feed(
  graphdef, state, head_state, cache, hcache, feature, tokens, n_new, first, *, head_graphdef
):
  """Feeds a chunk to the target and its pairs to the head: tokens [B, C] right-padded, n_new
  [B] >= 1 real tokens, feature [B, F] the target's feature at the token before them (the
  head's pair (feature, tokens[0]) is written, unless `first` ([] bool): nothing came before,
  or that pair is already in the head's cache) -> (logits [B, V] and feature [B, F] at the
  last real token, cache, hcache)."""
  dec, head = nnx.merge(graphdef, state), nnx.merge(head_graphdef, head_state)
  B, C = tokens.shape
  rows = jnp.arange(B)
  out, feats, cache = decoding.forward_features(
    dec, head, tokens, cache=cache, n_new=n_new, logits=False
  )
  # pairs (f_{j-1}, t_j), f_{-1} = feature; when first, (f_j, t_{j+1}) for j < n_new - 1
  shifted = jnp.concatenate([feature[:, None].astype(feats.dtype), feats[:, :-1]], axis=1)
  f_in = jnp.where(first, feats, shifted)
  t_in = jnp.where(first, jnp.roll(tokens, -1, axis=1), tokens)
  hcache = _evicted(head, cache, hcache)
  positions = hcache.length[:, None] + jnp.arange(C, dtype=jnp.int32)[None]
  _, hcache = head(
    f_in, dec.embed_tokens(t_in), cache=hcache, positions=positions, n_new=n_new - first
  )
  last = n_new - 1
  return dec.logits(out.hidden[rows, last]), feats[rows, last], cache, hcache


@functools.partial(
  jax.jit,
  static_argnames=("graphdef", "head_graphdef", "sampling"),
  donate_argnames=("cache", "hcache"),
)
def start(
  graphdef, state, head_state, cache, hcache, feature, logits, key, step, *, head_graphdef, sampling
) -> decoding.Frontier:
  """Samples the reply's first token (the root) from the target's logits [B, V] (PRNG
  fold_in(key, step)) and feeds the head its pair (feature, root) -> the first Frontier."""
  dec, head = nnx.merge(graphdef, state), nnx.merge(head_graphdef, head_state)
  root = sample(logits, jax.random.fold_in(key, step), sampling)
  hcache = _evicted(head, cache, hcache)
  hs, hcache = head(
    feature[:, None],
    dec.embed_tokens(root[:, None]),
    cache=hcache,
    positions=hcache.length[:, None],
  )
  h = hs[:, 0]
  return decoding.Frontier(cache, hcache, root, h, head.logits(h, dec), nonfinite(logits))


@functools.partial(
  jax.jit,
  static_argnames=("graphdef", "head_graphdef", "spec", "sampling"),
  donate_argnames=("cache", "hcache"),
)
def round_(
  graphdef,
  state,
  head_state,
  front,
  cache,
  hcache,
  path,
  keep,
  key,
  step,
  *,
  head_graphdef,
  spec,
  sampling,
) -> tuple[SinkCache, decoding.Verified]:
  """One round: writes the first keep [B] tokens of the previous round's path (`path`, a
  Verified without its head cache) into both caches (`cache`, `hcache`: donated), or starts
  from `front` (its caches those two; then path is None), evicts the head's oldest pairs,
  then drafts and verifies a tree (PRNG fold_in(key, step)) -> (the target's cache, the
  verified tree, not yet written: its head cache is the head's)."""
  dec, head = nnx.merge(graphdef, state), nnx.merge(head_graphdef, head_state)
  if path is None:
    front = dataclasses.replace(front, cache=cache, hcache=hcache)
  else:
    front = decoding.commit(dec, head, cache, dataclasses.replace(path, hcache=hcache), keep)
  front = dataclasses.replace(front, hcache=_evicted(head, front.cache, front.hcache))
  r = decoding.draft_and_verify(
    dec, head, front, jax.random.fold_in(key, step), spec=spec, sampling=sampling
  )
  return front.cache, r


@functools.partial(
  jax.jit, static_argnames=("graphdef", "head_graphdef"), donate_argnames=("cache", "hcache")
)
def settle(
  graphdef, state, head_state, cache, hcache, path, keep, *, head_graphdef
) -> decoding.Frontier:
  """Writes the first keep [B] (>= 1) tokens of a round's path (as in `round_`) into both
  caches: the last of them becomes the root (not yet in the target's cache)."""
  dec, head = nnx.merge(graphdef, state), nnx.merge(head_graphdef, head_state)
  return decoding.commit(dec, head, cache, dataclasses.replace(path, hcache=hcache), keep)


class StreamingSession(Session):
  """A StreamingLLM session (`kvjax.lm.streaming.Session`: same arguments, turns and stats)
  that decodes by EAGLE rounds: draft a tree with `head`, verify it against the sink cache in
  one target forward, keep the accepted path and the bonus token.

      s = StreamingSession(model, head, n_sink=4, window=1020,
                           tree=TreeSpec(top_k=4, depth=4, total_tokens=16))
      for piece in s.turn("Tell me a story.", chat=True, max_new_tokens=None): ...

  tree: the draft tree (default TreeSpec()). stats adds rounds (verify forwards),
  mean_accept_len (tokens per round, the bonus included, over the session) and accept_lens
  (the tokens of each of the latest `keep_accept_lens` rounds: an endless session stays
  constant in memory)."""

  def __init__(
    self,
    model: Model,
    head: heads.LoadedHead,
    *,
    n_sink: int = 4,
    window: int,
    chunk: int | None = None,
    tree: TreeSpec | None = None,
    sampling: Sampling | None = None,
    key: jax.Array | None = None,
    stop_tokens: Sequence[int] | None = None,
    keep_accept_lens: int = 4096,
  ):
    super().__init__(
      model,
      n_sink=n_sink,
      window=window,
      chunk=chunk,
      sampling=sampling,
      key=key,
      stop_tokens=stop_tokens,
    )
    if isinstance(keep_accept_lens, bool) or not isinstance(keep_accept_lens, int):
      raise ValueError(f"keep_accept_lens must be an int >= 1; got {keep_accept_lens!r}")
    if keep_accept_lens < 1:
      raise ValueError(f"keep_accept_lens must be an int >= 1; got {keep_accept_lens!r}")
    self.tree = tree = check_tree(model, head, tree)
    self.head = head
    slack = max(self.chunk, tree.depth + 1 + tree.draft_slots)
    self.hcache = heads.new_cache(head.hc, 1, n_sink + window + slack, model.dtype)
    self.feature: jax.Array | None = None  # [1, F] the target's feature at its newest token
    # during a reply: `front` before its first round, then `pending` (the latest round, its
    # path not yet written; `taken` of its tokens yielded); self.cache is always the live one
    self.front: decoding.Frontier | None = None
    self.pending: decoding.Verified | None = None
    self.taken = 0
    self.accepted = 0  # tokens from every round
    self.keep_accept_lens = keep_accept_lens
    self.stats.update(rounds=0, mean_accept_len=float("nan"), accept_lens=[])

  def feed(self, ids: list[int]) -> None:
    """Feeds token ids to the target's cache (as the plain session does) and their pairs to
    the head's."""
    self._feed(ids, paired=self.feature is None)

  def _feed(self, ids: list[int], paired: bool) -> None:
    """paired: the pair of ids[0] is in the head's cache already (or nothing came before)."""
    C, F = self.chunk, self.head.hc.target.d_model
    for lo in range(0, len(ids), C):
      part = ids[lo : lo + C]
      tokens = np.zeros((1, C), np.int32)
      tokens[0, : len(part)] = part
      feature = jnp.zeros((1, F), self.model.dtype) if self.feature is None else self.feature
      (self.logits, self.feature, self.cache, self.hcache), seconds, c = steps.timed(
        self.model,
        feed,
        self.head.state,
        self.cache,
        self.hcache,
        feature,
        jnp.asarray(tokens),
        jnp.asarray([len(part)], jnp.int32),
        jnp.asarray(paired and lo == 0),
        head_graphdef=self.head.graphdef,
      )
      self.stats["prefill_s"] += seconds
      self.stats["compile_s"] += c

  def _call(self, fn, *args, **static):
    out, c = steps.call(
      self.model, fn, self.head.state, *args, head_graphdef=self.head.graphdef, **static
    )
    self.stats["compile_s"] += c
    return out

  def turn(self, prompt: str | Sequence[int] = "", **kw) -> Iterator[str]:
    """`Session.turn`, by speculative rounds (see the class docstring)."""
    self._settle()
    try:
      yield from super().turn(prompt, **kw)
    finally:
      self._settle()
      s = self.stats
      if s["rounds"]:
        s["mean_accept_len"] = self.accepted / s["rounds"]
      del s["accept_lens"][: max(len(s["accept_lens"]) - self.keep_accept_lens, 0)]

  def stream_ids(self, limit: int | None) -> Iterator[int]:
    """The reply's token ids as rounds produce them (at most `limit`; None: no limit); a
    round's path enters the caches when the next round starts or the turn ends."""
    self.front = self._call(
      start,
      self.cache,
      self.hcache,
      self.feature,
      self.logits,
      self.key,
      jnp.int32(self.steps),
      sampling=self.sampling,
    )
    self.cache, self.hcache = self.front.cache, None  # donated: held by `front` now
    root, bad = jax.device_get((self.front.root, self.front.bad))
    engine.check_finite(self.model, bad, f"speculative streaming session (token {self.steps})")
    emitted = [int(root[0])]
    n = 0
    while True:
      for tok in emitted:
        self.steps += 1
        self.stats["tokens_generated"] += 1
        self.taken += self.pending is not None
        n += 1
        yield tok
        if limit is not None and n >= limit:
          return
      if self.pending is None:
        f = self.front
        args = (dataclasses.replace(f, cache=None, hcache=None), f.cache, f.hcache, None)
      else:
        args = (None, *self._split())
      self.front = self.pending = None
      self.cache, r = self._call(
        round_,
        *args,
        jnp.asarray([self.taken], jnp.int32),
        self.key,
        jnp.int32(self.steps),
        spec=self.tree,
        sampling=self.sampling,
      )
      self.pending, self.taken = r, 0
      emit, m, bad = jax.device_get((r.emit, r.m, r.bad))
      engine.check_finite(self.model, bad, f"speculative streaming session (token {self.steps})")
      k = int(m[0]) + 1
      self.stats["rounds"] += 1
      lens = self.stats["accept_lens"]
      lens.append(k)
      if len(lens) >= 2 * self.keep_accept_lens:  # an endless turn holds constant memory
        del lens[: len(lens) - self.keep_accept_lens]
      self.accepted += k
      emitted = [int(t) for t in emit[0, :k]]

  def _split(self) -> tuple:
    """(cache, the pending round's head cache, the round without it): what round_ and settle
    take, the caches donated."""
    p = self.pending
    return self.cache, p.hcache, dataclasses.replace(p, hcache=None)

  def _settle(self) -> None:
    """Ends a reply: writes the tokens yielded from the latest round into both caches, then
    feeds the last yielded token (the root) to the target, so the cache holds every token
    yielded and `logits` are for the next one, as after a plain session's turn."""
    if self.pending is not None:
      if self.taken < 1:
        raise RuntimeError(
          "a speculative round was interrupted before its first token was taken; the "
          "session's state is lost: start a new session"
        )
      keep = jnp.asarray([self.taken], jnp.int32)
      self.front = self._call(settle, *self._split(), keep)
      self.pending, self.taken = None, 0
    if self.front is None:
      return
    front, self.front = self.front, None
    self.cache, self.hcache = front.cache, front.hcache
    self._feed([int(jax.device_get(front.root)[0])], paired=True)
