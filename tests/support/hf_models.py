"""Tiny random Hugging Face models of every supported family, built offline from configs.

Weights are drawn at unit gain (each matrix N(0, GAIN^2 / fan_in), biases N(0, BIAS^2), norm
scales their init plus noise), so activations, attention scores and logits are O(1): every
family feature (qkv bias, q/k norms, scaled embeddings, sliding windows, RoPE scaling, Gemma 3's
local RoPE base, both soft-caps) moves the logits by far more than the parity tolerance, and
greedy decoding has clear margins.
The soft-caps are set low (the released Gemma-2 uses 50 and 30) so that they bite at O(1).
"""

import math

import numpy as np

VOCAB = 320

GAIN, BIAS = 1.0, 1.0
ATTN_SOFTCAP, FINAL_SOFTCAP = 3.0, 5.0
# Phi-3's longrope, head_dim 16: uneven short factors (the regime kvjax runs) against a
# pretraining length of 128 > the tests' positions, and max_position 512: attention factor
# sqrt(1 + ln 4 / ln 128) = 1.13 on cos and sin (scores x 1.29).
SHORT = [1.0, 1.6, 1.2, 3.0, 1.1, 2.5, 4.0, 1.8]
LONG = [2.0, 3.5, 6.0, 9.0, 12.0, 20.0, 31.0, 40.0]
COMMON = dict(
  vocab_size=VOCAB,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=3,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=512,
)


# family -> (transformers config class, model class, the config's values besides COMMON)
HF_CLASSES = {
  "llama": (
    "LlamaConfig",
    "LlamaForCausalLM",
    dict(
      rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
      },
      rope_theta=500000.0,
    ),
  ),
  "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=12)),
  "qwen2": (
    "Qwen2Config",
    "Qwen2ForCausalLM",
    dict(num_key_value_heads=1, rope_scaling={"rope_type": "linear", "factor": 4.0}),
  ),
  "qwen3": (
    "Qwen3Config",
    "Qwen3ForCausalLM",
    dict(head_dim=24, use_sliding_window=True, sliding_window=12, max_window_layers=1),
  ),
  "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
  "gemma2": (
    "Gemma2Config",
    "Gemma2ForCausalLM",
    dict(
      head_dim=16,
      sliding_window=12,
      query_pre_attn_scalar=24,
      attn_logit_softcapping=ATTN_SOFTCAP,
      final_logit_softcapping=FINAL_SOFTCAP,
      tie_word_embeddings=False,
    ),
  ),  # gemma ties; a tied head makes greedy repeat a token
  "gemma3_text": (
    "Gemma3TextConfig",
    "Gemma3ForCausalLM",
    dict(
      head_dim=16,
      sliding_window=12,
      sliding_window_pattern=2,
      query_pre_attn_scalar=24,
      rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
      },
      tie_word_embeddings=False,
    ),
  ),  # no soft-caps, as released; layers: local, global, local
  "phi3": (
    "Phi3Config",
    "Phi3ForCausalLM",
    dict(
      sliding_window=12,
      original_max_position_embeddings=128,
      rope_scaling={"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG},
      bos_token_id=0,
      eos_token_id=1,
      pad_token_id=None,
    ),
  ),  # its defaults: ids >= 32000
  "mixtral": (
    "MixtralConfig",
    "MixtralForCausalLM",
    dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=12),
  ),
  "qwen3_moe": (
    "Qwen3MoeConfig",
    "Qwen3MoeForCausalLM",
    dict(
      num_hidden_layers=4,
      head_dim=24,
      num_experts=4,
      num_experts_per_tok=2,
      moe_intermediate_size=48,
      mlp_only_layers=[2],
      use_sliding_window=True,
      sliding_window=12,
    ),
  ),  # layers: experts, experts, dense, experts; norm_topk_prob false (its default)
}


def _classes(family):
  """(config class, model class, extra values) of a family."""
  import transformers

  config_cls, model_cls, extra = HF_CLASSES[family]
  return getattr(transformers, config_cls), getattr(transformers, model_cls), extra


def hf_model(family: str, seed: int = 0, **overrides):
  """A random transformers model at unit gain (see the module docstring)."""
  import torch

  config_cls, model_cls, extra = _classes(family)
  torch.manual_seed(seed)
  model = model_cls(config_cls(**{**COMMON, **extra, **overrides})).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():  # a tied LM head is the embedding, drawn once
      if "norm" in name:  # RMSNorm scales: 1 + noise (Gemma: 0 + noise, it scales by 1 + w)
        p.add_(torch.randn_like(p) * 0.1)
      elif p.ndim == 1:  # qkv biases
        p.normal_(0, BIAS)
      else:  # torch Linear [out, in], fused experts [E, out, in], the embedding [V, D]
        p.normal_(0, GAIN / math.sqrt(p.shape[-1]))
  return model


def build(family: str, path: str, seed: int = 0, **overrides) -> str:
  """Saves hf_model(...) with save_pretrained plus the byte tokenizer; returns path."""
  from kvjax.lm.tiny import byte_tokenizer

  hf_model(family, seed, **overrides).save_pretrained(path)
  tok = byte_tokenizer()
  # ids past the 258 byte tokens are real tokens (not a padded embedding, which kvjax masks)
  tok.tok.add_tokens([f"<extra_{i}>" for i in range(VOCAB - tok.vocab_size)])
  tok.tok.save(f"{path}/tokenizer.json")
  import json

  with open(f"{path}/tokenizer_config.json", "w") as f:
    json.dump(
      {
        "bos_token": tok.bos,
        "eos_token": tok.eos,
        "chat_template": tok.chat_template,
        "tokenizer_class": "PreTrainedTokenizerFast",
      },
      f,
    )
  return path


def prompts(seed: int = 0, lengths=(7, 3, 18, 11)) -> list[list[int]]:
  rng = np.random.RandomState(seed)
  return [rng.randint(2, VOCAB, n).tolist() for n in lengths]
