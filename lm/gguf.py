"""A GGUF file (llama.cpp's model format, as Ollama and LM Studio keep them) as a kvjax checkpoint.

The metadata becomes the Config (`gguf_config`), the tokenizer metadata the Tokenizer
(`gguf_tokenizer`), and each tensor, dequantized to float32 (`gguf_file`), is renamed to its
Hugging Face name (NAMES, LAYER_NAMES) and placed in kvjax's params by the same mapping that
reads a safetensors checkpoint (`checkpoint.from_tensors`). A mixture-of-experts layer
(Qwen3-MoE) holds each projection of all E experts in one tensor, read into transformers 5's
fused layout (`checkpoint.FUSED_EXPERTS`). llama.cpp's converter changes three things on the way
in, which reading undoes:

- the "llama" architecture's Q and K projections have each head's rows permuted (llama.cpp
  rotates interleaved pairs, transformers and kvjax the two halves of the head);
- Gemma's RMSNorm weights are stored as 1 + w (kvjax, like transformers, scales by 1 + w);
- Llama 3's RoPE scaling is stored as its per-frequency divisors, `rope_freqs.weight`, which
  are fitted back to the llama3 parameters (and refused when no parameters reproduce them).

Everything is read and checked before anything is returned: a bad file never loads half.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.lm import checkpoint, gguf_config, gguf_file, gguf_tokenizer
from kvjax.lm.checkpoint import CheckpointError
from kvjax.lm.config import Config
from kvjax.lm.tokenizer import Tokenizer

# GGUF tensor name -> Hugging Face name, outside the layers
NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}
# the layers' tensors: GGUF "blk.{i}.<key>" -> Hugging Face "model.layers.{i}.<value>"
LAYER_NAMES = {
  "attn_norm.weight": "input_layernorm.weight",
  "attn_q.weight": "self_attn.q_proj.weight",
  "attn_k.weight": "self_attn.k_proj.weight",
  "attn_v.weight": "self_attn.v_proj.weight",
  "attn_output.weight": "self_attn.o_proj.weight",
  "attn_q.bias": "self_attn.q_proj.bias",
  "attn_k.bias": "self_attn.k_proj.bias",
  "attn_v.bias": "self_attn.v_proj.bias",
  "attn_q_norm.weight": "self_attn.q_norm.weight",
  "attn_k_norm.weight": "self_attn.k_norm.weight",
  "ffn_norm.weight": "post_attention_layernorm.weight",
  "ffn_gate.weight": "mlp.gate_proj.weight",
  "ffn_up.weight": "mlp.up_proj.weight",
  "ffn_down.weight": "mlp.down_proj.weight",
  # a mixture-of-experts layer: the router [E, D], then each projection of every expert in one
  # tensor (ggml dims [D, F, E] for gate and up, [F, D, E] for down); gate_up_proj [E, 2F, D]
  # is the gate tensor's rows, then the up tensor's (the order of the names here)
  "ffn_gate_inp.weight": "mlp.gate.weight",
  "ffn_gate_exps.weight": "mlp.experts.gate_up_proj",
  "ffn_up_exps.weight": "mlp.experts.gate_up_proj",
  "ffn_down_exps.weight": "mlp.experts.down_proj",
}
# Gemma's four norms per layer: ffn_norm is the one before the MLP
POST_NORM_LAYER_NAMES = {
  **LAYER_NAMES,
  "ffn_norm.weight": "pre_feedforward_layernorm.weight",
  "post_attention_norm.weight": "post_attention_layernorm.weight",
  "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
ROPE_FREQS = "rope_freqs.weight"
PERMUTED = ("llama",)  # architectures whose Q and K rows llama.cpp permutes
NORM_PLUS_ONE = ("gemma3",)  # architectures whose norm weights are stored as 1 + w
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A GGUF file's model: params is the kvjax params pure dict (None when not read)."""

  cfg: Config
  params: dict[str, Any] | None
  tokenizer: Tokenizer
  eos_ids: tuple[int, ...]


def read(path: str, *, dtype=None, weights: bool = True, check_finite: bool = True) -> Checkpoint:
  """Reads the GGUF file at `path`: its config, tokenizer and end-of-generation ids, and with
  weights its params (dequantized, cast to dtype, default float32). check_finite: a tensor
  holding NaN or Inf is a CheckpointError naming it."""
  f = gguf_file.read(path)
  parts = f.metadata.get("split.count", 1)
  if parts != 1:
    raise CheckpointError(
      f"{path}: part {f.metadata.get('split.no', 0) + 1} of a GGUF file split in {parts}; "
      "merge the parts first (llama.cpp's llama-gguf-split --merge)"
    )
  tokenizer = gguf_tokenizer.build(f.metadata, source=path)
  cfg = gguf_config.config(f.metadata, set(f.tensors), source=path)
  if ROPE_FREQS in f.tensors:
    rope = _llama3_rope(f.array(ROPE_FREQS), cfg, f.metadata, path)
    cfg = gguf_config.config(f.metadata, set(f.tensors), source=path, rope=rope)
  params = _params(f, cfg, jnp.dtype(dtype or jnp.float32), check_finite) if weights else None
  return Checkpoint(cfg, params, tokenizer, _eos_ids(f.metadata, cfg.vocab_size, path))


def _params(f: gguf_file.GGUFFile, cfg: Config, dtype, check_finite: bool) -> dict[str, Any]:
  """Every tensor of the file in kvjax's params (CheckpointError for a missing, misshapen,
  non-finite or extra tensor, named as the file names it)."""
  arch = f.metadata["general.architecture"]
  layer_names = POST_NORM_LAYER_NAMES if cfg.post_norms else LAYER_NAMES
  to_gguf = {hf: [g] for g, hf in NAMES.items()}
  to_gguf_layer: dict[str, list[str]] = {}
  for g, hf in layer_names.items():
    to_gguf_layer.setdefault(hf, []).append(g)
  read_names = set()

  def tensor(hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
    m = LAYER.fullmatch(hf_name)
    names = [f"blk.{m[1]}.{g}" for g in to_gguf_layer[m[2]]] if m else to_gguf[hf_name]
    if len(names) == 1:
      parts = [_tensor(f, names[0], shape, check_finite)]
    else:  # the Hugging Face tensor's rows (axis 1) are the GGUF tensors', in order
      part = (shape[0], shape[1] // len(names), *shape[2:])
      parts = [_tensor(f, name, part, check_finite) for name in names]
    read_names.update(names)
    ws = [
      _undo_conversion(w, name, arch, cfg).astype(dtype, copy=False)
      for w, name in zip(parts, names)
    ]
    return ws[0] if len(ws) == 1 else np.concatenate(ws, axis=1)

  params, _ = checkpoint.from_tensors(cfg, tensor, fused=any(cfg.moe_layers))
  extra = sorted(set(f.tensors) - read_names - {ROPE_FREQS})
  if extra:
    shown = ", ".join(repr(n) for n in extra[:5]) + (" ..." if len(extra) > 5 else "")
    raise CheckpointError(
      f"{f.path}: {len(extra)} tensor(s) that a {arch} model with this metadata does not "
      f"have: {shown}"
    )
  return jax.tree.map(jnp.asarray, params)


def _tensor(f: gguf_file.GGUFFile, name: str, shape: tuple[int, ...], check_finite: bool):
  """Tensor `name` of the file, dequantized (float32), checked to have `shape` (numpy order)
  and, with check_finite, no NaN or Inf."""
  if name not in f.tensors:
    raise CheckpointError(
      f"{f.path}: missing tensor {name!r} (expected shape {list(shape)} from the metadata)"
    )
  info = f.tensors[name]
  if info.shape != shape:
    raise CheckpointError(
      f"{f.path}: tensor {name!r} has shape {list(info.shape)} (ggml dims "
      f"{list(reversed(info.shape))}); the metadata implies {list(shape)}"
    )
  w = f.array(name)
  if check_finite and not np.isfinite(w).all():
    raise CheckpointError(
      f"{f.path}: tensor {name!r} holds {int(w.size - np.isfinite(w).sum())} non-finite "
      f"value(s) (NaN or Inf) of {w.size}; load with check_finite=False "
      "(--no-check-finite) to skip this check"
    )
  return w


def _undo_conversion(w: np.ndarray, name: str, arch: str, cfg: Config) -> np.ndarray:
  """w as the Hugging Face checkpoint held it (see the module docstring)."""
  if arch in PERMUTED and name.endswith(("attn_q.weight", "attn_k.weight")):
    heads = cfg.n_heads if name.endswith("attn_q.weight") else cfg.n_kv_heads
    rows, cols = w.shape  # llama.cpp's rows per head: (H/2, 2) pairs; Hugging Face's (2, H/2)
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
  if arch in NORM_PLUS_ONE and name.endswith("norm.weight"):
    return w - np.float32(1)
  return w


def _llama3_rope(freqs: np.ndarray, cfg: Config, metadata: dict, path: str) -> dict | None:
  """The llama3 rope_scaling whose per-frequency divisors are `freqs` [H/2] (what llama.cpp's
  converter writes to rope_freqs.weight), refused unless it reproduces every divisor (float32).
  factor is the largest divisor; between 1 and factor the divisors run through a band where
  smooth = (original / wavelen - low) / (high - low) is a line in 1 / wavelen: two or more band
  divisors fix it (with low = 1), one fixes original given Llama 3's low = 1, high = 4."""
  H = cfg.head_dim
  if freqs.shape != (H // 2,):
    raise CheckpointError(
      f"{path}: tensor {ROPE_FREQS!r} has shape {list(freqs.shape)}; expected [{H // 2}] "
      "(one divisor per RoPE frequency)"
    )
  if metadata.get(f"{metadata['general.architecture']}.rope.scaling.type", "none") != "none":
    raise CheckpointError(f"{path}: both {ROPE_FREQS!r} and a rope.scaling.type; expected one")
  if (freqs == 1).all():
    return None
  wavelen = 2 * math.pi * cfg.rope_theta ** (np.arange(0, H, 2) / H)
  factor = float(freqs.max())
  band = (freqs > 1) & (freqs < factor)
  smooth = (1 / freqs[band] - 1 / factor) / (1 - 1 / factor)
  guesses = [(1.0, 4.0, 8192)]  # Llama 3.1's and 3.2's
  if band.sum() == 1:
    guesses.insert(0, (1.0, 4.0, round(float((3 * smooth[0] + 1) * wavelen[band][0]))))
  elif band.sum() >= 2:
    slope, intercept = np.polyfit(1 / wavelen[band], smooth, 1)  # low 1: intercept -1/(high-1)
    if intercept < 0:
      high = float(1 - 1 / intercept)
      guesses.insert(0, (1.0, high, round(float(slope * (high - 1)))))
  for low, high, original in guesses:
    if np.allclose(_llama3_divisors(wavelen, factor, low, high, original), freqs, rtol=1e-6):
      return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
      }
  raise CheckpointError(
    f"{path}: tensor {ROPE_FREQS!r} holds RoPE divisors that no llama3 scaling reproduces; "
    "kvjax reads llama3 scaling only"
  )


def _llama3_divisors(wavelen, factor: float, low: float, high: float, original: int):
  """llama3 RoPE's per-frequency divisors, as llama.cpp's converter computes them."""
  smooth = (original / wavelen - low) / (high - low)
  band = 1 / ((1 - smooth) / factor + smooth)
  out = np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, band))
  return out.astype(np.float32)


def _eos_ids(metadata: dict, vocab_size: int, path: str) -> tuple[int, ...]:
  """The end-of-generation ids: tokenizer.ggml.eos_token_id, then the end-of-turn and
  end-of-message ids (eot_token_id, eom_token_id) when the file names them."""
  ids = []
  for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
    i = metadata.get(f"tokenizer.ggml.{key}")
    if i is None or i in ids:
      continue
    if type(i) is not int or not 0 <= i < vocab_size:
      raise CheckpointError(
        f"{path}: tokenizer.ggml.{key} {i!r} is not a token id in [0, {vocab_size})"
      )
    ids.append(i)
  return tuple(ids)
