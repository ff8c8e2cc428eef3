"""DroidSpeak: a receiver model reuses the KV / E cache its sender computed for the same prefix.

Sender and receiver share architecture, tokenizer and RoPE (the receiver is a fine-tune of the
sender's base), and the prefix sits at the same positions in both, so the sender's keys (after
RoPE) are valid keys for the receiver's cache slots. A `Plan` names contiguous groups of layers
[start, stop) that the receiver recomputes with its own weights; every other layer reuses the
sender's K/V. A group starting at layer s > 0 begins from the sender's E cache at s, the hidden
state entering layer s (a group at 0 starts from the receiver's own embedding of the tokens).

    plan = Plan.parse("1-3", n_layers=4)               # recompute layers 1 and 2
    sent = capture(sender, tokens, lengths, plan)      # K/V of the reused layers, E at 1
    cache = receive(receiver, sent, plan, size=256)    # a KVCache the receiver decodes from

Special cases of a plan: no group = reuse every layer (the sender's own cache); one group
[0, L) = full recompute (the receiver's own prefill); [0, k) = KV reuse from layer k on (no E).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.cache.dense import KVCache
from kvjax.lm import config


class DroidSpeakError(ValueError):
  """An invalid plan, mismatched sender / receiver, or a capture that does not fit a plan."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
  """groups: sorted, disjoint, non-empty layer ranges [start, stop) within [0, n_layers) that
  the receiver recomputes. Hashable: jitted steps take it as static."""

  n_layers: int
  groups: tuple[tuple[int, int], ...] = ()

  def __post_init__(self):
    L = self.n_layers
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
      raise DroidSpeakError(f"n_layers must be an int >= 1; got {L!r}")
    groups = tuple((int(s), int(e)) for s, e in self.groups)
    for s, e in groups:
      if not 0 <= s < e <= L:
        raise DroidSpeakError(f"group [{s}, {e}) is not a non-empty layer range within [0, {L})")
    for (s0, e0), (s1, e1) in itertools.pairwise(groups):
      if s1 < e0:
        raise DroidSpeakError(
          f"groups [{s0}, {e0}) and [{s1}, {e1}) overlap or are out of "
          "order; give disjoint groups in increasing order"
        )
    object.__setattr__(self, "groups", groups)

  @classmethod
  def reuse_all(cls, n_layers: int) -> Plan:
    return cls(n_layers=n_layers)

  @classmethod
  def full(cls, n_layers: int) -> Plan:
    return cls(n_layers=n_layers, groups=((0, n_layers),))

  @classmethod
  def kv_from(cls, k: int, n_layers: int) -> Plan:
    """Recompute layers [0, k), reuse the sender's K/V of layers [k, L) (no E needed)."""
    return cls(n_layers=n_layers, groups=((0, k),) if k else ())

  @classmethod
  def parse(cls, text: str, n_layers: int) -> Plan:
    """'' or 'none' (reuse all), 'full', or comma-separated 'start-stop' groups with stop
    exclusive, e.g. '0-2,5-7'."""
    text = text.strip().lower()
    if text in ("", "none"):
      return cls.reuse_all(n_layers)
    if text == "full":
      return cls.full(n_layers)
    groups = []
    for part in text.split(","):
      m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
      if not m:
        raise DroidSpeakError(
          f"plan {text!r}: {part.strip()!r} is not a group 'start-stop' "
          "(layers start..stop-1); expected e.g. '0-2,5-7', 'full' or "
          "'none'"
        )
      groups.append((int(m[1]), int(m[2])))
    return cls(n_layers=n_layers, groups=tuple(groups))

  def __str__(self) -> str:
    return ",".join(f"{s}-{e}" for s, e in self.groups) or "none"

  @property
  def recomputed(self) -> tuple[int, ...]:
    """The layers the receiver runs itself."""
    return tuple(i for s, e in self.groups for i in range(s, e))

  @property
  def reused(self) -> tuple[int, ...]:
    """The layers whose K/V come from the sender."""
    done = set(self.recomputed)
    return tuple(i for i in range(self.n_layers) if i not in done)

  @property
  def e_layers(self) -> tuple[int, ...]:
    """The layers whose input hidden state (E cache) the receiver needs: group starts > 0."""
    return tuple(s for s, _ in self.groups if s > 0)

  @property
  def recomputed_fraction(self) -> float:
    return len(self.recomputed) / self.n_layers


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["tokens", "lengths", "k", "v", "e"],
  meta_fields=["plan"],
)
@dataclasses.dataclass
class Capture:
  """What the sender hands over for a plan: only what the plan needs.

  tokens: [B, P] int32 the prefix (right-padded); lengths: [B] int32 real tokens per row.
  k, v: [R, B, K, P, H] keys (after RoPE) and values of the R = len(plan.reused) reused
    layers, in layer order (the caches' layout). e: [G, B, P, D] the hidden states entering
    each of plan.e_layers.
  """

  tokens: jax.Array
  lengths: jax.Array
  k: jax.Array
  v: jax.Array
  e: jax.Array
  plan: Plan


def check_pair(sender, receiver) -> None:
  """Raises DroidSpeakError unless sender and receiver share the architecture (and RoPE)."""
  diff = config.diff(sender.cfg, receiver.cfg, other="receiver")
  if diff:
    raise DroidSpeakError(
      "sender and receiver must share the architecture and RoPE (the "
      "receiver a fine-tune of the sender's base); they differ in " + ", ".join(diff)
    )


def _check_prefix(model, tokens, lengths) -> None:
  tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise DroidSpeakError(
      f"tokens must be an int array [B, P]; got {tokens.dtype}{list(tokens.shape)}"
    )
  B, P = tokens.shape
  if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise DroidSpeakError(
      f"lengths must be an int array [B] = [{B}]; got {lengths.dtype}{list(lengths.shape)}"
    )
  if int(lengths.min()) < 1 or int(lengths.max()) > P:
    raise DroidSpeakError(
      f"lengths must lie in [1, {P}] (the padded prefix); got {lengths.tolist()}"
    )
  if model.cfg.max_position < P:
    raise DroidSpeakError(
      f"a prefix of {P} tokens exceeds the model's context of {model.cfg.max_position} positions"
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _capture(graphdef, state, tokens, lengths, *, plan: Plan) -> Capture:
  out, _ = nnx.merge(graphdef, state)(
    tokens, logits=False, return_kv=True, return_layer_inputs=bool(plan.e_layers)
  )
  keep = jnp.asarray(plan.reused, jnp.int32)
  e_idx = jnp.asarray(plan.e_layers, jnp.int32)
  B, P = tokens.shape
  e = (
    out.layer_inputs[e_idx]
    if plan.e_layers
    else jnp.zeros((0, B, P, out.hidden.shape[-1]), out.hidden.dtype)
  )
  return Capture(tokens=tokens, lengths=lengths, k=out.k[keep], v=out.v[keep], e=e, plan=plan)


def capture(sender, tokens, lengths, plan: Plan) -> Capture:
  """The sender's prefill of the prefix, keeping the K/V of the plan's reused layers and the E
  cache at its group starts. tokens [B, P] right-padded, lengths [B]."""
  if plan.n_layers != sender.cfg.n_layers:
    raise DroidSpeakError(
      f"the plan is for {plan.n_layers} layers; the sender has {sender.cfg.n_layers}"
    )
  _check_prefix(sender, tokens, lengths)
  return _capture(
    sender.graphdef,
    sender.state,
    jnp.asarray(tokens, jnp.int32),
    jnp.asarray(lengths, jnp.int32),
    plan=plan,
  )


@functools.partial(jax.jit, static_argnames=("graphdef", "size"))
def _receive(graphdef, state, sent: Capture, *, size: int) -> KVCache:
  dec, plan = nnx.merge(graphdef, state), sent.plan
  cfg = dec.cfg
  B, P = sent.tokens.shape
  positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  k = jnp.zeros((cfg.n_layers, B, cfg.n_kv_heads, P, cfg.head_dim), dec.dtype)
  v = jnp.zeros_like(k)
  if plan.reused:
    keep = jnp.asarray(plan.reused, jnp.int32)
    k, v = k.at[keep].set(sent.k.astype(k.dtype)), v.at[keep].set(sent.v.astype(v.dtype))
  for s, e in plan.groups:
    inputs = dict(tokens=sent.tokens) if s == 0 else dict(hidden=sent.e[plan.e_layers.index(s)])
    out, _ = dec(**inputs, positions=positions, layers=(s, e), logits=False, return_kv=True)
    k, v = k.at[s:e].set(out.k.astype(k.dtype)), v.at[s:e].set(out.v.astype(v.dtype))
  cache = KVCache.init(**cfg.cache_dims, batch=B, size=size, dtype=dec.dtype)
  return cache.write(k, v, positions, sent.lengths)


def receive(receiver, sent: Capture, size: int | None = None) -> KVCache:
  """The receiver's prefix cache under sent.plan: its own K/V for the recomputed groups (each
  from the sender's E at its start, or from the tokens at layer 0), the sender's elsewhere.
  size: cache slots (default: the padded prefix length P); row b holds lengths[b] tokens."""
  if not isinstance(sent, Capture):
    raise TypeError(f"sent must be a kvjax.lm.droidspeak.Capture; got {type(sent).__name__}")
  cfg, plan = receiver.cfg, sent.plan
  if plan.n_layers != cfg.n_layers:
    raise DroidSpeakError(
      f"the capture's plan is for {plan.n_layers} layers; the receiver has {cfg.n_layers}"
    )
  B, P = sent.tokens.shape
  D, K, H = cfg.d_model, cfg.n_kv_heads, cfg.head_dim
  want = {
    "k": (len(plan.reused), B, K, P, H),
    "v": (len(plan.reused), B, K, P, H),
    "e": (len(plan.e_layers), B, P, D),
  }
  for name, shape in want.items():
    got = tuple(getattr(sent, name).shape)
    if got != shape:
      raise DroidSpeakError(
        f"capture.{name} has shape {got}; plan {plan} and this receiver need {shape}"
      )
  size = P if size is None else size
  if size < P:
    raise DroidSpeakError(f"size {size} cannot hold the {P}-token (padded) prefix")
  return _receive(receiver.graphdef, receiver.state, sent, size=int(size))
