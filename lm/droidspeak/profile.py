"""DroidSpeak runs: the receiver prefills a prompt's prefix from its sender's cache, then goes on.

A prompt of n tokens is split into the reused prefix (tokens [0, n - E - 1)) and a tail of
E + 1 tokens the receiver processes itself over whatever prefix cache it has: the tail's last
E tokens are scored (its next-token loss, the quality measure) and the greedy continuation
starts after it. `compare` runs the receiver's own full prefill and the plan's reuse side by
side on the same prompt and times both prefills.

    from kvjax import lm
    from kvjax.lm.droidspeak import Plan, profile
    sender, receiver = lm.load("shakespeare"), lm.load("shakespeare-comedy")
    r = profile.compare(sender, receiver, Plan.parse("0-1", 4), ids, eval_tokens=64)
    r["prefill_speedup"], r["loss_full"], r["loss_reuse"]
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.lm import steps
from kvjax.lm.droidspeak import reuse
from kvjax.lm.droidspeak.payload import fingerprint
from kvjax.lm.engine import check_finite, new_cache, pad
from kvjax.lm.model import Model
from kvjax.lm.sampling import Sampling


def split_prompt(ids: list[int], eval_tokens: int) -> tuple[list[int], list[int]]:
  """(prefix, tail): tail = the last eval_tokens + 1 tokens (the first of them feeds the
  prediction of the next), prefix = the rest, at least one token."""
  if eval_tokens < 1:
    raise ValueError(f"eval_tokens must be >= 1; got {eval_tokens}")
  if len(ids) < eval_tokens + 2:
    raise ValueError(
      f"the prompt has {len(ids)} tokens; scoring its last {eval_tokens} after a "
      f"reused prefix needs at least {eval_tokens + 2}"
    )
  cut = len(ids) - eval_tokens - 1
  return ids[:cut], ids[cut:]


def padded(prefix: list[int]) -> tuple[jax.Array, jax.Array]:
  """One prefix as tokens [1, P] padded to its length bucket, and its length [1]."""
  return (
    jnp.asarray(pad([prefix], steps.bucket(len(prefix)))),
    jnp.asarray([len(prefix)], jnp.int32),
  )


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
  (nll, logits, cache), _ = steps.call(model, _tail, cache, t, t[:, 1:])
  out = []
  if max_new_tokens:
    dec, _ = steps.call(
      model,
      steps.decode_loop,
      cache,
      logits,
      jax.random.key(0),
      jnp.int32(max_new_tokens),
      jnp.asarray([-1], jnp.int32),
      sampling=Sampling(),
      max_steps=steps.bucket(max_new_tokens),
    )
    check_finite(model, dec.bad, "the profile's continuation")
    out = np.asarray(dec.tokens)[0, : int(dec.counts[0])].tolist()
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


@dataclasses.dataclass
class Baseline:
  """One prompt's baseline: the receiver's own full prefill (timed) and what follows it, and
  the sender's own loss on the same tail (the fine-tune's advantage is loss_sender -
  loss_full)."""

  ids: list[int]
  prefix: list[int]
  tail: list[int]
  tokens: jax.Array
  lengths: jax.Array
  size: int
  prefill_s: float
  loss_full: float
  loss_sender: float
  continuation: list[int]


def baseline(
  sender: Model,
  receiver: Model,
  ids: list[int],
  *,
  eval_tokens: int = 64,
  max_new_tokens: int = 32,
  repeats: int = 5,
) -> Baseline:
  """The baseline that plans are measured against (see Baseline)."""
  reuse.check_pair(sender, receiver)
  ids = list(map(int, ids))
  prefix, tail = split_prompt(ids, eval_tokens)
  if len(ids) + max_new_tokens > receiver.cfg.max_position:
    raise ValueError(
      f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
      f"the model's context of {receiver.cfg.max_position} positions"
    )
  tokens, lengths = padded(prefix)
  size = steps.bucket(len(ids) + max_new_tokens)

  def full(model):
    return steps.call(model, steps.prefill, new_cache(model, 1, size), tokens, lengths)[0][1]

  full_s, cache = _median_s(lambda: full(receiver), repeats)
  a = continue_from(receiver, cache, tail, max_new_tokens)
  own = continue_from(sender, full(sender), tail, 0)
  return Baseline(
    ids=ids,
    prefix=prefix,
    tail=tail,
    tokens=tokens,
    lengths=lengths,
    size=size,
    prefill_s=full_s,
    loss_full=a["loss"],
    loss_sender=own["loss"],
    continuation=a["tokens"],
  )


def measure(
  sender: Model, receiver: Model, plan: reuse.Plan, ref: Baseline, *, repeats: int = 5
) -> dict:
  """Reuse under `plan` on ref's prompt: prefill_s_reuse (median seconds of the receiver's
  prefill from the capture; the capture is the sender's own prefill, not timed), loss_reuse,
  tokens (the greedy continuation), agreement (fraction of positions where it equals the
  full prefill's continuation)."""
  sent = reuse.capture(sender, ref.tokens, ref.lengths, plan)
  reuse_s, cache = _median_s(lambda: reuse.receive(receiver, sent, size=ref.size), repeats)
  b = continue_from(receiver, cache, ref.tail, len(ref.continuation))
  n = len(ref.continuation)
  agree = float(np.mean(np.asarray(ref.continuation) == np.asarray(b["tokens"][:n]))) if n else 1.0
  return {
    "plan": str(plan),
    "recomputed_layers": list(plan.recomputed),
    "e_layers": list(plan.e_layers),
    "prefill_s_reuse": reuse_s,
    "loss_reuse": b["loss"],
    "tokens": b["tokens"],
    "agreement": agree,
  }


def compare(
  sender: Model,
  receiver: Model,
  plan: reuse.Plan,
  ids: list[int],
  *,
  eval_tokens: int = 64,
  max_new_tokens: int = 32,
  repeats: int = 5,
) -> dict:
  """The receiver's own prefill of the prompt's prefix against reuse under `plan`: the fields
  of `measure` plus prefix_tokens, eval_tokens, prefill_s_full, prefill_speedup, loss_full (the
  receiver's mean next-token loss over the prompt's last eval_tokens tokens after its own
  prefill), loss_sender (the sender's, after its own), tokens_full (the full prefill's greedy
  continuation)."""
  ref = baseline(
    sender, receiver, ids, eval_tokens=eval_tokens, max_new_tokens=max_new_tokens, repeats=repeats
  )
  r = measure(sender, receiver, plan, ref, repeats=repeats)
  return {
    **r,
    "prefix_tokens": len(ref.prefix),
    "eval_tokens": eval_tokens,
    "prefill_s_full": ref.prefill_s,
    "prefill_speedup": ref.prefill_s / r["prefill_s_reuse"],
    "loss_full": ref.loss_full,
    "loss_sender": ref.loss_sender,
    "tokens_full": ref.continuation,
  }


# --- offline profiling ------------------------------------------------------------------------


def single_groups(n_layers: int) -> list[reuse.Plan]:
  """Every plan of one contiguous group [s, e), the full recompute [0, L) included."""
  return [
    reuse.Plan(n_layers=n_layers, groups=((s, e),))
    for s in range(n_layers)
    for e in range(s + 1, n_layers + 1)
  ]


def _aggregate(plan: reuse.Plan, refs: list[Baseline], runs: list[dict]) -> dict:
  full = float(np.mean([r.prefill_s for r in refs]))
  reuse = float(np.mean([m["prefill_s_reuse"] for m in runs]))
  loss_full = float(np.mean([r.loss_full for r in refs]))
  loss_sender = float(np.mean([r.loss_sender for r in refs]))
  loss = float(np.mean([m["loss_reuse"] for m in runs]))
  gain = loss_sender - loss_full
  return {
    "plan": str(plan),
    "groups": [list(g) for g in plan.groups],
    "recomputed_fraction": plan.recomputed_fraction,
    "e_layers": list(plan.e_layers),
    "prefill_s_full": full,
    "prefill_s_reuse": reuse,
    "prefill_speedup": full / reuse,
    "loss_full": loss_full,
    "loss_sender": loss_sender,
    "loss_reuse": loss,
    "advantage_kept": (loss_sender - loss) / gain if gain > 0 else float("nan"),
    "agreement": float(np.mean([m["agreement"] for m in runs])),
  }


def pareto(rows: list[dict]) -> list[str]:
  """The plans no other plan beats on both prefill time and loss, fastest first."""
  front, best = [], float("inf")
  for r in sorted(rows, key=lambda r: (r["prefill_s_reuse"], r["loss_reuse"])):
    if r["loss_reuse"] < best:
      front.append(r["plan"])
      best = r["loss_reuse"]
  return front


def profile(
  sender: Model,
  receiver: Model,
  prompts: list[list[int]],
  *,
  eval_tokens: int = 64,
  max_new_tokens: int = 16,
  repeats: int = 3,
  unions: int = 4,
  progress: bool = True,
) -> dict:
  """Offline DroidSpeak profile of a model pair on `prompts` (token ids, each a prefix plus a
  scored tail of eval_tokens): every single-group plan, full reuse, and the unions of two
  disjoint, non-adjacent groups among the `unions` best single groups by loss. Each plan's row
  (means over the prompts) has prefill times and speedup, losses (full / sender / reuse),
  advantage_kept = (loss_sender - loss_reuse) / (loss_sender - loss_full), greedy agreement
  with the full prefill and the recomputed-layer fraction. Returns {rows, pareto, settings}."""
  from tqdm import tqdm

  L = receiver.cfg.n_layers
  refs = [
    baseline(
      sender, receiver, ids, eval_tokens=eval_tokens, max_new_tokens=max_new_tokens, repeats=repeats
    )
    for ids in tqdm(prompts, desc="reference", disable=not progress)
  ]
  plans = [reuse.Plan.reuse_all(L)] + single_groups(L)
  rows: dict[str, dict] = {}

  def run(batch):
    for plan in tqdm(batch, desc="plans", disable=not progress):
      runs = [measure(sender, receiver, plan, ref, repeats=repeats) for ref in refs]
      rows[str(plan)] = _aggregate(plan, refs, runs)

  run(plans)
  ranked = sorted(
    (p for p in plans[1:] if p.groups != ((0, L),)), key=lambda p: rows[str(p)]["loss_reuse"]
  )[:unions]
  pairs = []
  for i, a in enumerate(ranked):
    for b in ranked[i + 1 :]:
      (s0, e0), (s1, e1) = sorted(a.groups + b.groups)
      if e0 < s1:  # disjoint and not adjacent (adjacent groups are one group)
        pairs.append(reuse.Plan(n_layers=L, groups=((s0, e0), (s1, e1))))
  run([p for p in pairs if str(p) not in rows])
  table = sorted(rows.values(), key=lambda r: r["prefill_s_reuse"])
  return {
    "rows": table,
    "pareto": pareto(table),
    "settings": {
      "prompts": len(prompts),
      "prefix_tokens": [len(r.prefix) for r in refs],
      "eval_tokens": eval_tokens,
      "max_new_tokens": max_new_tokens,
      "repeats": repeats,
      "unions": unions,
    },
  }


def pick(prof: dict, *, min_kept: float | None = None, min_speedup: float | None = None) -> str:
  """A plan from a profile: with min_speedup, the lowest-loss plan at least that much faster
  than the full prefill; else the fastest plan keeping at least min_kept (default 0.9) of the
  fine-tune's advantage over the sender. ValueError when no plan qualifies."""
  rows = prof["rows"]
  if min_speedup is not None:
    ok = [r for r in rows if r["prefill_speedup"] >= min_speedup]
    if not ok:
      best = max(r["prefill_speedup"] for r in rows)
      raise ValueError(
        f"no profiled plan reaches a {min_speedup:g}x prefill speedup (best {best:.2f}x)"
      )
    return min(ok, key=lambda r: r["loss_reuse"])["plan"]
  min_kept = 0.9 if min_kept is None else min_kept
  ok = [r for r in rows if r["advantage_kept"] >= min_kept]
  if not ok:
    raise ValueError(
      f"no profiled plan keeps {min_kept:.0%} of the fine-tune's advantage "
      "(the receiver may not beat the sender on the profiling text)"
    )
  return min(ok, key=lambda r: r["prefill_s_reuse"])["plan"]


def windows(ids: list[int], n: int, length: int) -> list[list[int]]:
  """n evenly spaced windows of `length` tokens from a token stream."""
  if len(ids) < length:
    raise ValueError(f"the profiling text has {len(ids)} tokens; one window needs {length}")
  starts = np.linspace(0, len(ids) - length, n).round().astype(int)
  return [ids[s : s + length] for s in starts]


def profile_path(sender: Model, receiver: Model) -> str:
  """Where the stored profile of a pair lives: $KVJAX_DROIDSPEAK_DIR (default
  ~/.cache/kvjax/droidspeak)/<digest of both models' params>.json."""
  root = os.environ.get("KVJAX_DROIDSPEAK_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "kvjax", "droidspeak"
  )
  key = hashlib.sha256(
    (fingerprint(sender)["sender"] + fingerprint(receiver)["sender"] + str(receiver.dtype)).encode()
  ).hexdigest()[:24]
  return os.path.join(root, key + ".json")
