"""DroidSpeak runs: the receiver prefills a prompt's prefix from its sender's cache, then goes on.

A prompt of n tokens is split into the reused prefix (tokens [0, n - E - 1)) and a tail of
E + 1 tokens the receiver processes itself over whatever prefix cache it has: the tail's last
E tokens are scored (its next-token loss, the quality measure) and the greedy continuation
starts after it. `compare` runs the receiver's own full prefill and the plan's reuse side by
side on the same prompt and times both prefills.

    from kvjax import lm
    from kvjax.cache.droidspeak import Plan
    from kvjax.lm import droidspeak
    sender, receiver = lm.load("shakespeare"), lm.load("shakespeare-comedy")
    r = droidspeak.compare(sender, receiver, Plan.parse("0-1", 4), ids, eval_tokens=64)
    r["prefill_speedup"], r["loss_full"], r["loss_reuse"]
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.cache import droidspeak as ds
from kvjax.lm import steps
from kvjax.lm.generate import new_cache
from kvjax.lm.model import Model
from kvjax.lm.sampling import Sampling


def split_prompt(ids: list[int], eval_tokens: int) -> tuple[list[int], list[int]]:
  """(prefix, tail): tail = the last eval_tokens + 1 tokens (the first of them feeds the
  prediction of the next), prefix = the rest, at least one token."""
  if eval_tokens < 1:
    raise ValueError(f"eval_tokens must be >= 1; got {eval_tokens}")
  if len(ids) < eval_tokens + 2:
    raise ValueError(f"the prompt has {len(ids)} tokens; scoring its last {eval_tokens} after a "
                     f"reused prefix needs at least {eval_tokens + 2}")
  cut = len(ids) - eval_tokens - 1
  return ids[:cut], ids[cut:]


def _padded(prefix: list[int]) -> tuple[jax.Array, jax.Array]:
  P = steps.bucket(len(prefix))
  tokens = np.zeros((1, P), np.int32)
  tokens[0, :len(prefix)] = prefix
  return jnp.asarray(tokens), jnp.asarray([len(prefix)], jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _tail(graphdef, state, cache, tokens, targets):
  """tokens [B, T] after the cache -> (nll [B, T - 1] of targets [B, T - 1] at the first
  T - 1 positions, logits [B, V] at the last, cache)."""
  out, cache = nnx.merge(graphdef, state)(tokens, cache=cache)
  return steps.token_nll(out.logits[:, :-1], targets), out.logits[:, -1], cache


def continue_from(model: Model, cache, tail: list[int], max_new_tokens: int) -> dict:
  """Feeds the tail after a prefix cache -> {loss: mean nll of tail[1:] (None for a 1-token
  tail), tokens: the greedy continuation of max_new_tokens tokens}."""
  t = jnp.asarray([tail], jnp.int32)
  (nll, logits, cache), _ = steps.call(model, _tail, model.state, cache, t, t[:, 1:])
  out = []
  if max_new_tokens:
    (toks, counts, _), _ = steps.call(
        model, steps.decode_loop, model.state, cache, logits, jax.random.key(0),
        jnp.int32(max_new_tokens), jnp.asarray([-1], jnp.int32),
        sampling=Sampling(), max_steps=steps.bucket(max_new_tokens))
    out = np.asarray(toks)[0, :int(counts[0])].tolist()
  loss = float(np.mean(np.asarray(nll))) if len(tail) > 1 else None
  return {"loss": loss, "tokens": out}


def _median_s(fn, repeats: int) -> tuple[float, object]:
  """(median wall time of fn() over `repeats` calls after one warm-up, the last result)."""
  jax.block_until_ready(result := fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(result := fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), result


def compare(sender: Model, receiver: Model, plan: ds.Plan, ids: list[int], *,
            eval_tokens: int = 64, max_new_tokens: int = 32, repeats: int = 5) -> dict:
  """The receiver's own prefill of the prompt's prefix against reuse under `plan`.

  Returns prefill_s_full / prefill_s_reuse (median seconds of the receiver's prefill; the
  sender's capture is its own prefill, not timed), prefill_speedup, loss_full / loss_reuse
  (the receiver's mean next-token loss over the prompt's last eval_tokens tokens after each
  prefix cache), tokens (the greedy continuation after reuse), tokens_full (after the full
  prefill), agreement (fraction of positions where the two continuations agree), and the
  plan's shape (recomputed layers, E layers)."""
  ds.check_pair(sender, receiver)
  prefix, tail = split_prompt(list(map(int, ids)), eval_tokens)
  if len(ids) + max_new_tokens > receiver.cfg.max_position:
    raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                     f"the model's context of {receiver.cfg.max_position} positions")
  tokens, lengths = _padded(prefix)
  size = steps.bucket(len(ids) + max_new_tokens)
  sent = ds.capture(sender, tokens, lengths, plan)

  def full():
    return steps.call(receiver, steps.prefill, receiver.state, new_cache(receiver, 1, size),
                      tokens, lengths)[0][1]

  def reuse():
    return ds.receive(receiver, sent, size=size)

  full_s, full_cache = _median_s(full, repeats)
  reuse_s, reuse_cache = _median_s(reuse, repeats)
  a = continue_from(receiver, full_cache, tail, max_new_tokens)
  b = continue_from(receiver, reuse_cache, tail, max_new_tokens)
  n = min(len(a["tokens"]), len(b["tokens"]))
  agree = float(np.mean(np.asarray(a["tokens"][:n]) == np.asarray(b["tokens"][:n]))) if n else 1.0
  return {"plan": str(plan), "recomputed_layers": list(plan.recomputed),
          "e_layers": list(plan.e_layers), "prefix_tokens": len(prefix),
          "eval_tokens": eval_tokens, "prefill_s_full": full_s, "prefill_s_reuse": reuse_s,
          "prefill_speedup": full_s / reuse_s if reuse_s > 0 else float("nan"),
          "loss_full": a["loss"], "loss_reuse": b["loss"], "tokens": b["tokens"],
          "tokens_full": a["tokens"], "agreement": agree}
