"""Which draft tokens the target accepts, without changing its output distribution.

Drafts are deterministic (top-k of the head), so the draft distribution of each child is a
point mass and the EAGLE-2 scheme is exact: at node c with target distribution p, try c's
children in draft order; accept child x with probability r(x) / sum(r), where r is p with the
children rejected so far zeroed; on rejection zero r(x) and try the next. Accepting moves to
x (r = p at x). When no child is accepted (or c is a leaf) the bonus token is drawn from
r / sum(r). Each emitted token is then distributed exactly as p: P(emit x) = P(x tried and
accepted) + P(all rejected) r_final(x) / sum(r_final), which telescopes to p(x). Greedy
decoding is the same walk with p one-hot at the target's argmax, which accepts exactly the
child equal to the argmax and emits the argmax as the bonus.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.lm.sampling import Sampling, filter_logits
from kvjax.speculative.tree import Tree


def target_probs(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """logits [B, T, V] -> the target's sampling distribution per node [B, T, V] float32
  (one-hot at the argmax when greedy; temperature / top-k / top-p applied otherwise)."""
  logits = logits.astype(jnp.float32)
  if sampling.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
  B, T, V = logits.shape
  return jax.nn.softmax(filter_logits(logits.reshape(B * T, V), sampling), -1).reshape(B, T, V)


def accept(tree: Tree, probs: jax.Array, key: jax.Array, greedy: bool):
  """Walks each row's tree. probs: [B, T, V] the target's distribution at each node.

  Returns (path [B, depth + 1] int32: the accepted nodes, root first, padded with the last
  accepted node; n_accepted [B] int32: draft tokens accepted (0..depth); bonus [B] int32)."""
  B, _, k = tree.children.shape
  depth = tree.paths.shape[-1] - 1
  keys = jax.random.split(key, B)
  return jax.vmap(lambda *a: _walk(*a, depth=depth, k=k, greedy=greedy))(
    tree.tokens, tree.children, probs, keys
  )


def _walk(tokens, children, probs, key, *, depth: int, k: int, greedy: bool):
  """One row: tokens [T], children [T, k], probs [T, V]."""

  def level(carry, step_key):
    node, alive, r = carry
    chosen = jnp.int32(-1)
    for c in range(k):
      child = children[node, c]
      x = tokens[jnp.maximum(child, 0)]
      u = jax.random.uniform(jax.random.fold_in(step_key, c))
      trying = alive & (child >= 0) & (chosen < 0)
      ok = trying & (u * r.sum() < r[x])  # probability r(x) / sum(r); u < 1 so r(x) = sum accepts
      chosen = jnp.where(ok, child, chosen)
      r = jnp.where(trying & ~ok, r.at[x].set(0.0), r)
    moved = chosen >= 0
    node = jnp.where(moved, chosen, node)
    r = jnp.where(moved, probs[node], r)
    return (node, alive & moved, r), jnp.where(moved, chosen, -1)

  (node, _, r), steps = jax.lax.scan(
    level, (jnp.int32(0), jnp.bool_(True), probs[0]), jax.random.split(key, depth + 1)[:depth]
  )
  n = jnp.sum(steps >= 0).astype(jnp.int32)
  path = jnp.concatenate([jnp.zeros((1,), jnp.int32), steps])
  path = jnp.where(jnp.arange(depth + 1) <= n, path, node)  # accepted steps are a prefix
  if greedy:
    bonus = jnp.argmax(r)
  else:
    bonus = jax.random.categorical(jax.random.fold_in(key, depth + 1), jnp.log(r))
  return path, n, bonus.astype(jnp.int32)
