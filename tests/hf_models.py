"""Tiny random Hugging Face models of every supported family, built offline from configs."""

import numpy as np

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2")
VOCAB = 320

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _classes(family):
  import transformers as t
  return {
      "llama": (t.LlamaConfig, t.LlamaForCausalLM, dict(
          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
          rope_theta=500000.0)),
      "mistral": (t.MistralConfig, t.MistralForCausalLM, dict(sliding_window=12)),
      "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM, dict(num_key_value_heads=1)),
      "gemma": (t.GemmaConfig, t.GemmaForCausalLM, dict(head_dim=16)),
      "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM, dict(
          head_dim=16, sliding_window=12, query_pre_attn_scalar=24)),
  }[family]


def hf_model(family: str, seed: int = 0, **overrides):
  """A random transformers model; weights get extra noise so no logit is degenerate."""
  import torch
  config_cls, model_cls, extra = _classes(family)
  torch.manual_seed(seed)
  model = model_cls(config_cls(**{**COMMON, **extra, **overrides})).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


def build(family: str, path: str, seed: int = 0, **overrides) -> str:
  """Saves hf_model(...) with save_pretrained plus the byte tokenizer; returns path."""
  from kvjax.lm.tiny import byte_tokenizer
  hf_model(family, seed, **overrides).save_pretrained(path)
  tok = byte_tokenizer()
  tok.tok.save(f"{path}/tokenizer.json")
  import json
  with open(f"{path}/tokenizer_config.json", "w") as f:
    json.dump({"bos_token": tok.bos, "eos_token": tok.eos, "chat_template": tok.chat_template,
               "tokenizer_class": "PreTrainedTokenizerFast"}, f)
  return path


def prompts(seed: int = 0, lengths=(7, 3, 18, 11)) -> list[list[int]]:
  rng = np.random.RandomState(seed)
  return [rng.randint(2, VOCAB, n).tolist() for n in lengths]
