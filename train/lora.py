"""LoRA fine-tuning: low-rank factors trained over a frozen base, written as a PEFT adapter.

    places = targets(model.cfg, ("q_proj", "v_proj"))  # where each adapted Linear lives
    factors = init(places, rank=8, seed=0)    # {name: {"A": [n, r, in], "B": [n, out, r]}}
    params = merged(base_params, places, factors, scale)  # traced: W + scale * B A
    adapter = to_adapter(places, factors, rank=8, alpha=16.0, base="smollm2-135m-instruct")

Factors live in torch's layout (A [r, in], B [out, r] per layer, stacked on a leading axis over
the n layers that have the module), so an adapter is written as trained and PEFT reads it. A
starts uniform in +-1/sqrt(in) and B at zero (PEFT's default), so step 0 is the base model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.lm import checkpoint, lora
from kvjax.lm.config import Config
from kvjax.train.errors import TrainError

# the Linear layers of a decoder layer that LoRA adapts by default: every attention and MLP
# projection, by PEFT's names (Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj;
# the names a family lacks are passed over)
TARGETS = (
  "q_proj",
  "k_proj",
  "v_proj",
  "qkv_proj",
  "o_proj",
  "gate_proj",
  "up_proj",
  "gate_up_proj",
  "down_proj",
)
PARENTS = ("self_attn", "mlp")  # where a layer's Linears sit in Hugging Face module names


@dataclasses.dataclass(frozen=True)
class Place:
  """One adapted Linear across layers: its Hugging Face module name with `{i}` for the layer,
  the layers that have it, where each layer's weight lives in kvjax params (`paths` and the
  stacked `indices`, one per layer), its torch shape (out, in) and the layout map."""

  name: str
  template: str
  layers: tuple[int, ...]
  paths: tuple[tuple[str, ...], ...]
  indices: tuple[int, ...]
  shape: tuple[int, int]
  to_ours: Callable


def targets(cfg: Config, names: Sequence[str] = TARGETS) -> list[Place]:
  """The places of the Linears `names` (e.g. "q_proj") in every layer of a cfg model. A name no
  layer has is a TrainError listing the ones it has (with the default TARGETS, the names of
  other families, e.g. Phi-3's fused ones, are passed over)."""
  found = {}
  for name in dict.fromkeys(names):
    for parent in PARENTS:
      template = f"model.layers.{{i}}.{parent}.{name}"
      layers = [
        (l, where)
        for l in range(cfg.n_layers)
        if (where := checkpoint.locate(cfg, template.format(i=l) + ".weight")) is not None
      ]
      if layers:
        where = layers[0][1]
        found[name] = Place(
          name=name,
          template=template,
          layers=tuple(l for l, _ in layers),
          paths=tuple(where.paths),
          indices=tuple(w.index for _, w in layers),
          shape=tuple(where.shape),
          to_ours=where.to_ours,
        )
  missing = [n for n in names if n not in found]
  if missing and tuple(names) != TARGETS:
    have = [p.name for p in targets(cfg)]  # the default names: none is missing, by rule
    raise TrainError(
      f"LoRA targets {missing} are not Linear layers of this {cfg.family} model; it has "
      f"{', '.join(have)}"
    )
  if not found:
    raise TrainError(f"no LoRA target of {list(names)} is a Linear layer of this model")
  return list(found.values())


def init(places: Sequence[Place], rank: int, seed: int = 0) -> dict[str, dict[str, jax.Array]]:
  """Fresh factors, float32: A [n, r, in] uniform in +-1/sqrt(in), B [n, out, r] zeros."""
  keys = jax.random.split(jax.random.key(seed), len(places))
  factors = {}
  for key, p in zip(keys, places, strict=True):
    n, (out, inp) = len(p.layers), p.shape
    bound = 1.0 / np.sqrt(inp)
    factors[p.name] = {
      "A": jax.random.uniform(key, (n, rank, inp), jnp.float32, -bound, bound),
      "B": jnp.zeros((n, out, rank), jnp.float32),
    }
  return factors


def merged(params: dict, places: Sequence[Place], factors: dict, scale: float) -> dict:
  """params (a pure dict, not modified) with W + scale * B A added at every adapted place
  (traceable: the training forward differentiates through it)."""
  out = _copy(params)
  for p in places:
    f = factors[p.name]
    delta = jnp.einsum("nor,nri->noi", f["B"], f["A"]) * scale  # [n, out, in]
    ours = jax.vmap(p.to_ours)(delta)
    ours = ours if len(p.paths) > 1 else (ours,)
    for path, d in zip(p.paths, ours, strict=True):
      node = out
      for key in path[:-1]:
        node = node[key]
      w = node[path[-1]]
      node[path[-1]] = w.at[np.asarray(p.indices)].add(d.astype(w.dtype))
  return out


def _copy(tree: dict) -> dict:
  return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def to_adapter(
  places: Sequence[Place], factors: dict, *, rank: int, alpha: float, base: str | None
) -> lora.Adapter:
  """The trained factors as a `lora.Adapter` (one A, B pair per layer and module)."""
  weights = {}
  for p in places:
    a, b = (np.asarray(factors[p.name][k], np.float32) for k in ("A", "B"))
    for j, layer in enumerate(p.layers):
      weights[p.template.format(i=layer)] = (a[j], b[j])
  config = lora.LoraConfig(
    r=rank, alpha=float(alpha), target_modules=tuple(p.name for p in places), base_model=base
  )
  return lora.Adapter(config, weights)
