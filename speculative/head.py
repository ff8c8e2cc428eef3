"""EAGLE draft heads: one decoder layer that reads the target model's own features.

A head position i holds the pair (f_i, t_{i+1}): the target's feature at position i and the
embedding of the next token; its output h_i regresses f_{i+1} and, through the target's frozen
LM head, predicts t_{i+2}. While drafting the head feeds its own outputs back as features.

  eagle1: f = the target's final-normed top hidden state; x = fc(concat(embed(t), f)) [2D -> D,
    bias]; one decoder layer of the target's family; logits = target LM head(h).
  eagle3: f = fuse(concat(the hidden states entering layers `fuse_layers`)) [3D -> D], so the
    head's own outputs live in the same space; x = fc(concat(norm(embed(t)), norm(f))); one
    decoder layer; logits = target LM head(own final norm(h)). Trained with training-time test.

published=True: the reference (SafeAILab/EAGLE) architectures, as published heads run
(`kvjax.speculative.formats` reads and writes their files):
  eagle1: as above, but the decoder layer has no input norm (cnets.py's layer 0): its
    attention reads fc(...) itself.
  eagle3: no 2D -> D fc: the fused feature f (fuse [3D, D], no bias) is the layer's residual;
    its attention reads concat(norm(embed(t)), norm(f)) [2D] (q/k/v [2D, N, H]); then the
    layer's post-attention norm and MLP; logits = own LM head(final norm(h)) over the draft
    vocabulary (always present; the whole vocabulary when draft_vocab_size = vocab_size).

Embedding and LM head (eagle1, kvjax eagle3) are the target's (frozen, never stored with the
head). Heads are read and written by `kvjax.speculative.formats`: kvjax's own directory
(`head.json`, the HeadConfig with the target's architecture, and `params/`, orbax) and the
published layouts.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.cache.dense import KVCache
from kvjax.cache.view import causal
from kvjax.lm import artifact, config
from kvjax.lm.artifact import params_fingerprint
from kvjax.lm.attention import Training
from kvjax.lm.config import Config
from kvjax.lm.decoder import Block, RMSNorm, init_param, layer_slice, run_layers, stack_layers
from kvjax.lm.sharding import declare
from kvjax.pallas_kernels.splits import NEG

KINDS = ("eagle1", "eagle3")


class HeadError(ValueError):
  """A head that does not fit its target, or a head directory that cannot be read."""


def default_fuse_layers(n_layers: int) -> tuple[int, ...]:
  """EAGLE-3's low / middle / high layers: the inputs of layers 2, L//2 and L-3 (clipped to
  [0, L) and made distinct for shallow models)."""
  want = [min(2, n_layers - 1), n_layers // 2, max(n_layers - 3, 0)]
  return tuple(sorted(set(want)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadConfig:
  """kind: "eagle1" or "eagle3". target: the architecture of the model the head was trained
  for (its layer is one layer of that config). fuse_layers: eagle3's fused layer inputs.
  draft_vocab: eagle3's reduced draft vocabulary, the target ids of its N tokens (EAGLE-3's
  d2t map; most frequent first): the head drafts through its own [D, N] LM head over them
  (empty: through the target's LM head over the whole vocabulary). target_name: where the
  target came from (informational). published: the reference architecture of `kind` (see the
  module docstring); a published eagle3 head always has a draft_vocab."""

  kind: str
  target: Config
  fuse_layers: tuple[int, ...] = ()
  draft_vocab: tuple[int, ...] = ()
  target_name: str = ""
  target_fingerprint: str = ""  # lm.params_fingerprint of the params trained against ("": unknown)
  published: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise HeadError(f"head kind must be one of {KINDS}; got {self.kind!r}")
    L = self.target.n_layers
    if self.kind == "eagle3":
      if not self.fuse_layers:
        object.__setattr__(self, "fuse_layers", default_fuse_layers(L))
      if not all(0 <= i < L for i in self.fuse_layers):
        raise HeadError(f"fuse_layers {self.fuse_layers} must be layer indices in [0, {L})")
    elif self.fuse_layers:
      raise HeadError("fuse_layers applies to eagle3 heads only")
    object.__setattr__(self, "fuse_layers", tuple(int(i) for i in self.fuse_layers))
    ids = tuple(int(i) for i in self.draft_vocab)
    V = self.target.vocab_size
    if ids and self.kind != "eagle3":
      raise HeadError("a reduced draft vocabulary (draft_vocab) applies to eagle3 heads only")
    if ids and (len(set(ids)) != len(ids) or not all(0 <= i < V for i in ids)):
      raise HeadError(
        f"draft_vocab must be distinct token ids in [0, {V}); got "
        f"{len(ids)} ids, {len(set(ids))} distinct, range "
        f"[{min(ids)}, {max(ids)}]"
      )
    object.__setattr__(self, "draft_vocab", ids)
    if self.published and self.kind == "eagle3" and not ids:
      raise HeadError(
        "a published eagle3 head has its own LM head: it needs a draft_vocab "
        "(every target id, in order, for a full-vocabulary head)"
      )

  @property
  def feature_width(self) -> int:
    """F, the last axis of `Head.feature_inputs`: D (eagle1), len(fuse_layers) D (eagle3)."""
    D = self.target.d_model
    return D if self.kind == "eagle1" else len(self.fuse_layers) * D

  @property
  def layer(self) -> Config:
    """The config of the head's one decoder layer: the target's top layer (its MLP kind),
    global attention."""
    return config.one_layer(self.target, self.target.n_layers - 1, windows=(0,))

  def to_json(self) -> dict[str, Any]:
    return artifact.config_to_json(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> HeadConfig:
    return artifact.config_from_json(cls, d)


class Head(nnx.Module):
  """The head's params: fc (+ eagle3 fuse and norms) and one stacked decoder layer, each
  declaring its logical axes where it is made ("features" for a concatenation of D-wide
  inputs: fuse's 3D, fc's and a published eagle3 q/k/v's 2D)."""

  def __init__(self, hc: HeadConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    t = hc.target
    D, N, K, H = t.d_model, t.n_heads, t.n_kv_heads, t.head_dim
    self.hc = hc
    if hc.kind == "eagle3":
      self.fuse = init_param(rngs, (len(hc.fuse_layers) * D, D), ("features", "embed"), dtype)
      self.embed_norm = RMSNorm(t, dtype)
      self.feature_norm = RMSNorm(t, dtype)
      self.final_norm = RMSNorm(t, dtype)
    if hc.draft_vocab:
      self.draft_head = init_param(rngs, (D, len(hc.draft_vocab)), ("embed", "vocab"), dtype)
    if not (hc.published and hc.kind == "eagle3"):
      self.fc = init_param(rngs, (2 * D, D), ("features", "embed"), dtype)
      self.fc_bias = declare(jnp.zeros((D,), dtype), ("embed",))
    block = Block(hc.layer, rngs=rngs, dtype=dtype)
    if hc.published:  # no input norm; eagle3's attention reads the 2D concat
      del block.attn_norm
      if hc.kind == "eagle3":
        block.attn.q = init_param(rngs, (2 * D, N, H), ("features", "heads", "head_dim"), dtype)
        block.attn.k = init_param(rngs, (2 * D, K, H), ("features", "kv_heads", "head_dim"), dtype)
        block.attn.v = init_param(rngs, (2 * D, K, H), ("features", "kv_heads", "head_dim"), dtype)
    self.blocks = stack_layers([block])

  def feature_inputs(self, hidden: jax.Array, layer_inputs: jax.Array | None) -> jax.Array:
    """What the head's features are made of, from the target's forward: hidden [B, T, D]
    (final-normed top state) for eagle1; the concatenated inputs of `fuse_layers` ([L, B, T,
    D] -> [B, T, len(fuse_layers) D]) for eagle3."""
    if self.hc.kind == "eagle1":
      return hidden
    return jnp.concatenate([layer_inputs[i] for i in self.hc.fuse_layers], axis=-1)

  def project(self, inputs: jax.Array) -> jax.Array:
    """`feature_inputs`' output -> the features [B, T, D] (eagle3: through `fuse`)."""
    if self.hc.kind == "eagle1":
      return inputs
    return jnp.einsum("btc,cd->btd", inputs.astype(self.fuse[...].dtype), self.fuse[...])

  def feature(self, hidden: jax.Array, layer_inputs: jax.Array | None) -> jax.Array:
    """The target's features [B, T, D] from its forward: `project(feature_inputs(...))`."""
    return self.project(self.feature_inputs(hidden, layer_inputs))

  def __call__(
    self,
    features: jax.Array,
    embeds: jax.Array,
    *,
    cache: KVCache | None,
    positions: jax.Array,
    n_new: jax.Array | None = None,
    mask: jax.Array | None = None,
    training: Training | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """features, embeds [B, T, D] (the pairs' features and next-token embeddings) -> (h [B, T,
    D], cache with the T pairs written). cache: the head's KVCache (L = 1), or None to attend
    among the T pairs only (training); positions [B, T]; n_new [B] real pairs (default T);
    mask [B, T, S + T] as for the decoder ([B, T, T] without a cache; default causal);
    training: the training forward (`kvjax.lm.attention.Training`), as for the decoder."""
    hc = self.hc
    dtype = self.blocks.attn.o[...].dtype
    e, f = embeds.astype(dtype), features.astype(dtype)
    if hc.kind == "eagle3":
      e, n = self.embed_norm(e), self.feature_norm(f)
    if hc.published and hc.kind == "eagle3":
      x, attn_in = f, jnp.concatenate([e, n], -1)  # residual f; [B, T, 2D]
    else:
      ef = jnp.concatenate([e, n if hc.kind == "eagle3" else f], -1)
      x = jnp.einsum("btc,cd->btd", ef, self.fc[...]) + self.fc_bias[...]
      attn_in = x if hc.published else None
    B, T, _ = x.shape
    if cache is None:
      x, _, _, _ = run_layers(
        self.blocks,
        hc.layer,
        x,
        view=causal(positions, mask),
        cached=None,
        layers=(0, 1),
        training=training,
        attn_in=attn_in,
      )
      return x, None
    view = cache.view(T, positions=positions, mask=mask)
    x, _, ks, vs = run_layers(
      self.blocks,
      hc.layer,
      x,
      view=view,
      cached=cache.slots(),
      layers=(0, 1),
      training=training,
      attn_in=attn_in,
    )
    n_new = jnp.full((B,), T, jnp.int32) if n_new is None else n_new
    return x, cache.write(ks, vs, positions, n_new)

  def logits(self, h: jax.Array, target) -> jax.Array:
    """h [..., D] -> draft logits [..., V] float32 through the target Decoder's LM head, or with
    a reduced draft vocabulary its draft logits at their target ids (NEG elsewhere: never
    drafted)."""
    if not self.hc.draft_vocab:
      if self.hc.kind == "eagle3":
        h = self.final_norm(h)
      return target.logits(h.astype(target.dtype))
    z = self.draft_logits(h, target)
    full = jnp.full((*z.shape[:-1], self.hc.target.vocab_size), NEG, jnp.float32)
    return full.at[..., jnp.asarray(self.hc.draft_vocab)].set(z)

  def draft_logits(self, h: jax.Array, target) -> jax.Array:
    """h [..., D] -> [..., N] float32 logits over the reduced draft vocabulary (its own LM
    head, the target's final soft-cap)."""
    z = jnp.einsum(
      "...d,dn->...n", self.final_norm(h), self.draft_head[...], preferred_element_type=jnp.float32
    )
    cap = self.hc.target.final_softcap
    return z if cap is None else jnp.tanh(z / cap) * cap


def new_cache(hc: HeadConfig, batch: int, size: int, dtype) -> KVCache:
  t = hc.target
  return KVCache.init(
    n_layers=1, batch=batch, size=size, n_kv_heads=t.n_kv_heads, head_dim=t.head_dim, dtype=dtype
  )


def check(hc: HeadConfig, target: Config) -> None:
  """Raises HeadError unless the head fits the target's architecture."""
  diff = config.diff(hc.target, target, names=("family", *config.PARAM_SIZES, *config.EXPERT_SIZES))
  if diff:
    name = f" {hc.target_name!r}" if hc.target_name else ""
    raise HeadError(f"this {hc.kind} head was trained for another target{name}: " + ", ".join(diff))


@dataclasses.dataclass(frozen=True)
class LoadedHead:
  """A head ready to run: static config + graphdef, params state."""

  hc: HeadConfig
  graphdef: Any
  state: Any
  path: str | None = None

  @property
  def module(self) -> Head:
    return nnx.merge(self.graphdef, self.state)

  def params(self) -> dict[str, Any]:
    return nnx.to_pure_dict(self.state)

  def with_params(self, params: dict[str, Any]) -> LoadedHead:
    state = jax.tree.map(lambda a: a, self.state)
    nnx.replace_by_pure_dict(state, params)
    return dataclasses.replace(self, state=state)


def init(
  target,
  kind: str = "eagle1",
  *,
  seed: int = 0,
  fuse_layers: tuple[int, ...] = (),
  draft_vocab: tuple[int, ...] = (),
  copy_top_layer: bool = True,
  published: bool = False,
) -> LoadedHead:
  """A fresh head for `target` (a kvjax.lm.Model). copy_top_layer: start its decoder layer
  from the target's top layer (trains faster than random). draft_vocab: eagle3's reduced
  draft vocabulary (`draft_vocabulary`); its LM head starts as the target's columns of
  those tokens. published: the reference architecture (`HeadConfig`; exportable to the
  published layouts); a published eagle3 head without a draft_vocab gets the whole vocabulary,
  and its 2D-wide q/k/v start random (the rest of the layer from the target's top layer)."""
  if published and kind == "eagle3" and not draft_vocab:
    draft_vocab = tuple(range(target.cfg.vocab_size))
  hc = HeadConfig(
    kind=kind,
    target=target.cfg,
    fuse_layers=fuse_layers,
    draft_vocab=tuple(draft_vocab),
    target_name=os.path.basename(target.path or ""),
    target_fingerprint=params_fingerprint(target),
    published=published,
  )
  head = Head(hc, rngs=nnx.Rngs(seed), dtype=target.dtype)
  graphdef, state = nnx.split(head)
  if copy_top_layer:
    params = nnx.to_pure_dict(state)
    L = target.cfg.n_layers
    top = nnx.to_pure_dict(nnx.state(layer_slice(target.decoder.blocks, target.cfg, L - 1, L)))
    if published:
      del top["attn_norm"]
      if kind == "eagle3":
        top["attn"].update({n: params["blocks"]["attn"][n] for n in ("q", "k", "v")})
    params["blocks"] = top
    nnx.replace_by_pure_dict(state, params)
  if hc.draft_vocab:
    params = nnx.to_pure_dict(state)
    t = target.params()
    w = t["embed"].T if target.cfg.tie_embeddings else t["head"]  # [D, V]
    params["draft_head"] = jnp.asarray(w)[:, jnp.asarray(hc.draft_vocab)].astype(target.dtype)
    nnx.replace_by_pure_dict(state, params)
  return LoadedHead(hc, graphdef, state)


def draft_vocabulary(token_ids, n: int, vocab_size: int) -> tuple[int, ...]:
  """EAGLE-3's reduced draft vocabulary: the n most frequent ids of token_ids (any int array
  of target tokens; ties by smaller id), most frequent first."""
  if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= vocab_size:
    raise HeadError(f"the draft vocabulary size must be an int in [1, {vocab_size}]; got {n!r}")
  ids = np.asarray(token_ids).reshape(-1)
  counts = np.bincount(ids[(ids >= 0) & (ids < vocab_size)], minlength=vocab_size)
  order = np.lexsort((np.arange(vocab_size), -counts))
  return tuple(int(i) for i in order[:n])
