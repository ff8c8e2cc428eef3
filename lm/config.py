"""Architecture config: one frozen dataclass covers every supported family by flags."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from typing import Any

FAMILIES = (
  "llama",
  "mistral",
  "qwen2",
  "qwen3",
  "gemma",
  "gemma2",
  "gemma3_text",
  "phi3",
  "mixtral",
)
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
}
LAYER_TYPES = ("sliding_attention", "full_attention")
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
}
ACTIVATIONS = {
  "silu": "silu",
  "swish": "silu",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu_new": "gelu_tanh",
  "gelu": "gelu",
}
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
SIZES = (
  "vocab_size",
  "d_model",
  "n_layers",
  "n_heads",
  "n_kv_heads",
  "head_dim",
  "ffn_dim",
  "max_position",
  "rope_original_max_position",
)
POSITIVE = (
  "norm_eps",
  "rope_theta",
  "rope_factor",
  "rope_low_freq_factor",
  "rope_high_freq_factor",
  "rope_attention_factor",
)  # finite numbers > 0
OPTIONAL_POSITIVE = (
  "query_pre_attn_scalar",
  "attn_softcap",
  "final_softcap",
  "rope_local_theta",
)  # None or > 0
FLAGS = (
  "qkv_bias",
  "o_bias",
  "mlp_bias",
  "norm_plus_one",
  "scale_embeddings",
  "tie_embeddings",
  "post_norms",
  "qk_norm",
  "moe_renormalize",
)
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
}


class ConfigError(ValueError):
  """A config that kvjax cannot run (unknown family, unsupported option, a value outside its
  domain). `field` names the offending Config field when there is one."""

  def __init__(self, message: str, *, field: str | None = None):
    super().__init__(message)
    self.field = field


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_positive(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  """Decoder-only transformer. Hashable: passed to `jax.jit` as a static argument.

  `windows[l]` is layer l's sliding window (a key at position p is visible to a query at q
  iff q - p < window), 0 for global attention. RoPE: global layers (window 0) rotate by
  `rope_theta` with the `rope_type` scaling; sliding-window layers do the same unless
  `rope_local_theta` is set (Gemma 3's local layers), then by plain RoPE at that base.

  `longrope` RoPE (Phi-3): inv_freq = 1 / (rope_short_factor * theta^(2i/H)), with cos and sin
  scaled by rope_attention_factor (folded into `query_scale` as its square: exact, since the
  scores are the only use of rotated keys, whether a cache stores them rotated or re-rotates
  them). Hugging Face switches every position to rope_long_factor once a forward's sequence
  passes rope_original_max_position; kvjax's cached keys keep the positions they were written
  at, so it serves only the short regime: max_position <= rope_original_max_position (`from_hf`
  caps it there). rope_long_factor is kept for `to_hf`.

  Mixture of experts (`n_experts` > 0, Mixtral): every layer's MLP is `n_experts` experts of
  width `ffn_dim` and a router; each token takes the softmax (float32) over the router's
  logits, keeps its `n_experts_per_tok` largest probabilities and, with `moe_renormalize`,
  rescales those to sum to 1 (Mixtral; Qwen3-MoE's `norm_topk_prob`), and sums the chosen
  experts' outputs weighted by them. No capacity: no token is ever dropped.
  """

  family: str = "llama"
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  ffn_dim: int
  norm_eps: float = 1e-6
  max_position: int = 2048
  act: str = "silu"  # silu | gelu_tanh | gelu
  # RoPE
  rope_theta: float = 10000.0
  rope_type: str = "default"  # default | linear | llama3
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  rope_local_theta: float | None = None  # Gemma 3: sliding layers' own base, without scaling
  rope_short_factor: tuple[float, ...] = ()  # longrope: [H/2] factors dividing inv_freq
  rope_long_factor: tuple[float, ...] = ()  # longrope: unused (see above), kept for to_hf
  rope_attention_factor: float = 1.0  # longrope: cos and sin times this
  # family flags
  qkv_bias: bool = False  # Qwen2; Llama's attention_bias sets qkv_bias and o_bias
  o_bias: bool = False
  mlp_bias: bool = False
  norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w)
  scale_embeddings: bool = False  # Gemma: embeddings times sqrt(D)
  tie_embeddings: bool = False
  post_norms: bool = False  # Gemma-2: norms after attention and after the MLP too
  qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head's q and k [H] before RoPE
  query_pre_attn_scalar: float | None = None  # Gemma-2: scores scaled by this**-0.5
  attn_softcap: float | None = None
  final_softcap: float | None = None
  windows: tuple[int, ...] = ()
  # mixture of experts (0: a dense MLP); see the class docstring
  n_experts: int = 0
  n_experts_per_tok: int = 0
  moe_renormalize: bool = True
  # ids the tokenizer has, when fewer than vocab_size (a padded embedding): the logits of ids
  # >= tokenizer_size are masked, so they are never sampled. Set by `lm.load`; not in config.json
  tokenizer_size: int | None = None

  def __post_init__(self):
    """Checks every field for its domain; ConfigError (with `.field`) names the first bad one."""

    def bad(name, expected):
      raise ConfigError(f"{name} must be {expected}; got {getattr(self, name)!r}", field=name)

    for name in SIZES:
      if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
        bad(name, "an int >= 1")
    for name in POSITIVE:
      if not _is_positive(getattr(self, name)):
        bad(name, "a finite number > 0")
    for name in OPTIONAL_POSITIVE:
      if getattr(self, name) is not None and not _is_positive(getattr(self, name)):
        bad(name, "null or a finite number > 0")
    for name in FLAGS:
      if not isinstance(getattr(self, name), bool):
        bad(name, "true or false")
    if self.rope_type == "llama3" and self.rope_low_freq_factor >= self.rope_high_freq_factor:
      raise ConfigError(
        f"rope_low_freq_factor ({self.rope_low_freq_factor!r}) must be below "
        f"rope_high_freq_factor ({self.rope_high_freq_factor!r}) for llama3 "
        "RoPE scaling",
        field="rope_low_freq_factor",
      )
    for name in ("rope_short_factor", "rope_long_factor"):
      v = getattr(self, name)
      n = self.head_dim // 2 if self.rope_type == "longrope" else 0
      if not (isinstance(v, tuple) and len(v) == n and all(_is_positive(x) for x in v)):
        bad(
          name,
          f"a tuple of {n} finite numbers > 0 (head_dim / 2)"
          if n
          else f"() unless rope_type is 'longrope' (it is {self.rope_type!r})",
        )
    if self.rope_type == "longrope" and self.max_position > self.rope_original_max_position:
      raise ConfigError(
        f"max_position ({self.max_position}) must be <= "
        f"rope_original_max_position ({self.rope_original_max_position}) with "
        "longrope RoPE: kvjax serves its short-factor regime only",
        field="max_position",
      )
    if self.tokenizer_size is not None and not (
      _is_int(self.tokenizer_size) and 1 <= self.tokenizer_size <= self.vocab_size
    ):
      bad("tokenizer_size", f"null or an int in [1, vocab_size={self.vocab_size}]")
    for name in ("n_experts", "n_experts_per_tok"):
      if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
        bad(name, "an int >= 0")
    if self.n_experts and not 1 <= self.n_experts_per_tok <= self.n_experts:
      bad("n_experts_per_tok", f"an int in [1, n_experts={self.n_experts}]")
    if not self.n_experts and self.n_experts_per_tok:
      bad("n_experts_per_tok", "0 without experts (n_experts=0: a dense MLP)")
    if self.n_experts and self.mlp_bias:
      raise ConfigError("mlp_bias is not supported with experts (n_experts > 0)", field="mlp_bias")
    if self.family == "mixtral" and not self.n_experts:
      bad("n_experts", "an int >= 1 for family 'mixtral'")
    if self.family not in FAMILIES:
      raise ConfigError(f"family {self.family!r} is not one of {FAMILIES}")
    if self.act not in ("silu", "gelu_tanh", "gelu"):
      raise ConfigError(f"act {self.act!r} is not one of silu, gelu_tanh, gelu")
    if self.rope_type not in ROPE_TYPES:
      raise ConfigError(f"rope_type {self.rope_type!r} is not one of {ROPE_TYPES}")
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(
        f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}",
        field="n_kv_heads",
      )
    if not self.windows:
      object.__setattr__(self, "windows", (0,) * self.n_layers)
    if len(self.windows) != self.n_layers:
      raise ConfigError(
        f"windows has {len(self.windows)} entries for {self.n_layers} layers", field="windows"
      )
    if not all(_is_int(w) and w >= 0 for w in self.windows):
      bad("windows", "ints >= 0 (0: global attention)")
    if self.family == "phi3" and (
      len(set(self.windows)) > 1 or self.qkv_bias or self.o_bias or self.mlp_bias or self.post_norms
    ):
      raise ConfigError(
        "phi3 has one sliding_window for every layer and no biases or post-norms "
        f"(its checkpoint format); got windows={self.windows}, "
        f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}, "
        f"mlp_bias={self.mlp_bias}, post_norms={self.post_norms}",
        field="windows" if len(set(self.windows)) > 1 else None,
      )

  @property
  def query_scale(self) -> float:
    """Scores' scale, times the square of longrope's attention factor (see the class doc)."""
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5 * self.rope_attention_factor**2

  @property
  def n_params(self) -> int:
    D, F, N, K, H, V = (
      self.d_model,
      self.ffn_dim,
      self.n_heads,
      self.n_kv_heads,
      self.head_dim,
      self.vocab_size,
    )
    mlp = 3 * D * F if not self.n_experts else self.n_experts * (3 * D * F + D)  # + router
    per_layer = D * (N + 2 * K) * H + N * H * D + mlp + (4 if self.post_norms else 2) * D
    per_layer += (N + 2 * K) * H * self.qkv_bias + D * self.o_bias + (2 * F + D) * self.mlp_bias
    per_layer += 2 * H * self.qk_norm
    return V * D * (1 if self.tie_embeddings else 2) + self.n_layers * per_layer + D


def to_dict(cfg: Config) -> dict[str, Any]:
  """The config as a JSON-ready dict (kvjax's own field names; `from_dict` reads it back)."""
  d = dataclasses.asdict(cfg)
  d["windows"] = list(cfg.windows)
  d["rope_short_factor"], d["rope_long_factor"] = (
    list(cfg.rope_short_factor),
    list(cfg.rope_long_factor),
  )
  return d


def from_dict(d: dict[str, Any]) -> Config:
  """The inverse of `to_dict` (lists back to tuples)."""
  d = dict(d)
  d["windows"] = tuple(d.get("windows", ()))
  for name in ("rope_short_factor", "rope_long_factor"):
    d[name] = tuple(d.get(name, ()))
  return Config(**d)


def diff(
  a: Config, b: Config, *, names: tuple[str, ...] | None = None, other: str = "model"
) -> list[str]:
  """'name a (other: b)' for each field (of `names`, default all) where a and b differ."""
  names = names or tuple(f.name for f in dataclasses.fields(Config))
  return [
    f"{n} {getattr(a, n)!r} ({other}: {getattr(b, n)!r})"
    for n in names
    if getattr(a, n) != getattr(b, n)
  ]


def from_hf(hf: dict[str, Any], source: str = "config.json") -> Config:
  """Maps a Hugging Face `config.json` dict (transformers 4.x or 5.x layout) to a Config."""
  if not isinstance(hf, dict):
    raise ConfigError(f"{source}: expected a JSON object; got {type(hf).__name__}")
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise ConfigError(
      f"{source}: model_type {family!r} is not supported; expected one of {FAMILIES}"
    )

  def need(key):
    if key not in hf:
      raise ConfigError(f"{source}: missing required field {key!r} for model_type {family!r}")
    v = hf[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ConfigError(f"{source}: {key} must be an int >= 1; got {v!r}")
    return v

  def opt(key, default, table=hf):
    """table[key], or default when the key is absent or null (as transformers reads it); a
    present value is never replaced, so Config's checks see it."""
    v = table.get(key)
    return default if v is None else v

  def num(v):
    """Real numbers as float (ints in JSON); anything else unchanged, for Config to refuse."""
    return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v

  def typed(key, kind, expected, default=None):
    """opt(key, default), refusing a present value that is not of `kind`."""
    v = hf.get(key)
    if v is not None and not isinstance(v, kind):
      raise ConfigError(f"{source}: {key} must be {expected}; got {v!r}")
    return opt(key, default)

  def flag(key, default=False):
    return typed(key, bool, "true or false", default)

  D, N = need("hidden_size"), need("num_attention_heads")
  L = need("num_hidden_layers")
  V, F = need("vocab_size"), need("intermediate_size")
  if hf.get("head_dim") is None and D % N:
    raise ConfigError(
      f"{source}: hidden_size {D} is not a multiple of num_attention_heads {N} "
      "and there is no head_dim"
    )
  gemma3 = family == "gemma3_text"
  rope, local_rope = _rope_tables(hf, family, source)
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if family == "phi3" and rope_type in ("su", "yarn"):  # Phi3Config reads both as longrope
    rope_type = "longrope"
  if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
    raise ConfigError(
      f"{source}: rope type {rope_type!r} is not supported; expected one of {ROPE_TYPES}"
    )
  if (family == "phi3") != (rope_type == "longrope") and rope_type != "default":
    raise ConfigError(
      f"{source}: rope type {rope_type!r} is not supported for model_type "
      f"{family!r}" + (" (phi3: default or longrope)" if family == "phi3" else "")
    )
  for table, where in ((rope, "rope_scaling."), (hf, "")):
    if opt("partial_rotary_factor", 1.0, table) != 1.0:
      raise ConfigError(
        f"{source}: {where}partial_rotary_factor "
        f"{table['partial_rotary_factor']!r} is not supported (only 1.0: RoPE "
        "over the whole head)"
      )
  phi3 = family == "phi3"
  max_position = opt("max_position_embeddings", MAX_POSITION[family])
  longrope = {}
  if rope_type == "longrope":
    longrope = _longrope(hf, rope, max_position, source)
    if _is_int(max_position):  # the short-factor regime only (see Config)
      max_position = min(max_position, longrope["rope_original_max_position"])
  act_name = (
    typed("hidden_activation", str, "a string or null")
    or typed("hidden_act", str, "a string or null")
    or ("gelu_pytorch_tanh" if family.startswith("gemma") else "silu")
  )
  if act_name not in ACTIVATIONS:
    raise ConfigError(
      f"{source}: activation {act_name!r} is not supported; expected one of {sorted(ACTIVATIONS)}"
    )

  window = opt("sliding_window", 0)
  if not _is_int(window) or window < 0:
    raise ConfigError(
      f"{source}: sliding_window must be an int >= 0 (0 or null: none); got {window!r}",
      field="windows",
    )
  layer_types = typed("layer_types", list, "a list of layer types or null")
  qwen = family in ("qwen2", "qwen3")
  if qwen and not flag("use_sliding_window"):
    window = 0
  if layer_types is not None:
    if len(layer_types) != L:
      raise ConfigError(f"{source}: layer_types has {len(layer_types)} entries for {L} layers")
    odd = [t for t in layer_types if t not in LAYER_TYPES]
    if odd:
      raise ConfigError(
        f"{source}: layer_types entries must be 'sliding_attention' or "
        f"'full_attention'; got {odd[0]!r}"
      )
    sliding = [t == "sliding_attention" for t in layer_types]
  elif family == "gemma2":
    sliding = [i % 2 == 0 for i in range(L)]
  elif gemma3:  # transformers' default pattern: every sliding_window_pattern-th layer is global
    pattern = opt("sliding_window_pattern", 6)
    if not _is_int(pattern) or pattern < 1:
      raise ConfigError(f"{source}: sliding_window_pattern must be an int >= 1; got {pattern!r}")
    sliding = [(i + 1) % pattern != 0 for i in range(L)]
  elif qwen:  # transformers: layers from max_window_layers on slide
    first = opt("max_window_layers", 28)
    if not _is_int(first) or first < 0:
      raise ConfigError(f"{source}: max_window_layers must be an int >= 0; got {first!r}")
    sliding = [i >= first for i in range(L)]
  else:
    sliding = [True] * L
  if gemma3 and window == 0 and any(sliding):
    raise ConfigError(
      f"{source}: sliding_window must be an int >= 1 for a gemma3_text model "
      "with sliding_attention layers; got null or 0",
      field="windows",
    )
  windows = tuple(window if s else 0 for s in sliding)
  if gemma3 and flag("use_bidirectional_attention"):
    raise ConfigError(
      f"{source}: use_bidirectional_attention: true (Gemma 3 as an encoder) is "
      "not supported; kvjax decodes causally"
    )

  gemma = family in ("gemma", "gemma2", "gemma3_text")
  gemma_post = family in ("gemma2", "gemma3_text")  # post norms, query scalar, soft-caps
  moe = family == "mixtral"
  attention_bias = flag("attention_bias") and not phi3  # Phi-3's Linears have no bias
  mlp_bias = flag("mlp_bias") and not phi3
  tie_embeddings = flag("tie_word_embeddings", gemma)
  try:
    return Config(
      family=family,
      vocab_size=V,
      d_model=D,
      n_layers=L,
      n_heads=N,
      n_kv_heads=opt("num_key_value_heads", N),
      head_dim=opt("head_dim", D // N),
      ffn_dim=F,
      norm_eps=num(opt("rms_norm_eps", 1e-5 if phi3 else 1e-6)),
      max_position=max_position,
      act=ACTIVATIONS[act_name],
      rope_theta=num(
        opt("rope_theta", opt("rope_theta", 1e6 if gemma3 or moe else 10000.0), table=rope)
      ),  # 5.x, 4.x; Gemma 3's and Mixtral's default is 1e6
      rope_type=rope_type,
      rope_factor=1.0 if longrope else num(opt("factor", 1.0, rope)),  # longrope: folded
      rope_low_freq_factor=num(opt("low_freq_factor", 1.0, rope)),
      rope_high_freq_factor=num(opt("high_freq_factor", 4.0, rope)),
      rope_original_max_position=longrope.pop(
        "rope_original_max_position", opt("original_max_position_embeddings", 8192, rope)
      ),
      rope_local_theta=(
        num(opt("rope_theta", opt("rope_local_base_freq", 10000.0), table=local_rope))
        if gemma3
        else None
      ),
      qkv_bias=family == "qwen2" or attention_bias,
      o_bias=attention_bias and family != "qwen2",
      mlp_bias=mlp_bias,
      norm_plus_one=gemma,
      scale_embeddings=gemma,
      tie_embeddings=tie_embeddings,
      post_norms=gemma_post,
      qk_norm=family in ("qwen3", "gemma3_text"),
      query_pre_attn_scalar=(
        num(opt("query_pre_attn_scalar", 256 if gemma3 else None)) if gemma_post else None
      ),
      attn_softcap=hf.get("attn_logit_softcapping") if gemma_post else None,
      final_softcap=hf.get("final_logit_softcapping") if gemma_post else None,
      windows=windows,
      n_experts=opt("num_local_experts", 8) if moe else 0,  # transformers' defaults
      n_experts_per_tok=opt("num_experts_per_tok", 2) if moe else 0,
      **longrope,
    )
  except ConfigError as err:  # a value outside its domain: name the config.json key
    names = "|".join(sorted(HF_KEYS, key=len, reverse=True))
    msg = re.sub(rf"\b({names})\b", lambda m: HF_KEYS[m.group(1)], str(err))
    raise ConfigError(f"{source}: {msg}", field=err.field) from None


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
        raise ConfigError(
          f"{source}: rope_parameters.{t} must be an object or null; got {rope[t]!r}"
        )
    rope, local = dict(rope.get("full_attention") or {}), dict(rope.get("sliding_attention") or {})
    local_type = local.get("rope_type", local.get("type", "default"))
    if local_type != "default":
      raise ConfigError(
        f"{source}: rope_parameters.sliding_attention.rope_type {local_type!r} is "
        "not supported; Gemma 3's local layers use 'default'"
      )
  rope.update(tables["rope_scaling"])  # transformers 4.x
  return rope, local


def _longrope(hf: dict, rope: dict, max_position, source: str) -> dict[str, Any]:
  """Config fields of Phi-3's longrope scaling, as transformers derives them: the pretraining
  length from the top-level original_max_position_embeddings (4096 when absent, whatever
  rope_scaling says), the attention factor given, or from `factor` (default max_position /
  that length): sqrt(1 + ln(factor) / ln(length)) when factor > 1, else 1."""
  original = hf.get("original_max_position_embeddings")
  original = 4096 if original is None else original
  if not _is_int(original) or original < 1:
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
    factors[f"rope_{key}"] = tuple(float(x) if _is_positive(x) else x for x in v)
  attention = rope.get("attention_factor")
  if attention is None:
    factor = rope.get("factor")
    if factor is None:  # a bad max_position_embeddings is Config's to name
      factor = max_position / original if _is_int(max_position) and max_position > 0 else 1.0
    if not _is_positive(factor):
      raise ConfigError(
        f"{source}: rope_scaling.factor must be a finite number > 0; got {factor!r}",
        field="rope_attention_factor",
      )
    attention = 1.0
    if factor > 1.0:
      if original == 1:
        raise ConfigError(
          f"{source}: original_max_position_embeddings 1 cannot derive "
          "longrope's attention factor (ln 1 = 0); give "
          "rope_scaling.attention_factor",
          field="rope_attention_factor",
        )
      attention = math.sqrt(1 + math.log(factor) / math.log(original))
  elif isinstance(attention, numbers.Real) and not isinstance(attention, bool):
    attention = float(attention)
  return dict(rope_original_max_position=original, rope_attention_factor=attention, **factors)


def to_hf(cfg: Config) -> dict[str, Any]:
  """The inverse of `from_hf`: a config.json dict that transformers loads. ConfigError for a
  config whose q/k norm, local RoPE base or experts its family's config.json cannot say."""
  gemma3 = cfg.family == "gemma3_text"
  if cfg.qk_norm != (cfg.family in ("qwen3", "gemma3_text")):
    raise ConfigError(
      f"qk_norm={cfg.qk_norm} cannot be written for family {cfg.family!r} "
      "(transformers' qwen3 and gemma3_text always have q/k norms, the others "
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
  if cfg.n_experts and (cfg.family != "mixtral" or not cfg.moe_renormalize):
    raise ConfigError(
      f"experts (n_experts={cfg.n_experts}, moe_renormalize="
      f"{cfg.moe_renormalize}) have no config.json form for family "
      f"{cfg.family!r}: only 'mixtral', which renormalises",
      field="n_experts",
    )
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
  if cfg.rope_type != "default":
    hf["rope_scaling"] = {"rope_type": cfg.rope_type, "factor": cfg.rope_factor}
    if cfg.rope_type == "llama3":
      hf["rope_scaling"].update(
        low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor,
        original_max_position_embeddings=cfg.rope_original_max_position,
      )
    if cfg.rope_type == "longrope":  # the attention factor as is: max_position is capped
      hf["rope_scaling"] = {
        "rope_type": "longrope",
        "short_factor": list(cfg.rope_short_factor),
        "long_factor": list(cfg.rope_long_factor),
        "attention_factor": cfg.rope_attention_factor,
      }
      hf["original_max_position_embeddings"] = cfg.rope_original_max_position
  if cfg.family == "phi3" and cfg.head_dim == cfg.d_model // cfg.n_heads:
    del hf["head_dim"]  # Phi3Config has none: hidden_size / num_attention_heads
  if cfg.family == "phi3":  # Phi3Config's default pad id 32000 is an embedding row (padding_idx)
    hf["pad_token_id"] = None
  if cfg.family == "llama":
    hf["mlp_bias"] = cfg.mlp_bias
  if cfg.family in ("llama", "qwen3", "gemma3_text"):
    hf["attention_bias"] = cfg.o_bias
  if gemma3:
    hf["rope_local_base_freq"] = cfg.rope_local_theta or cfg.rope_theta
    hf["use_bidirectional_attention"] = False
    hf["sliding_window"] = max(cfg.windows) or None
    hf["layer_types"] = ["sliding_attention" if w else "full_attention" for w in cfg.windows]
  if cfg.family == "mixtral":
    hf.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_tok)
  if cfg.family in ("gemma2", "gemma3_text"):
    hf["hidden_activation"] = hf["hidden_act"]
    q = cfg.query_pre_attn_scalar
    hf.update(
      query_pre_attn_scalar=int(q) if q is not None and float(q).is_integer() else q,
      attn_logit_softcapping=cfg.attn_softcap,
      final_logit_softcapping=cfg.final_softcap,
    )
  if any(cfg.windows) and not gemma3:
    hf["sliding_window"] = max(cfg.windows)
    if cfg.family in ("gemma2", "qwen2", "qwen3"):
      hf["layer_types"] = ["sliding_attention" if w else "full_attention" for w in cfg.windows]
      hf["use_sliding_window"] = True
  return hf
