"""A tiny random model with a byte-level tokenizer: for tests, demos and smoke runs.

    python -m kvjax.lm.tiny OUT_DIR [--family llama] [--seed 0]

writes a Hugging Face format directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) that `kvjax.lm.load` and transformers both read. Its weights are
random, so its text is noise; it exists to exercise the machinery without any download.
"""

from __future__ import annotations

import argparse

from kvjax.lm.config import FAMILIES, Config
from kvjax.lm.model import Model, init, save
from kvjax.lm.tokenizer import Tokenizer

BOS, EOS = "<s>", "</s>"
CHAT_TEMPLATE = (
  "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
  "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer() -> Tokenizer:
  """Byte-level BPE with no merges: ids 0, 1 are <s>, </s>; then the 256 byte symbols."""
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import decoders, models, pre_tokenizers, processors

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {BOS: 0, EOS: 1, **{s: i + 2 for i, s in enumerate(sorted(alphabet))}}
  tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.add_special_tokens([BOS, EOS])
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
  return Tokenizer(tok, bos=BOS, eos=EOS, chat_template=CHAT_TEMPLATE)


def config(family: str = "llama", **overrides) -> Config:
  """A ~0.2M-parameter config of the given family over the 258-token byte vocabulary."""
  base = dict(
    family=family,
    vocab_size=258,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    max_position=1024,
  )
  if family in ("gemma", "gemma2", "gemma3_text"):
    base.update(act="gelu_tanh", norm_plus_one=True, scale_embeddings=True, tie_embeddings=True)
  if family == "gemma2":
    base.update(
      post_norms=True,
      query_pre_attn_scalar=16.0,
      attn_softcap=50.0,
      final_softcap=30.0,
      windows=(32, 0),
    )
  if family == "gemma3_text":  # local layers (own RoPE base); every third and the last global
    L = overrides.get("n_layers", 3)
    base.update(
      n_layers=L,
      post_norms=True,
      qk_norm=True,
      query_pre_attn_scalar=16.0,
      windows=tuple(0 if (i + 1) % 3 == 0 or i == L - 1 else 32 for i in range(L)),
      rope_theta=1e6,
      rope_local_theta=1e4,
      rope_type="linear",
      rope_factor=8.0,
    )
  if family == "qwen2":
    base.update(qkv_bias=True)
  if family == "qwen3":
    base.update(qk_norm=True)
  if family == "phi3":  # fused checkpoint tensors, a window on every layer, longrope
    base.update(
      windows=(16, 16),
      rope_type="longrope",
      rope_original_max_position=1024,
      rope_short_factor=(1.0, 1.5, 1.2, 2.8, 1.1, 2.4, 3.9, 1.7),
      rope_long_factor=(2.0, 3.0, 5.0, 8.0, 11.0, 18.0, 30.0, 41.0),
      rope_attention_factor=1.2,
    )
  if family == "mixtral":
    base.update(n_experts=4, n_experts_per_tok=2, ffn_dim=64, windows=(32, 32))
  if family == "qwen3_moe":  # experts narrower than the dense MLP of every second layer
    L = overrides.get("n_layers", 2)
    base.update(
      qk_norm=True,
      n_experts=4,
      n_experts_per_tok=2,
      moe_ffn_dim=32,
      moe_renormalize=False,
      dense_layers=tuple(range(1, L, 2)),
    )
  base.update(overrides)
  return Config(**base)


def model(family: str = "llama", seed: int = 0, **overrides) -> Model:
  """A random tiny model with the byte tokenizer; eos is </s>."""
  return init(config(family, **overrides), seed=seed, tokenizer=byte_tokenizer(), eos_ids=(1,))


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m kvjax.lm.tiny", description=__doc__.split("\n")[0])
  ap.add_argument("out", help="directory to write")
  ap.add_argument("--family", default="llama", choices=FAMILIES)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  m = model(args.family, args.seed)
  save(m, args.out)
  print(f"wrote a random {args.family} model ({m.cfg.n_params:,} params) to {args.out}")


if __name__ == "__main__":
  main()
