"""Tiny GGUF files written offline with gguf.GGUFWriter, as llama.cpp's converter writes them.

`write(hf_model, path, ...)` converts a tiny random transformers model (hf_models) the way
convert_hf_to_gguf.py does: llama.cpp's tensor names and metadata keys, the "llama"
architecture's Q/K rows permuted, Gemma's norm weights stored as 1 + w, tied embeddings as a
missing output.weight, llama3 RoPE scaling as rope_freqs.weight, Qwen3-MoE's experts stacked
per projection (ffn_{gate,up,down}_exps, [E, ...] in numpy order) with the router as
ffn_gate_inp (a layer in mlp_only_layers keeps ffn_gate/up/down, which llama.cpp's converter
would refuse). `types` picks each 2-D or 3-D tensor's ggml type by name suffix; float and legacy
quantized types quantize the model's weights with gguf.quants, the K-quants (which gguf cannot
quantize) replace them with random blocks of the same scale, so that transformers and kvjax
dequantize the same bits either way.

Tokenizers (TOKENIZERS): "gpt2" writes a byte-level BPE vocabulary of the model's size with real
merges; "spm" a SentencePiece one (bytes, pieces with scores).
"""

import math

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

# Hugging Face layer tensor -> llama.cpp's name (after "blk.{i}.")
LAYER = {
  "input_layernorm": "attn_norm",
  "self_attn.q_proj": "attn_q",
  "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output",
  "self_attn.q_norm": "attn_q_norm",
  "self_attn.k_norm": "attn_k_norm",
  "post_attention_layernorm": "ffn_norm",
  "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down",
  "mlp.gate": "ffn_gate_inp",
}
GEMMA_LAYER = {
  **LAYER,
  "pre_feedforward_layernorm": "ffn_norm",
  "post_attention_layernorm": "post_attention_norm",
  "post_feedforward_layernorm": "post_ffw_norm",
}
ARCH = {
  "llama": "llama",
  "qwen2": "qwen2",
  "qwen3": "qwen3",
  "gemma3_text": "gemma3",
  "qwen3_moe": "qwen3moe",
}
# K-quant block layouts: byte offsets of the f16 super-block scale d and min scale dmin (or None)
K_SCALES = {
  T.Q2_K: (80, 82),
  T.Q3_K: (108, None),
  T.Q4_K: (0, 2),
  T.Q5_K: (0, 2),
  T.Q6_K: (208, None),
}
SPACE = "▁"


def tensors(model, arch: str):
  """(GGUF name, float32 array) for every tensor of a transformers model, converted."""
  cfg = model.config
  layer = GEMMA_LAYER if arch == "gemma3" else LAYER
  for name, p in model.state_dict().items():
    w = p.detach().float().numpy()
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    if ".mlp.experts." in name:
      yield from experts(name, w)
      continue
    if name.startswith("model.layers."):
      i, rest = name[len("model.layers.") :].split(".", 1)
      module, kind = rest.rsplit(".", 1)
      out = f"blk.{i}.{layer[module]}.{kind}"
    else:
      out = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
      }[name]
    if arch == "llama" and out.endswith(("attn_q.weight", "attn_k.weight")):
      heads = cfg.num_attention_heads if "attn_q" in out else cfg.num_key_value_heads
      w = permute(w, heads)
    if arch == "gemma3" and out.endswith("norm.weight"):
      w = w + 1
    yield out, w


def experts(name: str, w: np.ndarray):
  """transformers 5's fused experts of one layer as llama.cpp stores them: gate_up_proj
  [E, 2F, D] -> ffn_gate_exps and ffn_up_exps [E, F, D]; down_proj [E, D, F] -> ffn_down_exps."""
  i = name.split(".")[2]
  if name.endswith("gate_up_proj"):
    F = w.shape[1] // 2
    yield f"blk.{i}.ffn_gate_exps.weight", w[:, :F]
    yield f"blk.{i}.ffn_up_exps.weight", w[:, F:]
  else:
    yield f"blk.{i}.ffn_down_exps.weight", w


def permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's converter: each head's rows from (2, H/2) halves to (H/2, 2) pairs."""
  rows = w.shape[0]
  return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, qtype, rng) -> np.ndarray:
  """w's bytes in qtype (a K-quant: random blocks scaled to w's standard deviation)."""
  if qtype == T.F32:
    return w.astype(np.float32)
  if qtype == T.F16:
    return w.astype(np.float16)
  if qtype in K_SCALES:
    return random_blocks(w.shape, qtype, rng, scale=float(w.std()))
  return quantize(w.astype(np.float32), qtype)


def random_blocks(shape, qtype, rng, scale: float = 1.0) -> np.ndarray:
  """Random bytes of a tensor of `shape` in K-quant qtype, scaled so that its values have about
  `scale` as their standard deviation (every f16 scale finite)."""
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  blocks = rng.integers(0, 256, (*shape[:-1], shape[-1] // block, size), dtype=np.uint8)
  d_at, dmin_at = K_SCALES[qtype]

  def set_scales(d: float) -> None:
    for at, value in ((d_at, d), (dmin_at, d / 2)):
      if at is not None:
        blocks[..., at : at + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)

  raw = blocks.reshape(*shape[:-1], -1)  # a view: set_scales writes through
  set_scales(1.0)
  set_scales(scale / float(dequantize(raw, qtype).std()))
  return raw


def write(
  model,
  path: str,
  *,
  types: dict[str, object] | None = None,
  tokenizer: str = "gpt2",
  pre: str = "smollm",
  metadata: dict | None = None,
  drop: tuple[str, ...] = (),
  extra: dict[str, np.ndarray] | None = None,
  llama3_rope: dict | None = None,
  seed: int = 0,
) -> str:
  """Writes `model` (a transformers model of hf_models) as a GGUF file at path; returns path.
  types: GGUF name suffix -> ggml type for 2-D and 3-D tensors (default F32). metadata: keys to
  add or (value None) remove. drop: tensors left out. extra: tensors added (float32).
  llama3_rope: Llama 3 scaling (factor, low/high_freq_factor, original_max_position_embeddings)
  written as rope_freqs.weight."""
  cfg = model.config
  arch = ARCH[cfg.model_type]
  rng = np.random.default_rng(seed)
  keys = {**_metadata(cfg, arch), **_tokenizer(tokenizer, cfg.vocab_size, pre, arch)}
  for key, value in (metadata or {}).items():
    if value is None:
      keys.pop(key, None)
    else:
      keys[key] = value
  w = gguf.GGUFWriter(path, keys.pop("general.architecture", arch))
  for key, value in keys.items():
    _add(w, key, value)
  out = dict(tensors(model, arch))
  if llama3_rope:
    out["rope_freqs.weight"] = llama3_divisors(cfg, **llama3_rope)
  out.update(extra or {})
  for name, value in out.items():
    if name in drop:
      continue
    qtype = next((t for s, t in (types or {}).items() if name.endswith(s)), T.F32)
    qtype = qtype if value.ndim >= 2 else T.F32
    data = encode(value, qtype, rng)
    w.add_tensor(name, data, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _add(w, key: str, value) -> None:
  """One metadata key, typed as llama.cpp's converter types it."""
  if isinstance(value, bool):
    w.add_bool(key, value)
  elif isinstance(value, int):
    w.add_uint32(key, value)
  elif isinstance(value, float):
    w.add_float32(key, value)
  elif isinstance(value, str):
    w.add_string(key, value)
  elif isinstance(value, tuple):  # (value, GGUFValueType): an explicit type
    w.add_key_value(key, *value)
  else:
    w.add_array(key, value)


def _metadata(cfg, arch: str) -> dict:
  """The architecture keys convert_hf_to_gguf.py writes for the model's config."""
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
  out = {
    "general.name": f"tiny {arch}",
    f"{arch}.block_count": cfg.num_hidden_layers,
    f"{arch}.context_length": cfg.max_position_embeddings,
    f"{arch}.embedding_length": cfg.hidden_size,
    f"{arch}.feed_forward_length": cfg.intermediate_size,
    f"{arch}.attention.head_count": cfg.num_attention_heads,
    f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
    f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
    f"{arch}.rope.freq_base": float(cfg.rope_parameters.get("rope_theta", 10000.0))
    if "full_attention" not in (cfg.rope_parameters or {})
    else float(cfg.rope_parameters["full_attention"]["rope_theta"]),
  }
  if arch == "llama":
    out[f"{arch}.rope.dimension_count"] = head_dim
    out[f"{arch}.vocab_size"] = cfg.vocab_size
  if getattr(cfg, "head_dim", None):  # the converter writes a config.json's head_dim
    out[f"{arch}.attention.key_length"] = head_dim
    out[f"{arch}.attention.value_length"] = head_dim
  if arch == "gemma3":
    out[f"{arch}.attention.sliding_window"] = cfg.sliding_window
  if arch == "qwen3moe":  # norm_topk_prob has no key: llama.cpp assumes true
    out[f"{arch}.expert_count"] = cfg.num_experts
    out[f"{arch}.expert_used_count"] = cfg.num_experts_per_tok
    out[f"{arch}.expert_feed_forward_length"] = cfg.moe_intermediate_size
  return out


def llama3_divisors(
  cfg, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
):
  """rope_freqs.weight as convert_hf_to_gguf.py computes it for Llama 3's RoPE scaling."""
  dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
  base = cfg.rope_parameters.get("rope_theta", 10000.0)
  freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  low, high = (
    original_max_position_embeddings / low_freq_factor,
    (original_max_position_embeddings / high_freq_factor),
  )
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < high:
      out.append(1.0)
    elif wavelen > low:
      out.append(factor)
    else:
      smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
      )
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(out, np.float32)


# ---------------------------------------------------------------------------------------------
# tokenizers

# byte-level merges; as in SmolLM2's vocabulary, none joins a digit to anything
MERGES = [
  ("Ġ", "t"),
  ("h", "e"),
  ("i", "n"),
  ("e", "r"),
  ("a", "n"),
  ("Ġ", "a"),
  ("r", "e"),
  ("o", "n"),
  ("Ġt", "he"),
  ("e", "n"),
  ("o", "r"),
  ("Ġ", "s"),
  ("Ġ", "w"),
  ("a", "t"),
  ("Ġ", "o"),
  ("i", "s"),
  ("e", "s"),
  ("Ġ", "c"),
  ("i", "t"),
  ("Ġ", "b"),
  ("Ġ", "f"),
  ("a", "r"),
  ("e", "d"),
  ("Ġ", "p"),
  ("in", "g"),
  ("o", "u"),
  ("Ġ", "m"),
  ("a", "l"),
  ("Ġ", "d"),
  ("l", "e"),
  ("Ġ", "Â"),
  ("Ġ", "Ġ"),
  ("ĠĠ", "ĠĠ"),
  ("Ċ", "Ċ"),
  ("Ġa", "nd"),
  ("n", "d"),
  ("Ġt", "o"),
  ("Ġo", "f"),
  ("Ġ", "("),
  ("(", "x"),
  ("Ã", "©"),
  ("Ġ", "ä"),
  ("e", "x"),
  ("Ġw", "or"),
  ("Ġs", "p"),
]


def _tokenizer(kind: str, vocab: int, pre: str, arch: str) -> dict:
  return {"gpt2": _gpt2, "spm": _spm}[kind](vocab, pre, arch)


def _gpt2(vocab: int, pre: str, arch: str) -> dict:
  """Byte-level BPE: <|endoftext|>, <|im_start|>, <|im_end|> (control), the 256 byte symbols,
  MERGES' results, then user-defined and control padding tokens up to `vocab`."""
  from tokenizers import pre_tokenizers

  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet]
  tokens += [a + b for a, b in MERGES if a + b not in tokens]
  types = [3, 3, 3] + [1] * (len(tokens) - 3)
  tokens += ["<think>", "</think>"]
  types += [4, 4]
  while len(tokens) < vocab:
    tokens.append(f"<|reserved_{len(tokens)}|>")
    types.append(3)
  assert len(tokens) == vocab, (len(tokens), vocab)
  return {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": pre,
    "tokenizer.ggml.tokens": tokens,
    "tokenizer.ggml.token_type": types,
    "tokenizer.ggml.merges": [f"{a} {b}" for a, b in MERGES],
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
    "tokenizer.ggml.unknown_token_id": 0,
    "tokenizer.ggml.padding_token_id": 2,
    "tokenizer.ggml.add_bos_token": False,
    "tokenizer.chat_template": (
      "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
  }


PIECES = [  # (piece, score): SentencePiece pieces, merged best score first
  (SPACE, -1.0),
  ("e", -2.0),
  ("t", -2.1),
  ("a", -2.2),
  ("h", -2.3),
  ("o", -2.4),
  ("n", -2.5),
  ("s", -2.6),
  ("r", -2.7),
  ("i", -2.8),
  ("l", -2.9),
  ("d", -3.0),
  ("1", -3.1),
  ("2", -3.2),
  ("x", -3.3),
  ("é", -3.4),
  ("\n", -3.5),
  (SPACE + "t", -4.0),
  ("he", -4.1),
  ("in", -4.2),
  ("er", -4.3),
  (SPACE + "a", -4.4),
  ("an", -4.5),
  ("re", -4.6),
  ("on", -4.7),
  (SPACE + "the", -5.0),
  ("en", -5.1),
  ("or", -5.2),
  (SPACE + "s", -5.3),
  ("at", -5.4),
  (SPACE * 2, -5.5),
  (SPACE + "and", -5.6),
  ("nd", -5.7),
  ("es", -5.8),
  ("12", -5.9),
  (SPACE + "x", -6.0),
  ("hé", -6.1),
  ("ll", -6.2),
  ("hell", -6.3),
  ("hello", -6.4),
  ("lo", -6.45),
]


def _spm(vocab: int, pre: str, arch: str) -> dict:
  """SentencePiece BPE: the special tokens, the 256 byte tokens, PIECES, then control padding.
  Llama files: <unk> <s> </s>, merges by score, a space prefix. Gemma files as llama.cpp writes
  Gemma's: <pad> <eos> <bos> <unk> <mask>, merges by file position (every score 0 here), no
  space prefix, runs of spaces stored with real spaces as user-defined tokens."""
  gemma = arch == "gemma3"
  specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] if gemma else ["<unk>", "<s>", "</s>"]
  tokens = specials + [f"<0x{b:02X}>" for b in range(256)]
  types = [2 if t == "<unk>" else 3 for t in specials] + [6] * 256
  scores = [0.0] * len(tokens)
  for piece, score in PIECES:
    spaces = gemma and piece == SPACE * len(piece) and len(piece) > 1
    tokens.append(" " * len(piece) if spaces else piece)
    scores.append(0.0 if gemma else score)
    types.append(4 if spaces else 1)
  tokens += ["<start_of_turn>", "<end_of_turn>"]
  scores += [-1000.0, -1000.0]
  types += [3, 3]
  while len(tokens) < vocab:
    tokens.append(f"<unused{len(tokens)}>")
    scores.append(-1000.0)
    types.append(3)
  ids = {t: i for i, t in enumerate(tokens)}
  bos, eos = ("<bos>", "<eos>") if gemma else ("<s>", "</s>")
  out = {
    "tokenizer.ggml.model": "llama",
    "tokenizer.ggml.pre": "default",
    "tokenizer.ggml.tokens": tokens,
    "tokenizer.ggml.scores": scores,
    "tokenizer.ggml.token_type": types,
    "tokenizer.ggml.bos_token_id": ids[bos],
    "tokenizer.ggml.eos_token_id": ids[eos],
    "tokenizer.ggml.unknown_token_id": ids["<unk>"],
    "tokenizer.ggml.add_bos_token": True,
    "tokenizer.ggml.add_space_prefix": not gemma,
  }
  if gemma:
    out["tokenizer.ggml.padding_token_id"] = ids["<pad>"]
  return out
