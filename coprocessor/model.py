"""The cache coprocessor: reads a frozen model's KV cache, writes latent embeddings into it.

The coprocessor has the frozen base model's architecture (its decoder starts as a copy of the
base's params, or from scratch) and N trainable soft-token embeddings. Given the base's cache
of a prefix, it runs the N soft tokens as input embeddings at positions length .. length + N - 1
with its layer i attending to the base's layer-i K/V of the prefix and to the soft tokens' own
K/V; its final-normed hidden states there are the N latents. `augment` then runs the frozen
base over the latents as input embeddings at the same positions, which appends their K/V to
the base's cache; decoding continues from it as usual.

    cop = coprocessor.init(base, n_latents=16)           # copy of base + 16 soft tokens
    cache = coprocessor.augment(base, cop, cache)        # cache.length grows by 16

A coprocessor directory holds `coprocessor.json` (CoprocessorConfig, with the base's
architecture) and `params/` (orbax: {"decoder": ..., "soft": [N, D]}).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.cache.dense import KVCache
from kvjax.lm import config
from kvjax.lm.checkpoint import CheckpointError, restore_params, save_params
from kvjax.lm.config import Config
from kvjax.lm.model import Model

INITS = ("copy", "scratch")
CONFIG_FILE = "coprocessor.json"


class CoprocessorError(ValueError):
  """A coprocessor that does not fit its base model, bad settings, or an unreadable directory."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CoprocessorConfig:
  """n_latents: N soft tokens / latents per augmentation. base: the frozen model's
  architecture. init: how the decoder started ("copy" of the base's params or "scratch").
  base_name: where the base came from (informational)."""

  n_latents: int
  base: Config
  init: str = "copy"
  base_name: str = ""

  def __post_init__(self):
    n = self.n_latents
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise CoprocessorError(f"n_latents must be an int >= 1; got {n!r}")
    if self.init not in INITS:
      raise CoprocessorError(f"init must be one of {INITS}; got {self.init!r}")

  def to_json(self) -> dict[str, Any]:
    return {"n_latents": int(self.n_latents), "init": self.init, "base_name": self.base_name,
            "base": config.to_dict(self.base)}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> CoprocessorConfig:
    return cls(n_latents=d["n_latents"], init=d.get("init", "copy"),
               base=config.from_dict(d["base"]), base_name=d.get("base_name", ""))


@dataclasses.dataclass(frozen=True)
class Coprocessor:
  """cc: its config; decoder: a kvjax Model of the base's architecture (its params are the
  coprocessor's, tokenizer-less); soft: [N, D] the soft-token embeddings."""

  cc: CoprocessorConfig
  decoder: Model
  soft: jax.Array
  path: str | None = None

  def params(self) -> dict[str, Any]:
    return {"decoder": self.decoder.params(), "soft": self.soft}

  def with_params(self, params: dict[str, Any]) -> Coprocessor:
    return dataclasses.replace(self, decoder=self.decoder.with_params(params["decoder"]),
                               soft=params["soft"])


def check(cc: CoprocessorConfig, base: Config) -> None:
  """Raises CoprocessorError unless the coprocessor was made for this base architecture."""
  diff = config.diff(cc.base, base)
  if diff:
    name = f" {cc.base_name!r}" if cc.base_name else ""
    raise CoprocessorError(f"this coprocessor was made for another base model{name}: "
                           + ", ".join(diff))


def init(base: Model, n_latents: int, *, init: str = "copy", seed: int = 0) -> Coprocessor:
  """A new coprocessor for `base`: its decoder a copy of base's params ("copy") or freshly
  initialised ("scratch"); soft tokens drawn like embeddings (std 0.02)."""
  from kvjax.lm.model import init as init_model
  cc = CoprocessorConfig(n_latents=n_latents, base=base.cfg, init=init,
                         base_name=os.path.basename(base.path or ""))
  if init == "copy":
    decoder = base.with_params(jax.tree.map(jnp.array, base.params()))
  else:
    decoder = init_model(base.cfg, seed=seed + 1, dtype=base.dtype)
  decoder = dataclasses.replace(decoder, tokenizer=None, path=None, compiled={})
  soft = 0.02 * jax.random.normal(jax.random.key(seed), (n_latents, base.cfg.d_model))
  return Coprocessor(cc, decoder, soft.astype(base.dtype))


def latents_of(cop_dec, soft: jax.Array, cache: KVCache) -> jax.Array:
  """soft [N, D] read through `cop_dec` (a Decoder) over the base's cache -> latents [B, N,
  D]: the soft tokens at positions cache.length + arange(N) attend to the cache's filled
  slots (layer i to layer i) and causally to each other. The cache is not changed."""
  B, N = cache.batch, soft.shape[0]
  embeds = jnp.broadcast_to(soft[None].astype(cop_dec.dtype), (B, N, soft.shape[-1]))
  out, _ = cop_dec(embeds=embeds, cache=cache, logits=False)
  return out.hidden


def augment_with(base_dec, latents: jax.Array, cache: KVCache) -> KVCache:
  """The base run over latents [B, N, D] as input embeddings after the cache -> the cache
  with their K/V appended (length + N)."""
  _, cache = base_dec(embeds=latents, cache=cache, logits=False)
  return cache


@functools.partial(jax.jit, static_argnames=("graphdef", "cop_graphdef"),
                   donate_argnames=("cache",))
def _augment(graphdef, state, cop_graphdef, cop_state, soft, cache):
  latents = latents_of(nnx.merge(cop_graphdef, cop_state), soft, cache)
  return augment_with(nnx.merge(graphdef, state), latents, cache)


def augment(base: Model, cop: Coprocessor, cache: KVCache) -> KVCache:
  """Augments the base's cache: appends the N latents the coprocessor computes from it
  (jitted; donates `cache`). Each row needs N free slots."""
  check(cop.cc, base.cfg)
  if not isinstance(cache, KVCache):
    raise TypeError(f"augment takes a dense KVCache; got {type(cache).__name__}")
  need = int(np.max(np.asarray(cache.length))) + cop.cc.n_latents
  if need > cache.size:
    raise CoprocessorError(f"the cache has {cache.size} slots; augmenting its longest row "
                           f"needs {need} ({cop.cc.n_latents} latents)")
  if need > base.cfg.max_position:
    raise CoprocessorError(f"augmenting reaches position {need}, past the model's context of "
                           f"{base.cfg.max_position}")
  return _augment(base.graphdef, base.state, cop.decoder.graphdef, cop.decoder.state,
                  cop.soft, cache)


# --- files ------------------------------------------------------------------------------------

def save(cop: Coprocessor, path: str) -> None:
  """Writes coprocessor.json and params/ (orbax) into a new directory `path`."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(cop.cc.to_json(), f, indent=2)
  save_params(os.path.join(path, "params"), jax.device_get(cop.params()))


def load(path: str, base: Model) -> Coprocessor:
  """Loads a coprocessor directory for `base`; one made for another architecture raises
  CoprocessorError naming each mismatched field."""
  path = os.fspath(path)
  file = os.path.join(path, CONFIG_FILE)
  d = config.read_json(file, required=True, error=CoprocessorError)
  try:
    cc = CoprocessorConfig.from_json(d)
  except (KeyError, TypeError) as err:
    raise CoprocessorError(f"{file}: not a coprocessor config ({type(err).__name__}: {err})"
                           ) from None
  check(cc, base.cfg)
  cc = dataclasses.replace(cc, base=base.cfg)
  like = {"decoder": base.params(),
          "soft": jnp.zeros((cc.n_latents, base.cfg.d_model), base.dtype)}
  try:
    params = restore_params(os.path.join(path, "params"), like)
  except CheckpointError as err:
    raise CoprocessorError(str(err)) from None
  decoder = dataclasses.replace(base, tokenizer=None, path=None, compiled={})
  return Coprocessor(cc, decoder.with_params(params["decoder"]), params["soft"], path)
