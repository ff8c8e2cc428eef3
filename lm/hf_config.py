"""A Hugging Face config.json dict <-> Config (transformers 4.x and 5.x layouts), and the JSON
object files that kvjax reads (config.json, generation_config.json, head.json, ...).

`from_hf` reads a config.json as transformers does: an absent or null key takes transformers'
default for the family; a present value is never replaced, so Config's own checks see it and
the error names the config.json key (`HF_KEYS`) and the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from typing import Any

from kvjax.lm.config import FAMILIES, ROPE_TYPES, Config, ConfigError, is_int, is_positive

ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "mistral": "MistralForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
  "gemma": "GemmaForCausalLM",
  "gemma2": "Gemma2ForCausalLM",
  "gemma3_text": "Gemma3ForCausalLM",
  "phi3": "Phi3ForCausalLM",
  "mixtral": "MixtralForCausalLM",
  "qwen3_moe": "Qwen3MoeForCausalLM",
}
LAYER_TYPES = ("sliding_attention", "full_attention")
QK_NORM_FAMILIES = ("qwen3", "gemma3_text", "qwen3_moe")  # every layer has q/k norms
# transformers' defaults where a config.json omits the key
MAX_POSITION = {
  "llama": 2048,
  "mistral": 131072,
  "qwen2": 32768,
  "qwen3": 32768,
  "gemma": 8192,
  "gemma2": 8192,
  "gemma3_text": 131072,
  "phi3": 4096,
  "mixtral": 131072,
  "qwen3_moe": 32768,
}
ACTIVATIONS = {
  "silu": "silu",
  "swish": "silu",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu_new": "gelu_tanh",
  "gelu": "gelu",
}
# Config field -> the Hugging Face config.json key it is read from (for error messages).
HF_KEYS = {
  "vocab_size": "vocab_size",
  "d_model": "hidden_size",
  "n_layers": "num_hidden_layers",
  "n_heads": "num_attention_heads",
  "n_kv_heads": "num_key_value_heads",
  "head_dim": "head_dim",
  "ffn_dim": "intermediate_size",
  "norm_eps": "rms_norm_eps",
  "max_position": "max_position_embeddings",
  "rope_theta": "rope_theta",
  "rope_factor": "rope_scaling.factor",
  "rope_low_freq_factor": "rope_scaling.low_freq_factor",
  "rope_high_freq_factor": "rope_scaling.high_freq_factor",
  "rope_original_max_position": "rope_scaling.original_max_position_embeddings",
  "rope_short_factor": "rope_scaling.short_factor",
  "rope_long_factor": "rope_scaling.long_factor",
  "rope_attention_factor": "rope_scaling.attention_factor",
  "query_pre_attn_scalar": "query_pre_attn_scalar",
  "attn_softcap": "attn_logit_softcapping",
  "final_softcap": "final_logit_softcapping",
  "rope_local_theta": "rope_local_base_freq",
  "windows": "sliding_window",
  "n_experts": "num_local_experts",
  "n_experts_per_tok": "num_experts_per_tok",
  "moe_ffn_dim": "moe_intermediate_size",
  "dense_layers": "mlp_only_layers",
}


def read_json(file: str, *, required: bool, error: type[Exception] | None = None) -> dict | None:
  """The JSON object in `file`; None when it is absent and not required. Problems raise
  `error` (default ConfigError) naming the file."""
  error = error or ConfigError
  if not os.path.exists(file):
    if required:
      raise error(f"{os.path.dirname(file) or '.'}: no {os.path.basename(file)}")
    return None
  try:
    with open(file) as f:
      data = json.load(f)
  except json.JSONDecodeError as err:
    raise error(f"{file}: invalid JSON ({err})") from None
  if not isinstance(data, dict):
    raise error(f"{file}: expected a JSON object; got {type(data).__name__}")
  return data


# ---------------------------------------------------------------------------------------------
# config.json -> Config


def from_hf(hf: dict[str, Any], source: str = "config.json") -> Config:
  """Maps a Hugging Face `config.json` dict (transformers 4.x or 5.x layout) to a Config."""
  j = _ConfigJson.of(hf, source)
  sizes = _sizes(j)
  rope = _rope(j)
  act = _activation(j)
  windows = _windows(j, sizes["n_layers"])
  _check_causal(j)
  family = _family_fields(j)
  try:
    return Config(
      family=j.family,
      **sizes,
      act=act,
      **rope,
      **family,
      windows=windows,
      **_experts(j, sizes["n_layers"]),
    )
  except ConfigError as err:  # a value outside its domain: name the config.json key
    keys = dict(HF_KEYS)
    if "num_local_experts" not in j.hf and "num_experts" in j.hf:  # Qwen3-MoE's own name
      keys["n_experts"] = "num_experts"
    names = "|".join(sorted(keys, key=len, reverse=True))
    msg = re.sub(rf"\b({names})\b", lambda m: keys[m.group(1)], str(err))
    raise ConfigError(f"{source}: {msg}", field=err.field) from None


def _num(v):
  """Real numbers as float (ints in JSON); anything else unchanged, for Config to refuse."""
  return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v


@dataclasses.dataclass(frozen=True)
class _ConfigJson:
  """A config.json dict of a supported `family`, read key by key; errors name `source`."""

  hf: dict[str, Any]
  source: str
  family: str

  @classmethod
  def of(cls, hf: dict[str, Any], source: str) -> _ConfigJson:
    if not isinstance(hf, dict):
      raise ConfigError(f"{source}: expected a JSON object; got {type(hf).__name__}")
    family = hf.get("model_type")
    if family not in FAMILIES:
      raise ConfigError(
        f"{source}: model_type {family!r} is not supported; expected one of {FAMILIES}"
      )
    return cls(hf, source, family)

  def error(self, message: str, *, field: str | None = None) -> ConfigError:
    return ConfigError(f"{self.source}: {message}", field=field)

  def need(self, key: str) -> int:
    """A required size: present, an int >= 1."""
    if key not in self.hf:
      raise self.error(f"missing required field {key!r} for model_type {self.family!r}")
    v = self.hf[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise self.error(f"{key} must be an int >= 1; got {v!r}")
    return v

  def opt(self, key: str, default, table: dict | None = None):
    """table[key] (default: the config.json), or default when the key is absent or null (as
    transformers reads it); a present value is never replaced, so Config's checks see it."""
    v = (self.hf if table is None else table).get(key)
    return default if v is None else v

  def typed(self, key: str, kind: type, expected: str, default=None):
    """opt(key, default), refusing a present value that is not of `kind`."""
    v = self.hf.get(key)
    if v is not None and not isinstance(v, kind):
      raise self.error(f"{key} must be {expected}; got {v!r}")
    return self.opt(key, default)

  def flag(self, key: str, default: bool = False) -> bool:
    return self.typed(key, bool, "true or false", default)


def _sizes(j: _ConfigJson) -> dict[str, Any]:
  """vocab_size, d_model, n_layers, the heads and ffn_dim; head_dim defaults to D / N."""
  D, N = j.need("hidden_size"), j.need("num_attention_heads")
  L = j.need("num_hidden_layers")
  V, F = j.need("vocab_size"), j.need("intermediate_size")
  if j.hf.get("head_dim") is None and D % N:
    raise j.error(
      f"hidden_size {D} is not a multiple of num_attention_heads {N} and there is no head_dim"
    )
  return dict(
    vocab_size=V,
    d_model=D,
    n_layers=L,
    n_heads=N,
    n_kv_heads=j.opt("num_key_value_heads", N),
    head_dim=j.opt("head_dim", D // N),
    ffn_dim=F,
  )


def _rope(j: _ConfigJson) -> dict[str, Any]:
  """max_position and every rope_* field. longrope caps max_position at the pretraining length
  (the short-factor regime: see Config) and folds its factor into the attention factor."""
  rope, local_rope = _rope_tables(j.hf, j.family, j.source)
  rope_type = _rope_type(j, rope)
  for table, where in ((rope, "rope_scaling."), (j.hf, "")):
    if j.opt("partial_rotary_factor", 1.0, table) != 1.0:
      raise j.error(
        f"{where}partial_rotary_factor {table['partial_rotary_factor']!r} is not supported "
        "(only 1.0: RoPE over the whole head)"
      )
  max_position = j.opt("max_position_embeddings", MAX_POSITION[j.family])
  fields = dict(rope_original_max_position=j.opt("original_max_position_embeddings", 8192, rope))
  if rope_type == "longrope":
    fields.update(_longrope(j.hf, rope, max_position, j.source))
    if is_int(max_position):
      max_position = min(max_position, fields["rope_original_max_position"])
  gemma3 = j.family == "gemma3_text"
  global_theta = 1e6 if gemma3 or j.family == "mixtral" else 10000.0
  return dict(
    max_position=max_position,
    # 5.x (rope_parameters), else 4.x (top level); Gemma 3's and Mixtral's default is 1e6
    rope_theta=_num(j.opt("rope_theta", j.opt("rope_theta", global_theta), rope)),
    rope_type=rope_type,
    rope_factor=1.0 if rope_type == "longrope" else _num(j.opt("factor", 1.0, rope)),
    rope_low_freq_factor=_num(j.opt("low_freq_factor", 1.0, rope)),
    rope_high_freq_factor=_num(j.opt("high_freq_factor", 4.0, rope)),
    rope_local_theta=(
      _num(j.opt("rope_theta", j.opt("rope_local_base_freq", 10000.0), local_rope))
      if gemma3
      else None
    ),
    **fields,
  )


def _rope_type(j: _ConfigJson, rope: dict) -> str:
  """The global layers' rope type: one of ROPE_TYPES that the family has."""
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if j.family == "phi3" and rope_type in ("su", "yarn"):  # Phi3Config reads both as longrope
    rope_type = "longrope"
  if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
    raise j.error(f"rope type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
  if (j.family == "phi3") != (rope_type == "longrope") and rope_type != "default":
    raise j.error(
      f"rope type {rope_type!r} is not supported for model_type "
      f"{j.family!r}" + (" (phi3: default or longrope)" if j.family == "phi3" else "")
    )
  return rope_type


def _rope_tables(hf: dict[str, Any], family: str, source: str) -> tuple[dict, dict]:
  """(global, local) RoPE parameter tables of a config.json: transformers 5.x
  `rope_parameters` (flat, or per layer type for gemma3_text: {"full_attention": {...},
  "sliding_attention": {...}}) updated by 4.x `rope_scaling`, which like transformers applies to
  the global layers. The local table is empty unless given per layer type; it may only set
  rope_theta (Gemma 3's local layers use plain RoPE)."""
  tables = {}
  for key in ("rope_parameters", "rope_scaling"):
    v = hf.get(key)
    if v is not None and not isinstance(v, dict):
      raise ConfigError(f"{source}: {key} must be an object or null; got {v!r}")
    tables[key] = dict(v or {})
  rope, local = tables["rope_parameters"], {}
  if set(rope) & set(LAYER_TYPES):
    rope, local = _per_layer_type_rope(rope, family, source)
  rope.update(tables["rope_scaling"])  # transformers 4.x
  return rope, local


def _per_layer_type_rope(rope: dict, family: str, source: str) -> tuple[dict, dict]:
  """(global, local) tables of a gemma3_text `rope_parameters` given per layer type."""
  if family != "gemma3_text":
    raise ConfigError(
      f"{source}: per-layer-type rope_parameters are only read for "
      f"gemma3_text; model_type {family!r} takes one flat object"
    )
  odd = sorted(set(rope) - set(LAYER_TYPES))
  if odd:
    raise ConfigError(f"{source}: rope_parameters has both per-layer-type entries and {odd[0]!r}")
  for t in LAYER_TYPES:
    if rope.get(t) is not None and not isinstance(rope[t], dict):
      raise ConfigError(f"{source}: rope_parameters.{t} must be an object or null; got {rope[t]!r}")
  full, local = dict(rope.get("full_attention") or {}), dict(rope.get("sliding_attention") or {})
  local_type = local.get("rope_type", local.get("type", "default"))
  if local_type != "default":
    raise ConfigError(
      f"{source}: rope_parameters.sliding_attention.rope_type {local_type!r} is "
      "not supported; Gemma 3's local layers use 'default'"
    )
  return full, local


def _longrope(hf: dict, rope: dict, max_position, source: str) -> dict[str, Any]:
  """Config fields of Phi-3's longrope scaling, as transformers derives them: the pretraining
  length from the top-level original_max_position_embeddings (4096 when absent, whatever
  rope_scaling says), the attention factor given, or from `factor` (default max_position /
  that length): sqrt(1 + ln(factor) / ln(length)) when factor > 1, else 1."""
  original = hf.get("original_max_position_embeddings")
  original = 4096 if original is None else original
  if not is_int(original) or original < 1:
    raise ConfigError(
      f"{source}: original_max_position_embeddings must be an int >= 1; got {original!r}",
      field="rope_original_max_position",
    )
  factors = {}
  for key in ("short_factor", "long_factor"):
    v = rope.get(key)
    if not isinstance(v, list):
      raise ConfigError(
        f"{source}: rope_scaling.{key} must be a list of numbers for longrope; got {v!r}",
        field=f"rope_{key}",
      )
    factors[f"rope_{key}"] = tuple(float(x) if is_positive(x) else x for x in v)
  attention = rope.get("attention_factor")
  if attention is None:
    attention = _longrope_attention(rope.get("factor"), max_position, original, source)
  elif isinstance(attention, numbers.Real) and not isinstance(attention, bool):
    attention = float(attention)
  return dict(rope_original_max_position=original, rope_attention_factor=attention, **factors)


def _longrope_attention(factor, max_position, original: int, source: str) -> float:
  """longrope's attention factor derived from its scaling `factor` (see `_longrope`)."""
  if factor is None:  # a bad max_position_embeddings is Config's to name
    factor = max_position / original if is_int(max_position) and max_position > 0 else 1.0
  if not is_positive(factor):
    raise ConfigError(
      f"{source}: rope_scaling.factor must be a finite number > 0; got {factor!r}",
      field="rope_attention_factor",
    )
  if factor <= 1.0:
    return 1.0
  if original == 1:
    raise ConfigError(
      f"{source}: original_max_position_embeddings 1 cannot derive "
      "longrope's attention factor (ln 1 = 0); give "
      "rope_scaling.attention_factor",
      field="rope_attention_factor",
    )
  return math.sqrt(1 + math.log(factor) / math.log(original))


def _activation(j: _ConfigJson) -> str:
  """Config's act from hidden_activation (Gemma), else hidden_act, else the family's default."""
  act_name = (
    j.typed("hidden_activation", str, "a string or null")
    or j.typed("hidden_act", str, "a string or null")
    or ("gelu_pytorch_tanh" if j.family.startswith("gemma") else "silu")
  )
  if act_name not in ACTIVATIONS:
    raise j.error(
      f"activation {act_name!r} is not supported; expected one of {sorted(ACTIVATIONS)}"
    )
  return ACTIVATIONS[act_name]


def _windows(j: _ConfigJson, n_layers: int) -> tuple[int, ...]:
  """Each layer's sliding window (0: global attention): sliding_window on the layers that
  slide, by layer_types or the family's default pattern."""
  window = j.opt("sliding_window", 0)
  if not is_int(window) or window < 0:
    raise j.error(
      f"sliding_window must be an int >= 0 (0 or null: none); got {window!r}", field="windows"
    )
  layer_types = j.typed("layer_types", list, "a list of layer types or null")
  if j.family in ("qwen2", "qwen3", "qwen3_moe") and not j.flag("use_sliding_window"):
    window = 0
  sliding = _sliding_layers(j, layer_types, n_layers)
  if j.family == "gemma3_text" and window == 0 and any(sliding):
    raise j.error(
      "sliding_window must be an int >= 1 for a gemma3_text model "
      "with sliding_attention layers; got null or 0",
      field="windows",
    )
  return tuple(window if s else 0 for s in sliding)


def _sliding_layers(j: _ConfigJson, layer_types: list | None, n_layers: int) -> list[bool]:
  """Which layers slide: layer_types when given, else transformers' pattern for the family
  (Qwen3-MoE: every layer, whatever layer_types says)."""
  L = n_layers
  if layer_types is not None and j.family != "qwen3_moe":
    if len(layer_types) != L:
      raise j.error(f"layer_types has {len(layer_types)} entries for {L} layers")
    odd = [t for t in layer_types if t not in LAYER_TYPES]
    if odd:
      raise j.error(
        f"layer_types entries must be 'sliding_attention' or 'full_attention'; got {odd[0]!r}"
      )
    return [t == "sliding_attention" for t in layer_types]
  if j.family == "gemma2":
    return [i % 2 == 0 for i in range(L)]
  if j.family == "gemma3_text":  # every sliding_window_pattern-th layer is global
    pattern = j.opt("sliding_window_pattern", 6)
    if not is_int(pattern) or pattern < 1:
      raise j.error(f"sliding_window_pattern must be an int >= 1; got {pattern!r}")
    return [(i + 1) % pattern != 0 for i in range(L)]
  if j.family in ("qwen2", "qwen3"):  # layers from max_window_layers on slide
    first = j.opt("max_window_layers", 28)
    if not is_int(first) or first < 0:
      raise j.error(f"max_window_layers must be an int >= 0; got {first!r}")
    return [i >= first for i in range(L)]
  return [True] * L


def _check_causal(j: _ConfigJson) -> None:
  if j.family == "gemma3_text" and j.flag("use_bidirectional_attention"):
    raise j.error(
      "use_bidirectional_attention: true (Gemma 3 as an encoder) is not supported; "
      "kvjax decodes causally"
    )


def _family_fields(j: _ConfigJson) -> dict[str, Any]:
  """norm_eps, the biases, the Gemma norms and embedding scale, tied embeddings, q/k norms and
  Gemma-2's query scalar and soft-caps."""
  family = j.family
  phi3 = family == "phi3"  # Phi-3's Linears have no bias
  gemma = family in ("gemma", "gemma2", "gemma3_text")
  gemma_post = family in ("gemma2", "gemma3_text")  # post norms, query scalar, soft-caps
  attention_bias = j.flag("attention_bias") and not phi3
  mlp_bias = j.flag("mlp_bias") and not phi3
  tie_embeddings = j.flag("tie_word_embeddings", gemma)
  query_scalar = 256 if family == "gemma3_text" else None
  return dict(
    norm_eps=_num(j.opt("rms_norm_eps", 1e-5 if phi3 else 1e-6)),
    qkv_bias=family == "qwen2" or attention_bias,
    o_bias=attention_bias and family != "qwen2",
    mlp_bias=mlp_bias,
    norm_plus_one=gemma,
    scale_embeddings=gemma,
    tie_embeddings=tie_embeddings,
    post_norms=gemma_post,
    qk_norm=family in QK_NORM_FAMILIES,
    query_pre_attn_scalar=(
      _num(j.opt("query_pre_attn_scalar", query_scalar)) if gemma_post else None
    ),
    attn_softcap=j.hf.get("attn_logit_softcapping") if gemma_post else None,
    final_softcap=j.hf.get("final_logit_softcapping") if gemma_post else None,
  )


def _experts(j: _ConfigJson, n_layers) -> dict[str, Any]:
  """The expert fields (transformers' defaults where a key is absent); 0 experts for a dense
  family. Mixtral: num_local_experts (8), num_experts_per_tok (2), always renormalised.
  Qwen3-MoE: num_experts or num_local_experts (128), num_experts_per_tok (8),
  moe_intermediate_size (768), norm_topk_prob (false), and the dense layers as transformers'
  Qwen3MoeDecoderLayer picks them: those in mlp_only_layers and those where (l + 1) is not a
  multiple of decoder_sparse_step (1)."""
  if j.family == "mixtral":
    return dict(
      n_experts=j.opt("num_local_experts", 8), n_experts_per_tok=j.opt("num_experts_per_tok", 2)
    )
  if j.family != "qwen3_moe":
    return dict(n_experts=0, n_experts_per_tok=0)
  return dict(
    n_experts=j.opt("num_local_experts", j.opt("num_experts", 128)),
    n_experts_per_tok=j.opt("num_experts_per_tok", 8),
    moe_ffn_dim=j.opt("moe_intermediate_size", 768),
    moe_renormalize=j.flag("norm_topk_prob"),
    dense_layers=_dense_layers(j, n_layers),
  )


def _dense_layers(j: _ConfigJson, n_layers: int) -> tuple[int, ...]:
  """Qwen3-MoE's dense layers from mlp_only_layers and decoder_sparse_step (see `_experts`)."""
  step = j.opt("decoder_sparse_step", 1)
  if not is_int(step) or step < 1:
    raise j.error(f"decoder_sparse_step must be an int >= 1; got {step!r}")
  only = j.typed("mlp_only_layers", list, "a list of layer indices or null", [])
  odd = [l for l in only if not (is_int(l) and 0 <= l < n_layers)]
  if odd:
    raise j.error(
      f"mlp_only_layers entries must be layer indices in [0, {n_layers}); got {odd[0]!r}",
      field="dense_layers",
    )
  return tuple(l for l in range(n_layers) if l in only or (l + 1) % step)


# ---------------------------------------------------------------------------------------------
# Config -> config.json


def to_hf(cfg: Config) -> dict[str, Any]:
  """The inverse of `from_hf`: a config.json dict that transformers loads. ConfigError for a
  config whose q/k norm, local RoPE base or experts its family's config.json cannot say."""
  _check_writable(cfg)
  hf: dict[str, Any] = {
    "model_type": cfg.family,
    "architectures": [ARCHITECTURES[cfg.family]],
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.d_model,
    "num_hidden_layers": cfg.n_layers,
    "num_attention_heads": cfg.n_heads,
    "num_key_value_heads": cfg.n_kv_heads,
    "head_dim": cfg.head_dim,
    "intermediate_size": cfg.ffn_dim,
    "rms_norm_eps": cfg.norm_eps,
    "max_position_embeddings": cfg.max_position,
    "hidden_act": {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[cfg.act],
    "rope_theta": cfg.rope_theta,
    "tie_word_embeddings": cfg.tie_embeddings,
  }
  hf.update(_rope_keys(cfg))
  if cfg.family == "phi3" and cfg.head_dim == cfg.d_model // cfg.n_heads:
    del hf["head_dim"]  # Phi3Config has none: hidden_size / num_attention_heads
  hf.update(_family_keys(cfg, hidden_act=hf["hidden_act"]))
  hf.update(_window_keys(cfg))
  return hf


def _check_writable(cfg: Config) -> None:
  """Refuses what the family's config.json cannot say: q/k norms outside QK_NORM_FAMILIES (or
  their absence there), a local RoPE base, experts (`_check_writable_experts`)."""
  gemma3 = cfg.family == "gemma3_text"
  if cfg.qk_norm != (cfg.family in QK_NORM_FAMILIES):
    raise ConfigError(
      f"qk_norm={cfg.qk_norm} cannot be written for family {cfg.family!r} "
      "(transformers' qwen3, gemma3_text and qwen3_moe always have q/k norms, the others "
      "never)",
      field="qk_norm",
    )
  if cfg.rope_local_theta is not None and not gemma3:
    raise ConfigError(
      f"rope_local_theta={cfg.rope_local_theta!r} cannot be written for family "
      f"{cfg.family!r} (only gemma3_text has a local RoPE base)",
      field="rope_local_theta",
    )
  if gemma3 and cfg.rope_local_theta is None and cfg.rope_type != "default" and any(cfg.windows):
    raise ConfigError(
      "a gemma3_text config.json cannot say rope_local_theta=None (local layers "
      f"with the global {cfg.rope_type} scaling); set rope_local_theta",
      field="rope_local_theta",
    )
  _check_writable_experts(cfg)


def _check_writable_experts(cfg: Config) -> None:
  """Experts are written for mixtral (renormalised, of width ffn_dim, in every layer) and
  qwen3_moe (one sliding window for every layer or none: its config.json has no layer
  types)."""
  mixtral = cfg.family == "mixtral" and (
    cfg.moe_renormalize and cfg.moe_ffn_dim is None and not cfg.dense_layers
  )
  if cfg.n_experts and not (mixtral or cfg.family == "qwen3_moe"):
    raise ConfigError(
      f"experts (n_experts={cfg.n_experts}, moe_renormalize={cfg.moe_renormalize}, "
      f"moe_ffn_dim={cfg.moe_ffn_dim}, dense_layers={cfg.dense_layers}) have no config.json "
      f"form for family {cfg.family!r}: only 'mixtral' (renormalised, width ffn_dim, in "
      "every layer) and 'qwen3_moe'",
      field="n_experts",
    )
  if cfg.family == "qwen3_moe" and len(set(cfg.windows)) > 1:
    raise ConfigError(
      f"windows={cfg.windows} cannot be written for family 'qwen3_moe': its config.json has "
      "one sliding_window for every layer",
      field="windows",
    )


def _rope_keys(cfg: Config) -> dict[str, Any]:
  """rope_scaling (absent for default RoPE); longrope's also original_max_position_embeddings,
  and its attention factor as is (max_position is capped: see Config)."""
  if cfg.rope_type == "default":
    return {}
  if cfg.rope_type == "longrope":
    return {
      "rope_scaling": {
        "rope_type": "longrope",
        "short_factor": list(cfg.rope_short_factor),
        "long_factor": list(cfg.rope_long_factor),
        "attention_factor": cfg.rope_attention_factor,
      },
      "original_max_position_embeddings": cfg.rope_original_max_position,
    }
  scaling = {"rope_type": cfg.rope_type, "factor": cfg.rope_factor}
  if cfg.rope_type == "llama3":
    scaling.update(
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_position,
    )
  return {"rope_scaling": scaling}


def _family_keys(cfg: Config, *, hidden_act: str) -> dict[str, Any]:
  """The keys only some families' configs have: biases, Gemma 3's local RoPE and layer types,
  Mixtral's experts, Gemma-2's activation name, query scalar and soft-caps."""
  hf: dict[str, Any] = {}
  if cfg.family == "phi3":  # Phi3Config's default pad id 32000 is an embedding row (padding_idx)
    hf["pad_token_id"] = None
  if cfg.family == "llama":
    hf["mlp_bias"] = cfg.mlp_bias
  if cfg.family in ("llama", "qwen3", "gemma3_text", "qwen3_moe"):
    hf["attention_bias"] = cfg.o_bias
  if cfg.family == "gemma3_text":
    hf["rope_local_base_freq"] = cfg.rope_local_theta or cfg.rope_theta
    hf["use_bidirectional_attention"] = False
    hf["sliding_window"] = max(cfg.windows) or None
    hf["layer_types"] = _layer_types(cfg)
  if cfg.family == "mixtral":
    hf.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_tok)
  if cfg.family == "qwen3_moe":  # the dense layers by index: decoder_sparse_step 1
    hf.update(
      num_experts=cfg.n_experts,
      num_experts_per_tok=cfg.n_experts_per_tok,
      moe_intermediate_size=cfg.expert_ffn_dim,
      norm_topk_prob=cfg.moe_renormalize,
      decoder_sparse_step=1,
      mlp_only_layers=list(cfg.dense_layers),
    )
  if cfg.family in ("gemma2", "gemma3_text"):
    hf["hidden_activation"] = hidden_act
    q = cfg.query_pre_attn_scalar
    hf.update(
      query_pre_attn_scalar=int(q) if q is not None and float(q).is_integer() else q,
      attn_logit_softcapping=cfg.attn_softcap,
      final_logit_softcapping=cfg.final_softcap,
    )
  return hf


def _window_keys(cfg: Config) -> dict[str, Any]:
  """sliding_window of the families other than gemma3_text (which `_family_keys` writes)."""
  if not any(cfg.windows) or cfg.family == "gemma3_text":
    return {}
  hf: dict[str, Any] = {"sliding_window": max(cfg.windows)}
  if cfg.family in ("gemma2", "qwen2", "qwen3"):
    hf["layer_types"] = _layer_types(cfg)
  if cfg.family in ("gemma2", "qwen2", "qwen3", "qwen3_moe"):
    hf["use_sliding_window"] = True
  return hf


def _layer_types(cfg: Config) -> list[str]:
  return ["sliding_attention" if w else "full_attention" for w in cfg.windows]
