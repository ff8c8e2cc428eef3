"""EAGLE-2 dynamic draft trees, with static shapes inside jit.

Drafting grows candidates level by level: level 1 is the top_k tokens of the head's
distribution after the root; each later level runs the head over the top_k best nodes of the
previous level (by cumulative draft log-probability) and proposes top_k children for each.
Of the C = top_k + (depth - 1) * top_k**2 candidates the best `total_tokens - 1` are kept;
since a child's score never exceeds its parent's and `lax.top_k` prefers the lower index (a
parent's) on ties, the kept set is a tree. Node 0 of the tree is the root: the last sampled
token, which the target has not seen yet.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class TreeSpec:
  """top_k: children per expanded node and nodes expanded per level (1 = chain drafting).
  depth: levels of draft tokens (the longest path). total_tokens: tree size, root included
  (at most 1 + top_k + (depth - 1) * top_k**2)."""

  top_k: int = 8
  depth: int = 5
  total_tokens: int = 32

  def __post_init__(self):
    for name in ("top_k", "depth", "total_tokens"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"tree {name} must be an int >= 1; got {v!r}")
    if self.total_tokens < 2:
      raise ValueError(
        f"tree total_tokens must be >= 2 (the root plus at least one draft "
        f"token); got {self.total_tokens}"
      )
    if self.total_tokens - 1 > self.candidates:
      raise ValueError(
        f"tree total_tokens={self.total_tokens} is more than the root plus the "
        f"{self.candidates} candidates that top_k={self.top_k}, depth={self.depth} draft "
        f"(top_k + (depth - 1) * top_k**2); lower it or raise top_k / depth"
      )

  @property
  def candidates(self) -> int:
    return self.top_k + (self.depth - 1) * self.top_k**2

  @property
  def draft_slots(self) -> int:
    """Head-cache slots the drafting nodes occupy past the context."""
    return (self.depth - 1) * self.top_k


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Tree:
  """A batch of draft trees of T = total_tokens nodes (node 0 the root; a parent precedes its
  children).

  tokens: [B, T] int32. parent: [B, T] int32 (-1 for the root). depth: [B, T] int32 (root 0).
  mask: [B, T, T] bool, mask[b, i, j] = node j is node i or an ancestor of it.
  paths: [B, T, depth + 1] int32, the retrieve indices: paths[b, i, l] = the node at depth l
    on the root-to-i path (-1 past depth[b, i]).
  children: [B, T, top_k] int32, node i's children in draft order (best first), -1 padded.
  """

  tokens: jax.Array
  parent: jax.Array
  depth: jax.Array
  mask: jax.Array
  paths: jax.Array
  children: jax.Array


def build(
  root: jax.Array, tokens: jax.Array, scores: jax.Array, parents: jax.Array, spec: TreeSpec
) -> Tree:
  """Keeps the best candidates as a tree.

  root: [B] int; tokens, scores: [B, C] candidates' tokens and cumulative draft
  log-probabilities; parents: [B, C] each candidate's parent candidate (-1 = the root), always
  a lower index. C = spec.candidates, laid out level by level."""
  B, C = tokens.shape
  n, T = spec.total_tokens - 1, spec.total_tokens
  level = jnp.asarray(_levels(spec))  # [C]
  sel = jnp.sort(jax.lax.top_k(scores, n)[1], axis=-1)  # [B, n] candidate ids
  rows = jnp.arange(B)[:, None]
  node_of = jnp.full((B, C), -1, jnp.int32).at[rows, sel].set(jnp.arange(1, T, dtype=jnp.int32))
  cand_parent = jnp.take_along_axis(parents, sel, axis=1)
  parent = jnp.where(
    cand_parent < 0, 0, jnp.take_along_axis(node_of, jnp.maximum(cand_parent, 0), axis=1)
  )
  parent = jnp.concatenate([jnp.full((B, 1), -1, jnp.int32), parent], axis=1)  # [B, T]
  tree_tokens = jnp.concatenate([root[:, None], jnp.take_along_axis(tokens, sel, axis=1)], 1)
  depth = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), level[sel]], axis=1)
  score = jnp.concatenate([jnp.zeros((B, 1)), jnp.take_along_axis(scores, sel, axis=1)], 1)
  return structure(tree_tokens.astype(jnp.int32), parent.astype(jnp.int32), depth, score, spec)


def structure(tokens, parent, depth, score, spec: TreeSpec) -> Tree:
  """Mask, retrieve indices and children of trees given by parent pointers [B, T] (root -1)
  and node depths [B, T]; score [B, T] orders siblings (higher first)."""
  B, T = tokens.shape
  eye = jnp.eye(T, dtype=bool)
  mask = jnp.broadcast_to(eye, (B, T, T))
  up = jnp.maximum(parent, 0)
  for _ in range(spec.depth):  # each pass adds one more generation of ancestors
    inherited = jnp.take_along_axis(mask, up[:, :, None], axis=1)  # [B, T, T] parent's row
    mask = eye | (inherited & (parent >= 0)[:, :, None])
  at_depth = mask[..., None] & (depth[:, None, :, None] == jnp.arange(spec.depth + 1))
  paths = jnp.where(at_depth.any(2), jnp.argmax(at_depth, axis=2), -1).astype(jnp.int32)
  sibling = jnp.where(
    parent[:, None, :] == jnp.arange(T)[None, :, None], score[:, None, :], -jnp.inf
  )  # [B, T(parent), T]
  k = min(spec.top_k, T)
  top, idx = jax.lax.top_k(sibling, k)
  children = jnp.where(top > -jnp.inf, idx, -1).astype(jnp.int32)
  if k < spec.top_k:
    children = jnp.pad(children, ((0, 0), (0, 0), (0, spec.top_k - k)), constant_values=-1)
  return Tree(tokens=tokens, parent=parent, depth=depth, mask=mask, paths=paths, children=children)


def _levels(spec: TreeSpec) -> np.ndarray:
  """[C] the draft level (1..depth) of each candidate."""
  k = spec.top_k
  return np.concatenate(
    [np.ones(k, np.int32)] + [np.full(k * k, l + 1, np.int32) for l in range(1, spec.depth)]
  )


def draft(
  step, h: jax.Array, logits: jax.Array, root: jax.Array, ctx: jax.Array, spec: TreeSpec
) -> Tree:
  """Grows and keeps the tree (EAGLE-2).

  step(features [B, k, D], tokens [B, k], positions [B, k], cache_mask [B, k, S_draft]) ->
    (h [B, k, D], logits [B, k, V]): one head forward over the k frontier nodes, each pair
    (its parent's head output, its token), attending to the context and to the drafting slots
    [ctx, ctx + draft_slots) where cache_mask says (its ancestors); the step writes them at
    the next k of those slots.
  h [B, D], logits [B, V]: the head's output at the context's last pair (predicting the token
  after the root). root: [B] the root token; ctx: [B] the head's context length (its position
  for level 1)."""
  k, D = spec.top_k, spec.depth
  B = root.shape[0]
  logp, tok = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), -1), k)  # [B, k]
  toks, scores, parents = [tok], [logp], [jnp.full((B, k), -1, jnp.int32)]
  feat = jnp.broadcast_to(h[:, None], (B, k, h.shape[-1]))
  cand = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (B, k))
  anc = jnp.zeros((B, k, spec.draft_slots), bool)
  base = k
  rows = jnp.arange(B)[:, None]
  for level in range(1, D):
    positions = jnp.broadcast_to(ctx[:, None] + level - 1, (B, k))
    feat, lg = step(feat, tok, positions, anc)
    lp, t = jax.lax.top_k(jax.nn.log_softmax(lg.astype(jnp.float32), -1), k)  # [B, k, k]
    cum = (logp[:, :, None] + lp).reshape(B, k * k)
    toks.append(t.reshape(B, k * k))
    scores.append(cum)
    parents.append(jnp.repeat(cand, k, axis=1))
    best = jax.lax.top_k(cum, k)[1]  # [B, k]
    j = best // k  # parent in the frontier
    slot = (level - 1) * k + j  # its drafting slot
    anc = jnp.take_along_axis(anc, j[:, :, None], axis=1) | (
      jnp.arange(spec.draft_slots) == slot[:, :, None]
    )
    tok = t.reshape(B, k * k)[rows, best]
    logp = cum[rows, best]
    feat = feat[rows, j]
    cand = base + best
    base += k * k
  return build(
    root, jnp.concatenate(toks, 1), jnp.concatenate(scores, 1), jnp.concatenate(parents, 1), spec
  )
