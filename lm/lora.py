"""LoRA adapters in PEFT's format: read, merged into a model's params, written.

    model = lm.load("smollm2-135m-instruct", adapter="path/to/adapter")  # merged on load
    adapter = lora.read("path/to/adapter")
    merged = lora.merge(base, adapter)          # a Model with W + (alpha / r) B A per module
    lora.write("out/adapter", adapter)

A PEFT adapter directory holds `adapter_config.json` (peft_type "LORA", r, lora_alpha,
target_modules, ...) and `adapter_model.safetensors`: for each adapted Linear `m` (a Hugging
Face module name such as `model.layers.3.self_attn.q_proj`) the tensors
`base_model.model.{m}.lora_A.weight` [r, in] and `base_model.model.{m}.lora_B.weight` [out, r],
whose merged weight is W + s B A in torch's [out, in] layout, s = alpha / r (alpha and r per
module when alpha_pattern / rank_pattern name it; r is the tensors' own rank); for an adapted
embedding `lora_embedding_A` [r, V] and `lora_embedding_B` [D, r], merged as W + s (B A)^T.
Variants that merge otherwise are refused by name (rsLoRA, DoRA, trained biases, fan_in_fan_out,
modules_to_save, layer replication).

Merging costs one matmul per adapted module once, at load; the merged model decodes exactly as
fast as its base (an unmerged adapter would add two thin matmuls per module and token).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from kvjax.lm import artifact, checkpoint
from kvjax.lm.hf_config import read_json

if TYPE_CHECKING:
  from kvjax.lm.model import Model

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix for a causal LM's module names
BASE = ".base_layer.weight"  # a base weight saved with the adapter (an adapted embedding's)
# adapter_config.json fields whose non-default value changes how the adapter merges
REFUSED = {
  "use_rslora": (False, "rsLoRA (scale alpha / sqrt(r))"),
  "use_dora": (False, "DoRA (weight-decomposed LoRA)"),
  "fan_in_fan_out": (False, "fan_in_fan_out (GPT-2 style Conv1D weights)"),
  "bias": ("none", "trained biases (bias other than 'none')"),
  "lora_bias": (False, "lora_bias"),
  "modules_to_save": (None, "modules_to_save (fully trained modules)"),
  "layer_replication": (None, "layer_replication"),
  "target_parameters": (None, "target_parameters (LoRA on raw parameters)"),
  "use_qalora": (False, "QA-LoRA"),
}


class LoraError(ValueError):
  """An adapter that cannot be read or does not fit the model it is merged into."""


# Fine-tunes shipped inside the package as adapters over a model `lm.load` takes by name (their
# adapter_config.json's base_model_name_or_path): `lm.load(name)` loads the base and merges.
ADAPTERS = artifact.Kind(
  noun="adapter",
  config=CONFIG,
  shipped_in=os.path.join(os.path.dirname(os.path.abspath(__file__)), "adapters"),
  error=LoraError,
  holds=f"{CONFIG} + {WEIGHTS}",
)


def shipped() -> tuple[str, ...]:
  """Names of the fine-tunes shipped as adapters (`lm.load(name)` loads one merged)."""
  return ADAPTERS.shipped()


def shipped_base(name: str) -> tuple[str, str]:
  """(adapter directory, base model name) of shipped fine-tune `name`."""
  path, _ = ADAPTERS.locate(name)
  base = read_json(os.path.join(path, CONFIG), required=True).get("base_model_name_or_path")
  if not isinstance(base, str) or not base:
    raise LoraError(f"{path}/{CONFIG}: a shipped adapter must name its base model")
  return path, base


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """The adapter_config.json fields kvjax uses. target_modules: a list of module-name suffixes,
  or a regular expression (PEFT's two forms); alpha_pattern: module-name pattern -> alpha."""

  r: int
  alpha: float
  target_modules: tuple[str, ...] | str
  alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
  base_model: str | None = None

  def to_json(self) -> dict[str, Any]:
    """adapter_config.json as PEFT writes it for a plain LoRA adapter of a causal LM."""
    targets = self.target_modules
    return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": self.base_model,
      "r": self.r,
      "lora_alpha": self.alpha,
      "target_modules": targets if isinstance(targets, str) else list(targets),
      "alpha_pattern": dict(self.alpha_pattern),
      "rank_pattern": {},
      "lora_dropout": 0.0,
      "bias": "none",
      "use_rslora": False,
      "use_dora": False,
      "fan_in_fan_out": False,
      "modules_to_save": None,
      "inference_mode": True,
    }


@dataclasses.dataclass(frozen=True)
class Adapter:
  """config, and per adapted module (Hugging Face name, no PEFT prefix) its (A, B) float32:
  A [r, in], B [out, r] for a Linear; A [r, V], B [D, r] for an embedding (`embeddings` names
  those). bases: a module's base weight that the adapter replaces (PEFT saves the embedding
  table beside an adapted embedding: `{module}.base_layer.weight`), in Hugging Face layout.
  path: where it was read from (for messages)."""

  config: LoraConfig
  weights: dict[str, tuple[np.ndarray, np.ndarray]]
  embeddings: frozenset[str] = frozenset()
  bases: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  path: str = "<adapter>"

  @property
  def n_params(self) -> int:
    """The adapter's parameter count (every A and B)."""
    return sum(a.size + b.size for a, b in self.weights.values())

  def scale(self, module: str) -> float:
    """alpha / r of `module`: alpha from the first alpha_pattern key matching the name (PEFT's
    rule: the key, after a dot or at the start, ends the name), r the tensors' rank."""
    alpha = self.config.alpha
    for key, value in self.config.alpha_pattern.items():
      if re.match(rf"(.*\.)?({key})$", module):
        alpha = value
        break
    return float(alpha) / self.weights[module][0].shape[0]

  def delta(self, module: str) -> np.ndarray:
    """The module's weight change s B A [out, in] (an embedding's s (B A)^T [V, D]), float32."""
    a, b = self.weights[module]
    d = (b @ a) * np.float32(self.scale(module))
    return d.T if module in self.embeddings else d


def read(path: str) -> Adapter:
  """Reads a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such adapter directory (expected {CONFIG} and {WEIGHTS})")
  raw = read_json(os.path.join(path, CONFIG), required=True)
  config = _config(raw, os.path.join(path, CONFIG))
  file = os.path.join(path, WEIGHTS)
  if not os.path.exists(file):
    other = [n for n in os.listdir(path) if n.startswith("adapter_model")]
    hint = f" (found {', '.join(other)}: only safetensors is read)" if other else ""
    raise LoraError(f"{path}: no {WEIGHTS}{hint}")
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  try:
    tensors = load_file(file)
  except (SafetensorError, OSError, ValueError) as err:
    raise LoraError(f"{file}: not a readable safetensors file ({err})") from None
  bases = {
    k.removeprefix(PREFIX).removesuffix(BASE): tensors.pop(k)
    for k in list(tensors)
    if k.endswith(BASE)
  }
  weights, embeddings = _pairs(tensors, file)
  stray = sorted(set(bases) - set(weights))
  if stray:
    raise LoraError(f"{file}: base weights of {stray} without their LoRA A and B")
  bases = {m: _checked(w, f"{PREFIX}{m}{BASE}", file) for m, w in bases.items()}
  return Adapter(config, weights, frozenset(embeddings), bases, path)


def _config(raw: dict[str, Any], source: str) -> LoraConfig:
  if raw.get("peft_type", "LORA") != "LORA":
    raise LoraError(f"{source}: peft_type {raw['peft_type']!r}; only LORA adapters are read")
  for field, (default, what) in REFUSED.items():
    value = raw.get(field)
    if value is not None and value != default and value not in (False, [], {}):
      raise LoraError(f"{source}: {what} is not supported ({field}={value!r})")
  r, alpha = raw.get("r"), raw.get("lora_alpha")
  if isinstance(r, bool) or not isinstance(r, int) or r < 1:
    raise LoraError(f"{source}: r must be an int >= 1; got {r!r}")
  if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
    raise LoraError(f"{source}: lora_alpha must be a number > 0; got {alpha!r}")
  targets = raw.get("target_modules")
  if not isinstance(targets, str | list) or not targets:
    raise LoraError(
      f"{source}: target_modules must be a module-name list or a regex; got {targets!r}"
    )
  pattern = raw.get("alpha_pattern") or {}
  if not isinstance(pattern, dict) or not all(
    isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in pattern.values()
  ):
    raise LoraError(
      f"{source}: alpha_pattern must map module patterns to numbers > 0; got {pattern!r}"
    )
  return LoraConfig(
    r=r,
    alpha=float(alpha),
    target_modules=targets if isinstance(targets, str) else tuple(targets),
    alpha_pattern=dict(pattern),
    base_model=raw.get("base_model_name_or_path"),
  )


_KEY = re.compile(
  r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.default)?(\.weight)?$"
)


def _checked(value: np.ndarray, key: str, file: str) -> np.ndarray:
  """value as float32, refused unless a finite 2-D float matrix."""
  if not np.issubdtype(value.dtype, np.floating) or value.ndim != 2:
    raise LoraError(
      f"{file}: tensor {key!r} must be a 2-D float matrix; got {value.dtype} {value.shape}"
    )
  if not np.all(np.isfinite(value)):
    raise LoraError(f"{file}: tensor {key!r} holds non-finite values (NaN or Inf)")
  return value.astype(np.float32)


def _pairs(tensors: dict[str, np.ndarray], file: str):
  """(module -> (A, B) float32, the embedding modules) from the file's tensors."""
  parts: dict[str, dict[str, np.ndarray]] = {}
  for key, value in tensors.items():
    m = _KEY.match(key)
    if m is None:
      raise LoraError(
        f"{file}: tensor {key!r} is not a LoRA A or B matrix (expected names "
        f"like {PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight)"
      )
    parts.setdefault(m["module"].removeprefix(PREFIX), {})[m["kind"]] = _checked(value, key, file)
  weights, embeddings = {}, []
  for module, got in parts.items():
    embedding = "lora_embedding_A" in got or "lora_embedding_B" in got
    a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    if set(got) != {a_name, b_name}:
      raise LoraError(
        f"{file}: module {module!r} has {sorted(got)}; expected both {a_name} and {b_name}"
      )
    a, b = got[a_name], got[b_name]
    if a.shape[0] != b.shape[1]:
      raise LoraError(
        f"{file}: module {module!r}: {a_name} {a.shape} and {b_name} {b.shape} disagree on the rank"
      )
    weights[module] = (a, b)
    if embedding:
      embeddings.append(module)
  if not weights:
    raise LoraError(f"{file}: holds no LoRA tensors")
  return weights, embeddings


def merge(model: Model, adapter: Adapter) -> Model:
  """The model with every adapted weight W replaced by W + delta (computed and added in float32,
  stored in the params' dtype). Refuses a module the model lacks or whose shape differs, an
  adapted output head on a model that ties it to the embedding table, and an adapted
  embedding table that the model ties or scales (PEFT adds its change after either)."""
  cfg = model.cfg
  params = model.params()
  host: dict[tuple[str, ...], np.ndarray] = {}  # each changed param, copied once
  for module in sorted(adapter.weights):
    name = module + ".weight"
    where = checkpoint.locate(cfg, name)
    if module == "lm_head" and cfg.tie_embeddings:
      raise LoraError(
        f"{adapter.path}: adapts lm_head, which this model ties to its embedding "
        "table (merging would change the embeddings too)"
      )
    if module in adapter.embeddings and (cfg.tie_embeddings or cfg.scale_embeddings):
      why = "ties its output head to" if cfg.tie_embeddings else "scales the rows of"
      raise LoraError(
        f"{adapter.path}: adapts {module!r}, and this model {why} its embedding table: PEFT "
        "adds the change after that, so no merged weight reproduces it; not supported"
      )
    if where is None:
      raise LoraError(
        f"{adapter.path}: adapts {module!r}, which this {cfg.family} model does not "
        f"have (its weights are named like model.layers.0.self_attn.q_proj)"
      )
    delta = adapter.delta(module)
    if delta.shape != tuple(where.shape):
      raise LoraError(
        f"{adapter.path}: {module!r}'s B A is {delta.shape}; the model's weight is "
        f"{tuple(where.shape)} (an adapter for another model?)"
      )
    base = adapter.bases.get(module)
    if base is not None and base.shape != delta.shape:
      raise LoraError(
        f"{adapter.path}: {module!r}'s saved base weight is {base.shape}; the model's is "
        f"{delta.shape}"
      )
    parts = zip(where.paths, _split(where, delta), _split(where, base), strict=True)
    for path, d, b in parts:
      if path not in host:
        node = params
        for key in path:
          node = node[key]
        host[path] = np.array(node, dtype=np.float32)
      target = host[path] if where.index is None else host[path][where.index]
      if b is not None:
        target[...] = b
      target += d
  for path, value in host.items():
    node = params
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value.astype(node[path[-1]].dtype)
  return model.with_params(params)


def _split(where: checkpoint.Located, w: np.ndarray | None) -> tuple:
  """w (Hugging Face layout) in kvjax's, one array per path (Nones for no w)."""
  if w is None:
    return (None,) * len(where.paths)
  ours = where.to_ours(w)
  return tuple(np.asarray(o, np.float32) for o in (ours if len(where.paths) > 1 else (ours,)))


def write(path: str, adapter: Adapter) -> None:
  """Writes `adapter` as a PEFT directory (adapter_config.json, adapter_model.safetensors,
  float32 tensors) that PEFT's `PeftModel.from_pretrained` and `read` load."""
  from safetensors.numpy import save_file

  os.makedirs(path, exist_ok=True)
  tensors = {}
  for module, (a, b) in adapter.weights.items():
    kind = "lora_embedding_{}" if module in adapter.embeddings else "lora_{}.weight"
    tensors[f"{PREFIX}{module}.{kind.format('A')}"] = np.ascontiguousarray(a, np.float32)
    tensors[f"{PREFIX}{module}.{kind.format('B')}"] = np.ascontiguousarray(b, np.float32)
  for module, w in adapter.bases.items():
    tensors[f"{PREFIX}{module}{BASE}"] = np.ascontiguousarray(w, np.float32)
  save_file(tensors, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(path, CONFIG), "w") as f:
    json.dump(adapter.config.to_json(), f, indent=2)
