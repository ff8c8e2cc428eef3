"""The cache coprocessor: reads a frozen model's KV cache, writes latent embeddings into it.

The coprocessor has the frozen base model's architecture and N trainable soft-token
embeddings. Given the base's cache of a prefix, it runs the N soft tokens as input embeddings
at positions length .. length + N - 1 with its layer i attending to the base's layer-i K/V of
the prefix and to the soft tokens' own K/V; its final-normed hidden states there are the N
latents. `augment` then runs the frozen base over the latents as input embeddings in the
cache's next N slots, which appends their K/V to the base's cache; they all sit at one
position behind the prefix's last token (`LATENT_POSITION`), so decoding continues from the
cache as usual with every later token at the position it would have without them.

    cop = coprocessor.init(base, n_latents=16)           # copy of base + 16 soft tokens
    cache = coprocessor.augment(base, cop, cache)        # cache.length grows by 16

Its decoder starts as a copy of the base's layers ("copy", trained in full), from scratch
("scratch"), or as the frozen base's layers plus trainable low-rank deltas ("lora": W + a @ b
on every projection, b zero so it starts as the copy). The coprocessor never reads or writes
tokens, so it keeps no embedding table or LM head of its own. The pause-token baseline
(kind "pause") has only the N soft tokens: they are the latents, inserted with no
coprocessor.

A coprocessor directory holds `coprocessor.json` (CoprocessorConfig, with the base's
architecture) and `params/` (orbax, the trainable params: "soft" [N, D] and, for a
coprocessor, "final_norm" and "blocks" or "lora"; their logical axes in `declared_axes`);
the shipped ones (coprocessor/shipped/) load by name (`COPROCESSORS`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.cache.dense import KVCache
from kvjax.lm import artifact, config, sharding, steps
from kvjax.lm.artifact import params_fingerprint
from kvjax.lm.attention import Training
from kvjax.lm.config import Config
from kvjax.lm.decoder import Decoder
from kvjax.lm.engine import check_finite, new_cache, pad
from kvjax.lm.model import Model
from kvjax.lm.model import init as init_model
from kvjax.lm.sampling import Sampling, sample
from kvjax.lm.sharding import declare

KINDS = ("coprocessor", "pause")
# Where the frozen base sees the latents by default: every one 33 positions before the next
# token (32 behind the prefix's last one). The tokens after them keep their own positions and
# RoPE distances to the prefix, and the 32 most recent tokens keep the near distances to
# themselves. Measured on `shakespeare`: at "the next positions" (p .. p + N - 1) every later
# token sits N positions further from its prefix than the model was trained on, which alone
# raises the next token's nll from 4.34 to 6.12 nats; at the last token's position (-1) the
# latents crowd the next token's local attention (16 trained pause tokens: -20% at ahead
# position 1 on a held-out comedy); at -33 the same pause tokens give +2.6% there.
# CoprocessorConfig.latent_offset chooses another offset (<= -1).
LATENT_POSITION = -33
INITS = ("copy", "scratch", "lora")
# The block projections LoRA adapts, with how many leading axes (after L) are the input (those
# a base has: a mixture-of-experts base has no dense MLP, so its LoRA adapts attention only).
LORA_TARGETS = {
  ("attn", "q"): 1,
  ("attn", "k"): 1,
  ("attn", "v"): 1,
  ("attn", "o"): 2,
  ("mlp", "gate"): 1,
  ("mlp", "up"): 1,
  ("mlp", "down"): 1,
}


class CoprocessorError(ValueError):
  """A coprocessor that does not fit its base model, bad settings, or an unreadable directory."""


# Shipped coprocessors (see docs/shipped-models.md), loadable by name.
COPROCESSORS = artifact.Kind(
  noun="coprocessor",
  config="coprocessor.json",
  shipped_in=os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped"),
  error=CoprocessorError,
)


def _is_int(n) -> bool:
  return not isinstance(n, bool) and isinstance(n, (int, np.integer))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CoprocessorConfig:
  """n_latents: N soft tokens / latents per augmentation. base: the frozen model's
  architecture. kind: "coprocessor" or "pause" (the soft tokens alone are the latents).
  init: how a coprocessor's decoder started ("copy", "scratch" or "lora"; "none" for pause).
  lora_rank: r of the "lora" deltas. latent_offset: the base sees every latent at the next
  token's position + latent_offset (<= -1, so the next token keeps its position).
  base_name: where the base came from (informational). base_fingerprint: the
  `lm.params_fingerprint` of the base it was trained with ("": not recorded)."""

  n_latents: int
  base: Config
  kind: str = "coprocessor"
  init: str = "copy"
  lora_rank: int = 16
  latent_offset: int = LATENT_POSITION
  base_name: str = ""
  base_fingerprint: str = ""

  def __post_init__(self):
    n = self.n_latents
    if not _is_int(n) or n < 1:
      raise CoprocessorError(f"n_latents must be an int >= 1; got {n!r}")
    if self.kind not in KINDS:
      raise CoprocessorError(f"kind must be one of {KINDS}; got {self.kind!r}")
    if self.kind == "pause":
      object.__setattr__(self, "init", "none")
    elif self.init not in INITS:
      raise CoprocessorError(f"init must be one of {INITS}; got {self.init!r}")
    if not _is_int(self.lora_rank) or self.lora_rank < 1:
      raise CoprocessorError(f"lora_rank must be an int >= 1; got {self.lora_rank!r}")
    if not _is_int(self.latent_offset) or self.latent_offset > -1:
      raise CoprocessorError(f"latent_offset must be an int <= -1; got {self.latent_offset!r}")

  def to_json(self) -> dict[str, Any]:
    return artifact.config_to_json(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> CoprocessorConfig:
    return artifact.config_from_json(cls, d)


@dataclasses.dataclass(frozen=True)
class Coprocessor:
  """cc: its config; params: the trainable params, a pure dict ("soft" [N, D], and for a
  coprocessor "final_norm" and "blocks" (copy, scratch) or "lora" {"attn": {"q": {"a", "b"},
  ...}, "mlp": ...}); path: the directory it was loaded from."""

  cc: CoprocessorConfig
  params: dict[str, Any]
  path: str | None = None

  @property
  def soft(self) -> jax.Array:
    return self.params["soft"]

  @property
  def n_latents(self) -> int:
    return self.cc.n_latents

  def prefiller(self, delay: int = 0) -> Callable:
    """This coprocessor's prefill for `kvjax.lm.generate(prefill=...)`: latents augment the
    cache before each prompt's last token, arriving `delay` tokens late."""
    return functools.partial(augmented_prefill, cop=self, delay=delay)

  def with_params(self, params: dict[str, Any]) -> Coprocessor:
    return dataclasses.replace(self, params=params)

  @property
  def state(self) -> nnx.State:
    """The params as an nnx.State of params that declare their logical axes
    (`declared_axes`): what `kvjax.lm.sharding` places them by."""
    return nnx.State(jax.tree.map(declare, self.params, declared_axes(self.cc)))


def declared_axes(cc: CoprocessorConfig) -> dict[str, Any]:
  """The logical axes of each of a coprocessor's params, a nested dict shaped like them: soft
  [N, D] ("latents", "embed"); the copied blocks and final_norm as the base's Decoder
  declares its own; the LoRA deltas of a block weight W [L, *in, *out], a [L, in, r] and
  b [L, r, out], by W's layer axis, "lora_rank" and the outermost name of W's flattened
  input (output) axes."""
  axes: dict[str, Any] = {"soft": ("latents", "embed")}
  if cc.kind == "pause":
    return axes
  base = nnx.eval_shape(lambda: Decoder(cc.base, rngs=nnx.Rngs(0)))
  base = sharding.param_axes(nnx.state(base))
  if cc.init == "lora":
    axes["lora"] = {}
    for (group, name), n_in in LORA_TARGETS.items():
      if group in base["blocks"]:
        layers, *w = base["blocks"][group][name]  # (layers, *in, *out)
        axes["lora"].setdefault(group, {})[name] = {
          "a": (layers, w[0], "lora_rank"),
          "b": (layers, "lora_rank", w[n_in]),
        }
  else:
    axes["blocks"] = base["blocks"]
  axes["final_norm"] = base["final_norm"]
  return axes


def check(cc: CoprocessorConfig, base: Config) -> None:
  """Raises CoprocessorError unless the coprocessor was made for this base architecture."""
  diff = config.diff(cc.base, base)
  if diff:
    name = f" {cc.base_name!r}" if cc.base_name else ""
    raise CoprocessorError(
      f"this coprocessor was made for another base model{name}: " + ", ".join(diff)
    )


def _lora_init(blocks: dict[str, Any], rank: int, key: jax.Array) -> dict[str, Any]:
  """Low-rank deltas for every LORA_TARGETS weight W [L, *in, *out]: a [L, in, r] ~ N(0,
  1 / in), b [L, r, out] = 0."""
  out: dict[str, Any] = {}
  for i, ((group, name), n_in) in enumerate(LORA_TARGETS.items()):
    if group not in blocks:
      continue
    w = blocks[group][name]
    fan_in = math.prod(w.shape[1 : 1 + n_in])
    fan_out = math.prod(w.shape[1 + n_in :])
    a = jax.random.normal(jax.random.fold_in(key, i), (w.shape[0], fan_in, rank)) / fan_in**0.5
    out.setdefault(group, {})[name] = {
      "a": a.astype(w.dtype),
      "b": jnp.zeros((w.shape[0], rank, fan_out), w.dtype),
    }
  return out


def _lora_merge(blocks: dict[str, Any], lora: dict[str, Any]) -> dict[str, Any]:
  """The base's block params with W + a @ b on every adapted weight."""
  merged = jax.tree.map(lambda x: x, blocks)
  for (group, name), _ in LORA_TARGETS.items():
    if group not in lora:
      continue
    w, ab = blocks[group][name], lora[group][name]
    delta = jnp.einsum("lir,lro->lio", ab["a"], ab["b"])
    merged[group][name] = w + delta.reshape(w.shape).astype(w.dtype)
  return merged


def init(
  base: Model,
  n_latents: int,
  *,
  kind: str = "coprocessor",
  init: str = "copy",
  lora_rank: int = 16,
  latent_offset: int = LATENT_POSITION,
  seed: int = 0,
) -> Coprocessor:
  """A new coprocessor (or pause-token set) for `base`: its decoder a copy of base's layers
  ("copy"), freshly initialised ("scratch") or the base's plus zero low-rank deltas ("lora");
  soft tokens drawn like embeddings (std 0.02)."""
  cc = CoprocessorConfig(
    n_latents=n_latents,
    base=base.cfg,
    kind=kind,
    init=init,
    lora_rank=lora_rank,
    latent_offset=latent_offset,
    base_name=os.path.basename(base.path or ""),
    base_fingerprint=params_fingerprint(base),
  )
  soft = 0.02 * jax.random.normal(jax.random.key(seed), (n_latents, base.cfg.d_model))
  params: dict[str, Any] = {"soft": soft.astype(base.dtype)}
  if cc.kind == "coprocessor":
    source = base.params()
    if cc.init == "scratch":
      source = init_model(base.cfg, seed=seed + 1, dtype=base.dtype).params()
    if cc.init == "lora":
      params["lora"] = _lora_init(source["blocks"], cc.lora_rank, jax.random.key(seed + 2))
    else:
      params["blocks"] = jax.tree.map(jnp.array, source["blocks"])
    params["final_norm"] = _latent_norm(source["final_norm"], source["embed"], base.cfg)
  return Coprocessor(cc, params)


def _latent_norm(final_norm: dict[str, Any], embed: jax.Array, cfg: Config) -> dict[str, Any]:
  """The coprocessor's output norm: the source's, rescaled so the latents start at the RMS of
  the token embeddings the base takes as input. (The final-normed hidden state is an LM-head
  input, ~20x larger than an embedding in the shipped model; inserted at that size it swamps
  the attention of the tokens after it.)"""
  w = final_norm["scale"].astype(jnp.float32)
  gain = 1.0 + w if cfg.norm_plus_one else w
  emb = jnp.sqrt(jnp.mean(jnp.square(embed.astype(jnp.float32))))
  if cfg.scale_embeddings:
    emb = emb * cfg.d_model**0.5
  gain = gain * emb / jnp.sqrt(jnp.mean(jnp.square(gain)))
  return {"scale": (gain - 1.0 if cfg.norm_plus_one else gain).astype(final_norm["scale"].dtype)}


def decoder(graphdef, state, cc: CoprocessorConfig, params: dict[str, Any]):
  """The coprocessor's Decoder built from the base's (graphdef, state): its own layers
  (copy/scratch) or the base's plus the LoRA deltas, over the base's (never used) embedding
  and head. None for pause tokens. Traceable: state and params may hold tracers."""
  if cc.kind == "pause":
    return None
  own = {"final_norm": params["final_norm"]}
  if cc.init == "lora":
    own["blocks"] = _lora_merge(nnx.to_pure_dict(state)["blocks"], params["lora"])
  else:
    own["blocks"] = params["blocks"]
  state = jax.tree.map(lambda a: a, state)  # a copy to fill in
  nnx.replace_by_pure_dict(state, own)
  return nnx.merge(graphdef, state)


def latents_of(
  cop_dec,
  soft: jax.Array,
  cache: KVCache,
  *,
  positions: jax.Array | None = None,
  mask: jax.Array | None = None,
  copies: int = 1,
  training: Training | None = None,
) -> jax.Array:
  """soft [N, D] read through `cop_dec` (a Decoder; None = pause tokens) over the base's cache
  -> latents [B, copies * N, D]. By default the soft tokens sit at positions
  cache.next_position() + arange(N), attend to the cache's filled slots (layer i to layer i)
  and causally to each other; `positions` [B, copies * N] and `mask` [B, copies * N,
  S + copies * N] say otherwise (several traces in one pass). The cache is not changed.
  Pause tokens: soft, broadcast.
  training: the training forward (`kvjax.lm.attention.Training`)."""
  B = cache.batch
  x = jnp.broadcast_to(
    jnp.tile(soft, (copies, 1))[None], (B, copies * soft.shape[0], soft.shape[-1])
  )
  if cop_dec is None:
    return x
  out, _ = cop_dec(
    embeds=x.astype(cop_dec.dtype),
    cache=cache,
    positions=positions,
    mask=mask,
    logits=False,
    training=training,
  )
  return out.hidden


def augment_with(
  base_dec, latents: jax.Array, cache: KVCache, offset: int = LATENT_POSITION
) -> KVCache:
  """The base run over latents [B, N, D] as input embeddings after the cache -> the cache
  with their K/V appended in the next N slots (length + N), all at the next token's position
  + offset, so the next token keeps its own position."""
  B, N, _ = latents.shape
  at = jnp.broadcast_to((cache.next_position() + offset)[:, None], (B, N))
  _, cache = base_dec(embeds=latents, cache=cache, positions=at, logits=False)
  return cache


@functools.partial(jax.jit, static_argnames=("graphdef", "cc"))
def _latents(graphdef, state, cc, params, cache):
  return latents_of(decoder(graphdef, state, cc, params), params["soft"], cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "offset"), donate_argnames=("cache",))
def _insert(graphdef, state, latents, cache, offset):
  return augment_with(nnx.merge(graphdef, state), latents, cache, offset)


@functools.partial(jax.jit, static_argnames=("graphdef", "cc"), donate_argnames=("cache",))
def _augment(graphdef, state, cc, params, cache):
  latents = latents_of(decoder(graphdef, state, cc, params), params["soft"], cache)
  return augment_with(nnx.merge(graphdef, state), latents, cache, cc.latent_offset)


def _check_use(base: Model, cop: Coprocessor, cache, extra: int = 0) -> None:
  check(cop.cc, base.cfg)
  if not isinstance(cache, KVCache):
    raise TypeError(f"the coprocessor takes a dense KVCache; got {type(cache).__name__}")
  need = int(np.max(np.asarray(cache.length))) + cop.n_latents + extra
  if need > cache.size:
    raise CoprocessorError(
      f"the cache has {cache.size} slots; augmenting its longest row "
      f"needs {need} ({cop.n_latents} latents)"
    )
  if need > base.cfg.max_position:
    raise CoprocessorError(
      f"augmenting reaches position {need}, past the model's context of {base.cfg.max_position}"
    )


def latents(base: Model, cop: Coprocessor, cache: KVCache) -> jax.Array:
  """The coprocessor's N latents [B, N, D] for the base's cache (jitted; the cache is kept),
  to `insert` now or later (the delayed setting)."""
  _check_use(base, cop, cache)
  return _latents(base.graphdef, base.state, cop.cc, cop.params, cache)


def insert(base: Model, cop: Coprocessor, latents: jax.Array, cache: KVCache) -> KVCache:
  """Appends latents [B, N, D] (of `cop`, e.g. read earlier by `latents`) to the base's cache
  in its next slots (jitted; donates `cache`)."""
  B, N, D = latents.shape
  if base.cfg.d_model != D or cache.batch != B:
    raise CoprocessorError(
      f"latents must be [B={cache.batch}, N, D={base.cfg.d_model}]; got {list(latents.shape)}"
    )
  if int(np.max(np.asarray(cache.length))) + N > min(cache.size, base.cfg.max_position):
    raise CoprocessorError(f"the cache has no room for {N} latents after its longest row")
  return _insert(base.graphdef, base.state, latents, cache, cop.cc.latent_offset)


def augment(base: Model, cop: Coprocessor, cache: KVCache) -> KVCache:
  """Augments the base's cache: appends the N latents the coprocessor computes from it
  (jitted; donates `cache`). Each row needs N free slots."""
  _check_use(base, cop, cache)
  return _augment(base.graphdef, base.state, cop.cc, cop.params, cache)


# --- files ------------------------------------------------------------------------------------


def _like(cc: CoprocessorConfig, base: Model) -> dict[str, Any]:
  """Zeros shaped like a coprocessor's trainable params for `base`."""
  zeros = lambda t: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), t)
  like = {"soft": jnp.zeros((cc.n_latents, base.cfg.d_model), base.dtype)}
  if cc.kind == "coprocessor":
    p = jax.eval_shape(base.params)
    if cc.init == "lora":
      like["lora"] = zeros(
        jax.eval_shape(lambda b: _lora_init(b, cc.lora_rank, jax.random.key(0)), p["blocks"])
      )
    else:
      like["blocks"] = zeros(p["blocks"])
    like["final_norm"] = zeros(p["final_norm"])
  return like


def save(cop: Coprocessor, path: str, *, dtype=None) -> None:
  """Writes coprocessor.json and params/ (orbax; cast to `dtype` when given, e.g. bfloat16
  to ship) into a new directory `path`."""
  COPROCESSORS.save(path, cop.cc.to_json(), cop.params, dtype=dtype)


def shipped() -> tuple[str, ...]:
  """Names of the coprocessors shipped with kvjax (`load(name, base)` loads one)."""
  return COPROCESSORS.shipped()


def resolve(path: str) -> str:
  """The directory of a coprocessor directory or shipped name (a directory wins)."""
  return COPROCESSORS.locate(path)[0]


def load(path: str, base: Model, *, allow_other_params: bool = False) -> Coprocessor:
  """Loads a coprocessor directory or shipped name for `base` (params in base's dtype); one
  made for another architecture raises CoprocessorError naming each mismatched field, and so
  does one trained with other params of the same architecture (its `base_fingerprint`),
  unless allow_other_params, which warns instead."""
  path = resolve(path)
  cc = COPROCESSORS.read_config(path, CoprocessorConfig.from_json)
  check(cc, base.cfg)
  COPROCESSORS.check_fingerprint(cc.base_fingerprint, base, path=path, allow=allow_other_params)
  cc = dataclasses.replace(cc, base=base.cfg)
  return Coprocessor(cc, COPROCESSORS.restore(path, _like(cc, base)), path)


def _check_prefill(model: Model, rows, max_new_tokens: int, cop: Coprocessor, delay) -> None:
  """Raises unless `augmented_prefill` can run: cop made for model, delay an int in
  [0, max_new_tokens), the longest row + N latents + max_new_tokens within the context."""
  check(cop.cc, model.cfg)
  if not isinstance(delay, (int, np.integer)) or isinstance(delay, bool) or delay < 0:
    raise ValueError(f"delay must be an int >= 0; got {delay!r}")
  if delay >= max_new_tokens:
    raise ValueError(
      f"delay {delay} >= max_new_tokens {max_new_tokens}: the latents would "
      "arrive after the last new token"
    )
  longest = max(map(len, rows))
  if longest + cop.n_latents + max_new_tokens > model.cfg.max_position:
    raise ValueError(
      f"prompt ({longest} tokens) + {cop.n_latents} latents + max_new_tokens "
      f"({max_new_tokens}) exceeds the model's context of "
      f"{model.cfg.max_position} positions"
    )


def augmented_prefill(
  model: Model,
  rows: list[list[int]],
  max_new_tokens: int,
  *,
  cop: Coprocessor,
  delay: int,
  sampling: Sampling,
  key: jax.Array,
):
  """(logits [B, V] of the next token after the latents, cache, early [B, delay] int32 (the
  tokens sampled before the latents arrived), prefill_s, compile_s) for prompts `rows`: the
  `kvjax.lm.generate.Prefill` of `Coprocessor.prefiller`.

  An augmentation point p sits before the prompt's last token x_p (so that every generated
  token follows the latents, as in training): the base prefills x_<p, the coprocessor reads
  that cache, and the latents go in at the next positions; x_p is fed after them and its
  logits give the first new token. With delay k (the asynchronous setting) the latents read
  from x_<p arrive k tokens late: x_p and the first k - 1 new tokens are fed before them, and
  the k-th new token, sampled from unaugmented logits, is fed right after them."""
  _check_prefill(model, rows, max_new_tokens, cop, delay)
  N = cop.n_latents
  longest = max(map(len, rows))
  B = len(rows)
  P = steps.bucket(longest)
  tokens = pad([ids[:-1] for ids in rows], P)
  last = jnp.asarray([[ids[-1]] for ids in rows], jnp.int32)
  one = jnp.ones((B,), jnp.int32)
  cache = new_cache(model, B, steps.bucket(longest + N + max_new_tokens))
  t0 = time.perf_counter()
  compile_s = 0.0

  def call(fn, *args, **static):
    nonlocal compile_s
    out, c = steps.call(model, fn, *args, **static)
    compile_s += c
    return out

  _, cache = call(
    steps.prefill, cache, jnp.asarray(tokens), jnp.asarray([len(r) - 1 for r in rows], jnp.int32)
  )
  if delay == 0:
    cache = augment(model, cop, cache)
    logits, cache = call(steps.extend, cache, last, one)
    jax.block_until_ready(logits)
    return (
      logits,
      cache,
      np.zeros((B, 0), np.int32),
      time.perf_counter() - t0 - compile_s,
      compile_s,
    )
  z = latents(model, cop, cache)  # read now, inserted `delay` tokens later
  logits, cache = call(steps.extend, cache, last, one)
  early = []
  for i in range(delay - 1):  # tokens sampled and fed before the latents arrive
    tok, bad, logits, cache = call(
      steps.sample_decode, cache, logits, key, jnp.int32(i), sampling=sampling
    )
    check_finite(model, bad, "the coprocessor's delayed prefill")
    early.append(tok)
  early.append(sample(logits, jax.random.fold_in(key, delay - 1), sampling))  # fed after them
  cache = insert(model, cop, z, cache)
  logits, cache = call(steps.decode_step, cache, early[-1])
  jax.block_until_ready(logits)
  return (
    logits,
    cache,
    np.stack([np.asarray(t) for t in early], 1).astype(np.int32),
    time.perf_counter() - t0 - compile_s,
    compile_s,
  )
