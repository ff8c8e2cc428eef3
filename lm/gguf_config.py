"""A GGUF file's metadata -> Config.

Each architecture's keys are data (`KEYS`, `FAMILY_KEYS`): read into the Hugging Face
config.json dict that the same model would have and checked by `hf_config.from_hf`, exactly as a
config.json is; its errors are reworded to name the GGUF key (`llama.embedding_length`, not
`hidden_size`) and raised as CheckpointError naming the file. What a GGUF file does not state,
kvjax assumes as llama.cpp does (`_assumed`): Gemma 3's sliding-window pattern (every sixth layer
global) and local RoPE base (10000), its query scale (1/sqrt(head_dim); 1/sqrt(D/N) for the 62-layer
27B), Qwen3-MoE's renormalised top-k weights (`norm_topk_prob`) and expert width
(feed_forward_length / expert_used_count where expert_feed_forward_length is absent or 0), and tied
embeddings when the file has no `output.weight`.

A Qwen3-MoE file has no key for the layers with a dense MLP (config.json's mlp_only_layers,
decoder_sparse_step): llama.cpp's converter and loader give every qwen3moe layer experts. kvjax
reads the layers from the tensors present (`_dense_layers`): a layer with blk.{i}.ffn_gate/up/down
and none of the expert tensors (ffn_gate_inp, ffn_{gate,up,down}_exps) is dense, of width
feed_forward_length; every other layer has experts, and its missing or surplus tensors are
refused by name when the tensors are read.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from kvjax.lm.checkpoint import CheckpointError
from kvjax.lm.config import Config, ConfigError, is_int
from kvjax.lm.hf_config import from_hf

# general.architecture -> the model_type of its config.json (kvjax's family)
ARCHITECTURES = {
  "llama": "llama",
  "qwen2": "qwen2",
  "qwen3": "qwen3",
  "gemma3": "gemma3_text",
  "qwen3moe": "qwen3_moe",
}
MOE_ARCHITECTURES = ("qwen3moe",)  # the architectures with experts (`{arch}.expert_count`)

# config.json key -> its GGUF key, after the "{architecture}." prefix (every architecture)
KEYS = {
  "hidden_size": "embedding_length",
  "num_hidden_layers": "block_count",
  "intermediate_size": "feed_forward_length",
  "num_attention_heads": "attention.head_count",
  "num_key_value_heads": "attention.head_count_kv",
  "head_dim": "attention.key_length",
  "rms_norm_eps": "attention.layer_norm_rms_epsilon",
  "max_position_embeddings": "context_length",
  "rope_theta": "rope.freq_base",
  "vocab_size": "vocab_size",
}
FAMILY_KEYS = {
  "gemma3_text": {
    "sliding_window": "attention.sliding_window",
    "rope_local_base_freq": "rope.freq_base_swa",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
  },
  "qwen3_moe": {
    "num_experts": "expert_count",
    "num_experts_per_tok": "expert_used_count",
    "moe_intermediate_size": "expert_feed_forward_length",
    # not written by llama.cpp's converter for qwen3moe (its loader always renormalises), but
    # the key other MoE architectures use for norm_topk_prob: a file that states it is followed
    "norm_topk_prob": "expert_weights_norm",
  },
}
# the keys of a MoE architecture that change the routing where kvjax has one way: key ->
# (the value kvjax runs, what it means); a file stating another value is refused
ROUTING = {
  "expert_gating_func": (1, "softmax over the router's logits"),
  "expert_weights_scale": (1.0, "the chosen experts' weights unscaled"),
  "expert_shared_count": (0, "no shared experts"),
}
# per-layer tensors of a layer with experts, after "blk.{i}." (`_dense_layers`)
EXPERT_TENSORS = (
  "ffn_gate_inp.weight",
  "ffn_gate_exps.weight",
  "ffn_up_exps.weight",
  "ffn_down_exps.weight",
)
DENSE_TENSORS = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
REQUIRED = (
  "embedding_length",
  "block_count",
  "feed_forward_length",
  "attention.head_count",
  "attention.layer_norm_rms_epsilon",
  "context_length",
)
MOE_REQUIRED = ("expert_count", "expert_used_count")  # llama.cpp refuses a file without them
ROPE_SCALING = ("none", "linear")  # {arch}.rope.scaling.type values kvjax reads


def config(
  metadata: dict[str, Any], tensor_names: set[str], *, source: str, rope: dict | None = None
) -> Config:
  """The Config of a GGUF file's metadata. tensor_names: the file's tensors (tied embeddings
  when there is no output.weight). rope: a rope_scaling dict found elsewhere (llama3 scaling
  from rope_freqs.weight). CheckpointError names the file and the GGUF key at fault."""
  arch = architecture(metadata, source)
  family = ARCHITECTURES[arch]
  keys = {**KEYS, **FAMILY_KEYS.get(family, {})}
  experts = metadata.get(f"{arch}.expert_count", 0)
  if experts and arch not in MOE_ARCHITECTURES:
    raise CheckpointError(
      f"{source}: {arch}.expert_count is {experts}: mixture-of-experts {arch} files (e.g. "
      "Mixtral as llama) are not supported"
    )
  required = REQUIRED + (MOE_REQUIRED if arch in MOE_ARCHITECTURES else ())
  missing = [k for k in required if f"{arch}.{k}" not in metadata]
  if missing:
    raise CheckpointError(
      f"{source}: no {arch}.{missing[0]} in the metadata (required for architecture {arch!r})"
    )
  hf: dict[str, Any] = {"model_type": family}
  for hf_key, key in keys.items():
    if f"{arch}.{key}" in metadata:
      hf[hf_key] = _per_model(metadata[f"{arch}.{key}"], f"{arch}.{key}", source)
  hf.setdefault("vocab_size", _vocab_size(metadata, source))
  hf["tie_word_embeddings"] = "output.weight" not in tensor_names
  hf["rope_scaling"] = rope or _rope_scaling(metadata, arch, source)
  hf.update(_assumed(hf, metadata, arch, source))
  if arch in MOE_ARCHITECTURES:
    _check_routing(metadata, arch, source)
    hf.update(_dense_layers(hf, tensor_names))
  _check_head_dims(hf, metadata, arch, source)
  names = {k: f"{arch}.{v}" for k, v in keys.items()}
  names["rope_scaling.factor"] = f"{arch}.rope.scaling.factor"
  try:
    return from_hf(hf, source=source)
  except ConfigError as err:  # name the GGUF key, not the config.json one it was read into
    pattern = "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True))
    message = re.sub(rf"\b({pattern})\b", lambda m: names[m.group(1)], str(err))
    raise CheckpointError(message) from None


def architecture(metadata: dict[str, Any], source: str) -> str:
  """general.architecture, one that kvjax reads (else CheckpointError naming it)."""
  arch = metadata.get("general.architecture")
  if arch is None:
    raise CheckpointError(f"{source}: no general.architecture in the metadata")
  if arch not in ARCHITECTURES:
    raise CheckpointError(
      f"{source}: general.architecture {arch!r} is not supported; kvjax reads "
      f"{sorted(ARCHITECTURES)}"
    )
  return arch


def _per_model(value, key: str, source: str):
  """A metadata value that may be given per layer (an array): its one value when all layers
  agree; layers of different sizes are refused."""
  if isinstance(value, np.ndarray):
    if value.size == 0 or (value != value.flat[0]).any():
      raise CheckpointError(
        f"{source}: {key} varies by layer ({value.tolist()}); kvjax needs one value for every layer"
      )
    return value.flat[0].item()
  return value


def _vocab_size(metadata: dict[str, Any], source: str) -> int:
  tokens = metadata.get("tokenizer.ggml.tokens")
  if not isinstance(tokens, list):
    raise CheckpointError(
      f"{source}: no vocabulary size: neither {{architecture}}.vocab_size nor "
      "tokenizer.ggml.tokens is in the metadata"
    )
  return len(tokens)


def _rope_scaling(metadata: dict[str, Any], arch: str, source: str) -> dict | None:
  """rope_scaling from {arch}.rope.scaling.type and .factor (or the older rope.scale_linear)."""
  kind = metadata.get(f"{arch}.rope.scaling.type", "none")
  if kind not in ROPE_SCALING:
    raise CheckpointError(
      f"{source}: {arch}.rope.scaling.type {kind!r} is not supported; kvjax reads {ROPE_SCALING}"
    )
  if kind == "linear":
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    if factor is None:
      raise CheckpointError(
        f"{source}: {arch}.rope.scaling.type is 'linear' but there is no {arch}.rope.scaling.factor"
      )
    return {"rope_type": "linear", "factor": factor}
  legacy = metadata.get(f"{arch}.rope.scale_linear")
  if legacy is not None and legacy != 1.0:
    return {"rope_type": "linear", "factor": legacy}
  return None


def _assumed(hf: dict[str, Any], metadata: dict[str, Any], arch: str, source: str) -> dict:
  """What llama.cpp assumes for the architecture where the file says nothing (module doc)."""
  if arch == "qwen3moe":
    return _assumed_experts(hf, arch, source)
  if arch != "gemma3":
    return {}
  L = hf.get("num_hidden_layers")
  out: dict[str, Any] = {"rope_local_base_freq": hf.get("rope_local_base_freq", 10000.0)}
  pattern = metadata.get(f"{arch}.attention.sliding_window_pattern", 6)
  if isinstance(L, int) and L >= 1:
    out["layer_types"] = _layer_types(
      pattern, L, f"{arch}.attention.sliding_window_pattern", source
    )
  D, N = hf.get("hidden_size"), hf.get("num_attention_heads")
  H = hf.get("head_dim")
  if L == 62 and isinstance(D, int) and isinstance(N, int) and N >= 1:  # Gemma 3 27B
    out["query_pre_attn_scalar"] = D / N
  elif H is not None:
    out["query_pre_attn_scalar"] = H
  return out


def _assumed_experts(hf: dict[str, Any], arch: str, source: str) -> dict:
  """Qwen3-MoE as llama.cpp runs it: the top-k weights renormalised, and where
  expert_feed_forward_length is absent or 0, experts of width feed_forward_length //
  expert_used_count."""
  out: dict[str, Any] = {"norm_topk_prob": hf.get("norm_topk_prob", True)}
  width = hf.get("moe_intermediate_size", 0)
  F, k = hf.get("intermediate_size"), hf.get("num_experts_per_tok")
  if width == 0 and is_int(F) and is_int(k) and k >= 1:
    out["moe_intermediate_size"] = F // k
  elif not (is_int(width) and width >= 0):
    raise CheckpointError(
      f"{source}: {arch}.expert_feed_forward_length must be an int >= 1 (absent or 0: "
      f"{arch}.feed_forward_length / {arch}.expert_used_count); got {width!r}"
    )
  return out


def _check_routing(metadata: dict[str, Any], arch: str, source: str) -> None:
  """CheckpointError for a ROUTING key whose value kvjax cannot run."""
  for key, (value, meaning) in ROUTING.items():
    got = metadata.get(f"{arch}.{key}", value)
    if got != value:
      raise CheckpointError(
        f"{source}: {arch}.{key} is {got!r}; kvjax runs {value!r} only ({meaning})"
      )


def _dense_layers(hf: dict[str, Any], tensor_names: set[str]) -> dict:
  """config.json's mlp_only_layers (decoder_sparse_step 1) from the tensors present: the layers
  with a dense MLP's tensors and none of a mixture of experts' (module doc)."""
  L = hf.get("num_hidden_layers")
  if not isinstance(L, int):
    return {}  # from_hf reports it

  def has(i: int, names: tuple[str, ...]) -> bool:
    return any(f"blk.{i}.{n}" in tensor_names for n in names)

  dense = [i for i in range(L) if has(i, DENSE_TENSORS) and not has(i, EXPERT_TENSORS)]
  return {"mlp_only_layers": dense, "decoder_sparse_step": 1}


def _layer_types(pattern, L: int, key: str, source: str) -> list[str]:
  """Gemma 3's layer types: an int n (every n-th layer global) or one flag per layer (true:
  sliding)."""
  if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 1:
    sliding = [(i + 1) % pattern != 0 for i in range(L)]
  elif isinstance(pattern, np.ndarray) and pattern.shape == (L,):
    sliding = [bool(s) for s in pattern]
  else:
    raise CheckpointError(
      f"{source}: {key} must be an int >= 1 or one flag per layer ({L}); got {pattern!r}"
    )
  return ["sliding_attention" if s else "full_attention" for s in sliding]


def _check_head_dims(hf: dict[str, Any], metadata: dict[str, Any], arch: str, source: str):
  """Values and keys must have one head size (attention.value_length = key_length) and RoPE must
  turn the whole head (rope.dimension_count = head_dim): kvjax has no other layout."""
  D, N = hf.get("hidden_size"), hf.get("num_attention_heads")
  H = hf.get("head_dim")
  if H is None and isinstance(D, int) and isinstance(N, int) and N >= 1 and D % N == 0:
    H = D // N
  for key, what in (
    ("attention.value_length", "values"),
    ("rope.dimension_count", "RoPE (partial rotary embeddings are not supported)"),
  ):
    v = metadata.get(f"{arch}.{key}")
    if v is not None and H is not None and v != H:
      raise CheckpointError(
        f"{source}: {arch}.{key} is {v}, but the heads have {H} dims; kvjax needs {what} over "
        "the whole head"
      )
