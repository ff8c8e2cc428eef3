"""Architecture config: one frozen dataclass covers every supported family by flags.

The Hugging Face config.json form of a Config is `kvjax.lm.hf_config`'s.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, NoReturn

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
  "qwen3_moe",
)
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# the sizes that fix the params' shapes (a head or coprocessor made for a model needs them)
PARAM_SIZES = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")
SIZES = (*PARAM_SIZES, "max_position", "rope_original_max_position")  # every int >= 1 field
EXPERT_SIZES = ("n_experts", "moe_ffn_dim", "dense_layers")  # with PARAM_SIZES: every shape
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


class ConfigError(ValueError):
  """A config that kvjax cannot run (unknown family, unsupported option, a value outside its
  domain). `field` names the offending Config field when there is one."""

  def __init__(self, message: str, *, field: str | None = None):
    super().__init__(message)
    self.field = field


def is_int(v) -> bool:
  """An integer that is not a bool (JSON's true is not a size)."""
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_positive(v) -> bool:
  """A finite real number > 0 that is not a bool."""
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0


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
  at, so it serves only the short regime: max_position <= rope_original_max_position
  (`hf_config.from_hf` caps it there). rope_long_factor is kept for `hf_config.to_hf`.

  Mixture of experts (`n_experts` > 0: Mixtral, Qwen3-MoE): each layer's MLP is `n_experts`
  experts of width `expert_ffn_dim` (`moe_ffn_dim`, Qwen3-MoE's moe_intermediate_size; None:
  `ffn_dim`, as in Mixtral) and a router, except the layers in `dense_layers`, whose MLP is
  dense of width `ffn_dim` (Qwen3-MoE's mlp_only_layers and decoder_sparse_step, resolved to
  layer indices by `hf_config.from_hf`). Each token takes the softmax (float32) over the
  router's logits, keeps its `n_experts_per_tok` largest probabilities and, with
  `moe_renormalize`, rescales those to sum to 1 (Mixtral; Qwen3-MoE's `norm_topk_prob`), and
  sums the chosen experts' outputs weighted by them. No capacity: no token is ever dropped.
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
  rope_type: str = "default"  # default | linear | llama3 | longrope
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
  moe_ffn_dim: int | None = None  # the experts' width; None: ffn_dim
  dense_layers: tuple[int, ...] = ()  # with experts: the layers whose MLP is dense, ascending
  # ids the tokenizer has, when fewer than vocab_size (a padded embedding): the logits of ids
  # >= tokenizer_size are masked, so they are never sampled. Set by `lm.load`; not in config.json
  tokenizer_size: int | None = None

  def __post_init__(self):
    """Checks every field for its domain; ConfigError (with `.field`) names the first bad one.
    An empty `windows` becomes global attention in every layer; a moe_ffn_dim equal to ffn_dim
    becomes None."""
    _check_domains(self)
    _check_rope(self)
    _check_tokenizer_size(self)
    _check_experts(self)
    if self.moe_ffn_dim == self.ffn_dim:  # one form per architecture
      object.__setattr__(self, "moe_ffn_dim", None)
    _check_choices(self)
    if not self.windows:
      object.__setattr__(self, "windows", (0,) * self.n_layers)
    _check_windows(self)
    _check_phi3(self)

  @property
  def query_scale(self) -> float:
    """Scores' scale, times the square of longrope's attention factor (see the class doc)."""
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5 * self.rope_attention_factor**2

  @property
  def expert_ffn_dim(self) -> int:
    """The width of each expert's MLP (`moe_ffn_dim`, else `ffn_dim`)."""
    return self.ffn_dim if self.moe_ffn_dim is None else self.moe_ffn_dim

  @property
  def moe_layers(self) -> tuple[bool, ...]:
    """[L]: whether layer l's MLP is the mixture of experts (else dense, of width ffn_dim)."""
    dense = set(self.dense_layers)
    return tuple(bool(self.n_experts) and l not in dense for l in range(self.n_layers))

  @property
  def cache_dims(self) -> dict[str, int]:
    """The sizes of a cache that this config fixes, as keywords of the caches' `init`
    (`KVCache.init(**cfg.cache_dims, batch=B, size=S)`)."""
    return dict(n_layers=self.n_layers, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim)

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
    dense = 3 * D * F + (2 * F + D) * self.mlp_bias
    moe = self.n_experts * (3 * D * self.expert_ffn_dim + D)  # + the router's row per expert
    mlps = sum(moe if m else dense for m in self.moe_layers)
    per_layer = D * (N + 2 * K) * H + N * H * D + (4 if self.post_norms else 2) * D
    per_layer += (N + 2 * K) * H * self.qkv_bias + D * self.o_bias + 2 * H * self.qk_norm
    return V * D * (1 if self.tie_embeddings else 2) + self.n_layers * per_layer + mlps + D


def to_dict(cfg: Config) -> dict[str, Any]:
  """The config as a JSON-ready dict (kvjax's own field names; `from_dict` reads it back)."""
  d = dataclasses.asdict(cfg)
  d["windows"] = list(cfg.windows)
  d["dense_layers"] = list(cfg.dense_layers)
  d["rope_short_factor"], d["rope_long_factor"] = (
    list(cfg.rope_short_factor),
    list(cfg.rope_long_factor),
  )
  return d


def from_dict(d: dict[str, Any]) -> Config:
  """The inverse of `to_dict` (lists back to tuples)."""
  d = dict(d)
  for name in ("windows", "dense_layers", "rope_short_factor", "rope_long_factor"):
    d[name] = tuple(d.get(name, ()))
  return Config(**d)


def one_layer(cfg: Config, layer: int, **changes) -> Config:
  """The config of a one-layer model made of cfg's layer `layer` (its window and MLP kind),
  then `changes` applied (e.g. an EAGLE head's layer: the target's top one, windows=(0,))."""
  dense = (0,) if cfg.n_experts and not cfg.moe_layers[layer] else ()
  return dataclasses.replace(
    cfg, **{"n_layers": 1, "windows": (cfg.windows[layer],), "dense_layers": dense, **changes}
  )


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


def _bad(cfg: Config, name: str, expected: str) -> NoReturn:
  raise ConfigError(f"{name} must be {expected}; got {getattr(cfg, name)!r}", field=name)


def _check_domains(cfg: Config) -> None:
  """The field groups that each have one domain: SIZES, POSITIVE, OPTIONAL_POSITIVE, FLAGS."""
  for name in SIZES:
    if not is_int(getattr(cfg, name)) or getattr(cfg, name) < 1:
      _bad(cfg, name, "an int >= 1")
  for name in POSITIVE:
    if not is_positive(getattr(cfg, name)):
      _bad(cfg, name, "a finite number > 0")
  for name in OPTIONAL_POSITIVE:
    if getattr(cfg, name) is not None and not is_positive(getattr(cfg, name)):
      _bad(cfg, name, "null or a finite number > 0")
  for name in FLAGS:
    if not isinstance(getattr(cfg, name), bool):
      _bad(cfg, name, "true or false")


def _check_rope(cfg: Config) -> None:
  """llama3's frequency band is ordered; longrope's factors are [H/2] (and () otherwise); and
  longrope stays in its short-factor regime (see Config)."""
  if cfg.rope_type == "llama3" and cfg.rope_low_freq_factor >= cfg.rope_high_freq_factor:
    raise ConfigError(
      f"rope_low_freq_factor ({cfg.rope_low_freq_factor!r}) must be below "
      f"rope_high_freq_factor ({cfg.rope_high_freq_factor!r}) for llama3 "
      "RoPE scaling",
      field="rope_low_freq_factor",
    )
  for name in ("rope_short_factor", "rope_long_factor"):
    v = getattr(cfg, name)
    n = cfg.head_dim // 2 if cfg.rope_type == "longrope" else 0
    if not (isinstance(v, tuple) and len(v) == n and all(is_positive(x) for x in v)):
      _bad(
        cfg,
        name,
        f"a tuple of {n} finite numbers > 0 (head_dim / 2)"
        if n
        else f"() unless rope_type is 'longrope' (it is {cfg.rope_type!r})",
      )
  if cfg.rope_type == "longrope" and cfg.max_position > cfg.rope_original_max_position:
    raise ConfigError(
      f"max_position ({cfg.max_position}) must be <= "
      f"rope_original_max_position ({cfg.rope_original_max_position}) with "
      "longrope RoPE: kvjax serves its short-factor regime only",
      field="max_position",
    )


def _check_tokenizer_size(cfg: Config) -> None:
  if cfg.tokenizer_size is not None and not (
    is_int(cfg.tokenizer_size) and 1 <= cfg.tokenizer_size <= cfg.vocab_size
  ):
    _bad(cfg, "tokenizer_size", f"null or an int in [1, vocab_size={cfg.vocab_size}]")


def _check_experts(cfg: Config) -> None:
  """0 experts is a dense MLP (no expert fields set); otherwise 1 <= n_experts_per_tok <=
  n_experts, no MLP bias, moe_ffn_dim None or >= 1, dense_layers ascending layer indices."""
  for name in ("n_experts", "n_experts_per_tok"):
    if not is_int(getattr(cfg, name)) or getattr(cfg, name) < 0:
      _bad(cfg, name, "an int >= 0")
  if cfg.family in ("mixtral", "qwen3_moe") and not cfg.n_experts:
    _bad(cfg, "n_experts", f"an int >= 1 for family {cfg.family!r}")
  if cfg.n_experts and not 1 <= cfg.n_experts_per_tok <= cfg.n_experts:
    _bad(cfg, "n_experts_per_tok", f"an int in [1, n_experts={cfg.n_experts}]")
  if cfg.moe_ffn_dim is not None and not (is_int(cfg.moe_ffn_dim) and cfg.moe_ffn_dim >= 1):
    _bad(cfg, "moe_ffn_dim", "null (ffn_dim) or an int >= 1")
  d = cfg.dense_layers
  if not (
    isinstance(d, tuple)
    and all(is_int(l) and 0 <= l < cfg.n_layers for l in d)
    and list(d) == sorted(set(d))
  ):
    _bad(cfg, "dense_layers", f"a tuple of distinct ascending layer indices in [0, {cfg.n_layers})")
  if not cfg.n_experts:
    for name, none in (("n_experts_per_tok", 0), ("moe_ffn_dim", None), ("dense_layers", ())):
      if getattr(cfg, name) != none:
        _bad(
          cfg,
          name,
          f"{none if none is not None else 'null'} without experts (n_experts=0: a dense MLP)",
        )
  if cfg.n_experts and cfg.mlp_bias:
    raise ConfigError("mlp_bias is not supported with experts (n_experts > 0)", field="mlp_bias")


def _check_choices(cfg: Config) -> None:
  """family, act and rope_type are known; the query heads group evenly over the kv heads."""
  if cfg.family not in FAMILIES:
    raise ConfigError(f"family {cfg.family!r} is not one of {FAMILIES}")
  if cfg.act not in ("silu", "gelu_tanh", "gelu"):
    raise ConfigError(f"act {cfg.act!r} is not one of silu, gelu_tanh, gelu")
  if cfg.rope_type not in ROPE_TYPES:
    raise ConfigError(f"rope_type {cfg.rope_type!r} is not one of {ROPE_TYPES}")
  if cfg.n_heads % cfg.n_kv_heads:
    raise ConfigError(
      f"n_heads={cfg.n_heads} is not a multiple of n_kv_heads={cfg.n_kv_heads}",
      field="n_kv_heads",
    )


def _check_windows(cfg: Config) -> None:
  """One window per layer, each an int >= 0."""
  if len(cfg.windows) != cfg.n_layers:
    raise ConfigError(
      f"windows has {len(cfg.windows)} entries for {cfg.n_layers} layers", field="windows"
    )
  if not all(is_int(w) and w >= 0 for w in cfg.windows):
    _bad(cfg, "windows", "ints >= 0 (0: global attention)")


def _check_phi3(cfg: Config) -> None:
  """What Phi-3's checkpoint format holds: one window for every layer, no biases or post-norms."""
  if cfg.family == "phi3" and (
    len(set(cfg.windows)) > 1 or cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias or cfg.post_norms
  ):
    raise ConfigError(
      "phi3 has one sliding_window for every layer and no biases or post-norms "
      f"(its checkpoint format); got windows={cfg.windows}, "
      f"qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}, "
      f"mlp_bias={cfg.mlp_bias}, post_norms={cfg.post_norms}",
      field="windows" if len(set(cfg.windows)) > 1 else None,
    )
