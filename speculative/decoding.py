"""The jitted speculative loop: prefill, then rounds of draft -> verify -> accept -> compact.

State between rounds, per row (n = tokens in both caches):
  target cache: the prompt and every emitted token but the last, in slots [0, n);
  head cache: the pairs (f_i, t_{i+1}) for i < n, in slots [0, n);
  root: the last emitted token t_n (in neither cache yet);
  h, logits: the head's output at pair n - 1 (its guess of f_n) and draft logits for t_{n+1}.
A round drafts a tree under the root, runs the target once over the T tree tokens (positions
n + depth, tree mask) and accepts a path of m draft tokens plus a bonus token; it then copies
the path's K/V (root and accepted nodes) into slots [n, n + m + 1), feeds the head the m + 1
new pairs, and the bonus becomes the root. A row that is done stops advancing.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.cache.dense import KVCache
from kvjax.cache.sink import SinkCache
from kvjax.lm.sampling import Sampling, sample
from kvjax.lm.steps import nonfinite
from kvjax.speculative import accept, verify
from kvjax.speculative import tree as trees


def forward_features(dec, head, tokens, **kw):
  """The decoder over tokens and the head's features of them -> (out, feats [B, T, F], cache)."""
  out, cache = dec(tokens, return_kv=True, return_layer_inputs=head.hc.kind == "eagle3", **kw)
  return out, head.feature(out.hidden, out.layer_inputs), cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Frontier:
  """Where each row stands between rounds (the module docstring's state, n tokens in both
  caches).

  cache, hcache: the target's and the head's caches, n entries per row (the target's may be a
    SinkCache, which holds its sinks and window of them; the head's then holds its own).
  root: [B] int32 the last emitted token t_n (in neither cache yet).
  h: [B, D] the head's output at pair n - 1; logits: [B, V] its draft logits for t_{n+1}.
  bad: [B] bool the target logits the newest tokens came from were not finite (after a round,
    for the rows that took part in it).
  """

  cache: KVCache | SinkCache
  hcache: KVCache
  root: jax.Array
  h: jax.Array
  logits: jax.Array
  bad: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Round:
  """One draft-verify-accept round. front: the rows after it (a row that was not live keeps
  its caches' lengths); emit: [B, depth + 1] int32 the accepted draft tokens then the bonus,
  only the first m + 1 meaningful; m: [B] int32 draft tokens accepted."""

  front: Frontier
  emit: jax.Array
  m: jax.Array


@functools.partial(
  jax.jit,
  static_argnames=("graphdef", "head_graphdef", "sampling"),
  donate_argnames=("cache", "hcache"),
)
def prefill(
  graphdef,
  state,
  head_state,
  cache: KVCache,
  hcache: KVCache,
  tokens,
  lengths,
  key,
  *,
  head_graphdef,
  sampling: Sampling,
) -> Frontier:
  """tokens [B, P] right-padded, lengths [B] -> the first `Frontier`: both caches holding
  lengths[b] entries, root the first new token (bad: the target's logits for it were not
  finite)."""
  dec, head = nnx.merge(graphdef, state), nnx.merge(head_graphdef, head_state)
  B, P = tokens.shape
  rows = jnp.arange(B)
  out, feats, _ = forward_features(dec, head, tokens, logits=False)
  positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  cache = cache.write(out.k, out.v, positions, lengths)
  last = out.hidden[rows, lengths - 1]
  target = dec.logits(last)
  root = sample(target, jax.random.fold_in(key, 0), sampling)
  nxt = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], 1).at[rows, lengths - 1].set(root)
  hs, hcache = head(feats, dec.embed_tokens(nxt), cache=hcache, positions=positions, n_new=lengths)
  h = hs[rows, lengths - 1]
  return Frontier(cache, hcache, root, h, head.logits(h, dec), nonfinite(target))


def _draft(dec, head, hcache: KVCache, h, logits, root, spec: trees.TreeSpec):
  n = hcache.length
  B, S = hcache.batch, hcache.size
  k = spec.top_k
  rel = jnp.arange(S) - n[:, None]  # [B, S] slot - n
  in_draft = (rel >= 0) & (rel < spec.draft_slots)

  def step(feats, tokens, positions, anc):
    nonlocal hcache
    drafted = (
      jnp.take_along_axis(
        anc, jnp.clip(rel, 0, spec.draft_slots - 1)[:, None, :].repeat(k, 1), axis=2
      )
      & in_draft[:, None]
    )
    mask = jnp.concatenate(
      [(rel < 0)[:, None] | drafted, jnp.broadcast_to(jnp.eye(k, dtype=bool), (B, k, k))], axis=2
    )
    hs, hcache = head(feats, dec.embed_tokens(tokens), cache=hcache, positions=positions, mask=mask)
    return hs, head.logits(hs, dec)

  tree = trees.draft(step, h, logits, root, n, spec)
  return tree, dataclasses.replace(hcache, length=n)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Verified:
  """A drafted and verified tree, not yet stored: the caches take any prefix of its path
  (`commit`). hcache: the head's cache after drafting (its length as before); k, v: [L, B, K,
  D1, H] the target's keys and values of the accepted path (root first, in the form the
  target's cache stores them); feats: [B, D1, F] the target's features there; emit: [B, D1]
  int32 the accepted draft tokens then the bonus (the first m + 1 meaningful); m: [B] int32
  draft tokens accepted; bad: [B] the target's logits over the tree were not finite."""

  hcache: KVCache
  k: jax.Array
  v: jax.Array
  feats: jax.Array
  emit: jax.Array
  m: jax.Array
  bad: jax.Array


def draft_and_verify(dec, head, front: Frontier, key, *, spec, sampling) -> Verified:
  """Drafts a tree under each row's root and verifies it in one target forward over the
  target's cache (a KVCache, or a SinkCache read as the stream tokens at the nodes' depths)."""
  B = front.root.shape[0]
  rows = jnp.arange(B)[:, None]
  cache = front.cache
  tree, hcache = _draft(dec, head, front.hcache, front.h, front.logits, front.root, spec)
  view = verify.tree_view(cache, tree.depth, tree.mask)
  out, feats, _ = forward_features(
    dec, head, tree.tokens, cache=cache, view=view, n_new=jnp.zeros((B,), jnp.int32)
  )
  probs = accept.target_probs(out.logits, sampling)
  path, m, bonus = accept.accept(tree, probs, key, sampling.greedy)
  j = jnp.arange(spec.depth + 1)[None]
  path_tokens = jnp.take_along_axis(tree.tokens, path, axis=1)  # [B, D1] root first
  emit = jnp.where(j < m[:, None], jnp.roll(path_tokens, -1, axis=1), bonus[:, None])
  kv_path = lambda a: jnp.take_along_axis(a, path[None, :, None, :, None], axis=3)  # [L,B,K,D1,H]
  return Verified(
    hcache, kv_path(out.k), kv_path(out.v), feats[rows, path], emit, m, nonfinite(out.logits)
  )


def commit(dec, head, cache, r: Verified, keep: jax.Array) -> Frontier:
  """Stores the first keep[b] tokens of row b's verified path (the root, then keep - 1
  accepted draft tokens) in the target's cache and their pairs in the head's; emit[keep - 1]
  becomes the root. keep: [B] int in [0, m + 1] (0: the row stands still). A SinkCache
  evicts as the tokens arrive."""
  B, D1 = r.emit.shape
  rows = jnp.arange(B)
  j = jnp.arange(D1)[None]
  cache = cache.write(r.k, r.v, cache.length[:, None] + j, keep)
  hs, hcache = head(
    r.feats,
    dec.embed_tokens(r.emit),
    cache=r.hcache,
    positions=r.hcache.length[:, None] + j,
    n_new=keep,
  )
  last = jnp.maximum(keep, 1) - 1
  h = hs[rows, last]
  return Frontier(cache, hcache, r.emit[rows, last], h, head.logits(h, dec), r.bad)


def draft_verify(dec, head, front: Frontier, key, live, *, spec, sampling) -> Round:
  """One draft-verify-accept round from `front`, every live row ([B] bool) taking all it
  accepted and the bonus token."""
  r = draft_and_verify(dec, head, front, key, spec=spec, sampling=sampling)
  nxt = commit(dec, head, front.cache, r, jnp.where(live, r.m + 1, 0))
  return Round(dataclasses.replace(nxt, bad=live & r.bad), r.emit, r.m)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoopState:
  """The carry of the speculative `while_loop`. round: [] int32 rounds run (target verify
  forwards); front: where each row stands; out [B, max_steps + D1] int32 tokens emitted; done
  [B] bool; counts [B] tokens per row; rounds [B] rounds each row took part in; accepted [B,
  max_steps] the tokens each round produced for each row (m + 1; 0 once the row is done); bad
  [B] a row's target logits were not finite in the prefill or a round it took part in."""

  round: jax.Array
  front: Frontier
  out: jax.Array
  done: jax.Array
  counts: jax.Array
  rounds: jax.Array
  accepted: jax.Array
  bad: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Generated:
  """What `loop` returns.

  tokens: [B, max_steps] int32 row b's tokens in its first counts[b] columns (the root first).
  counts: [B] int32 tokens per row, a stop token included.
  rounds: [B] int32 rounds each row took part in.
  accepted: [B, max_steps] int32 the tokens each round produced before any cut at a stop token
    or the limit (m + 1): row b's rounds are its first rounds[b] columns, 0 after.
  n_rounds: [] int32 target verify forwards.
  bad: [B] bool non-finite target logits in the prefill or a round the row took part in.
  front: where each row stands after its last round, in the donated buffers (both caches
    updated in place).
  """

  tokens: jax.Array
  counts: jax.Array
  rounds: jax.Array
  accepted: jax.Array
  n_rounds: jax.Array
  bad: jax.Array
  front: Frontier


@functools.partial(
  jax.jit,
  static_argnames=("graphdef", "head_graphdef", "spec", "sampling", "max_steps"),
  donate_argnames=("front",),
)
def loop(
  graphdef,
  state,
  head_state,
  front: Frontier,
  key,
  n_steps,
  stop_ids,
  *,
  head_graphdef,
  spec: trees.TreeSpec,
  sampling: Sampling,
  max_steps: int,
) -> Generated:
  """Generates up to n_steps (<= max_steps) tokens per row, the root of `front` (from
  `prefill`) first, in one `lax.while_loop` of rounds. A row stops after a token in stop_ids
  [E] (pad with -1). front is donated: the loop updates it (both caches) in place."""
  dec, head = nnx.merge(graphdef, state), nnx.merge(head_graphdef, head_state)
  B = front.root.shape[0]
  D1 = spec.depth + 1
  is_stop = lambda t: jnp.any(t[..., None] == stop_ids, axis=-1)

  def body(s: LoopState) -> LoopState:
    key_s = jax.random.fold_in(key, s.round + 1)
    r = draft_verify(dec, head, s.front, key_s, ~s.done, spec=spec, sampling=sampling)
    return _advance(s, r, is_stop, n_steps)

  s = jax.lax.while_loop(
    lambda s: ~jnp.all(s.done),
    body,
    LoopState(
      round=jnp.int32(0),
      front=front,
      out=jnp.zeros((B, max_steps + D1), jnp.int32).at[:, 0].set(front.root),
      done=is_stop(front.root) | (n_steps <= 1),
      counts=jnp.ones((B,), jnp.int32),
      rounds=jnp.zeros((B,), jnp.int32),
      accepted=jnp.zeros((B, max_steps), jnp.int32),
      bad=front.bad,
    ),
  )
  return Generated(
    tokens=s.out[:, :max_steps],
    counts=s.counts,
    rounds=s.rounds,
    accepted=s.accepted,
    n_rounds=s.round,
    bad=s.bad,
    front=s.front,
  )


def _advance(s: LoopState, r: Round, is_stop, n_steps) -> LoopState:
  """The loop's state after round r: each live row emits the round's tokens up to and
  including its first stop token, at most up to n_steps in all."""
  B, D1 = r.emit.shape
  width = s.out.shape[1]  # max_steps + D1: a column past every row's tokens
  live = ~s.done
  j = jnp.arange(D1)[None]
  stops = is_stop(r.emit) & (j <= r.m[:, None])
  first = jnp.where(stops.any(1), jnp.argmax(stops, 1), D1)
  n_emit = jnp.minimum(jnp.minimum(r.m + 1, first + 1), n_steps - s.counts)
  n_emit = jnp.where(live, n_emit, 0)
  cols = jnp.where(j < n_emit[:, None], s.counts[:, None] + j, width)
  return LoopState(
    round=s.round + 1,
    front=r.front,
    out=s.out.at[jnp.arange(B)[:, None], cols].set(r.emit, mode="drop"),
    done=s.done | (live & (first < n_emit)) | (s.counts + n_emit >= n_steps),
    counts=s.counts + n_emit,
    rounds=s.rounds + live,
    accepted=s.accepted.at[:, s.round].set(jnp.where(live, r.m + 1, 0), mode="drop"),
    bad=s.bad | r.front.bad,
  )
