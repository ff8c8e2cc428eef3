"""GGUF files (llama.cpp's format) against transformers reading the same file, one tiny file per
architecture and tensor type, written offline as llama.cpp's converter writes them (gguf_files).

Both sides dequantize the same bits to float32, so quantized files are held to the float
tolerance (1e-4 on O(1) logits). What transformers' GGUF loader does not read (Llama 3's
rope_freqs.weight, a rope.scaling.type) is checked against kvjax reading the source checkpoint,
itself parity-tested against transformers (test_parity.py). `lm.save` of a GGUF model writes a
Hugging Face directory that transformers and `lm.load` read back to the same logits.
"""

import dataclasses
import os
import shutil

import gguf_files
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from hf_models import hf_model, prompts

from kvjax import lm

QUANTIZED = {  # every quantized type, on a llama whose rows are whole K-quant blocks (256)
  "token_embd.weight": T.Q8_0,
  "attn_q.weight": T.Q4_0,
  "attn_k.weight": T.Q4_1,
  "attn_v.weight": T.Q5_0,
  "attn_output.weight": T.Q5_1,
  "ffn_gate.weight": T.Q2_K,
  "ffn_up.weight": T.Q3_K,
  "ffn_down.weight": T.Q4_K,
  "output.weight": T.Q6_K,
  "blk.0.ffn_up.weight": T.Q5_K,
}
GEMMA3 = dict(
  head_dim=256, num_hidden_layers=6, query_pre_attn_scalar=256, sliding_window_pattern=6
)
# name -> (family, hf_models overrides, gguf_files.write keywords); transformers reads these
CASES = {
  "llama-f32": ("llama", dict(rope_scaling=None, rope_theta=10000.0), {}),
  "llama-quantized": (
    "llama",
    dict(rope_scaling=None, hidden_size=256, intermediate_size=512),
    dict(types=QUANTIZED),
  ),
  "qwen2-f16": ("qwen2", dict(rope_scaling=None), dict(pre="qwen2", types={"weight": T.F16})),
  "qwen3-bf16-tied": (
    "qwen3",
    dict(head_dim=128, use_sliding_window=False, tie_word_embeddings=True),
    dict(pre="qwen2", types={"weight": T.BF16}),
  ),
  "gemma3-f32": ("gemma3_text", {**GEMMA3, "rope_parameters": None}, dict(tokenizer="spm")),
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """name -> (GGUF path, transformers source model), written once."""
  made = {}

  def get(name):
    if name not in made:
      family, overrides, keywords = CASES[name]
      hf = hf_model(family, **overrides)
      path = str(tmp_path_factory.mktemp(name) / f"{name}.gguf")
      made[name] = (gguf_files.write(hf, path, **keywords), hf)
    return made[name]

  return get


def torch_logits(model, tokens) -> np.ndarray:
  with torch.inference_mode():
    return model(torch.tensor(tokens)).logits.float().numpy()


def transformers_gguf(path):
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
  ).eval()


TOKENS = np.array(prompts(lengths=(24, 24)))  # longer than the sliding windows (12)


@pytest.mark.parametrize("name", CASES)
def test_logits_equal_transformers_reading_the_same_file(files, name):
  path, _ = files(name)
  model = lm.load(path)
  assert model.dtype == jnp.float32
  err = np.abs(lm.score(model, TOKENS) - torch_logits(transformers_gguf(path), TOKENS)).max()
  assert err <= 1e-4, f"max |logit error| {err:.3g}"


@pytest.mark.parametrize("name", ["llama-f32", "gemma3-f32"])
def test_float_file_holds_the_source_checkpoint(files, name, tmp_path):
  """Undoing llama.cpp's Q/K permutation and Gemma's 1 + w gives back the source params (Gemma's
  norms to float32 rounding of 1 + w), and the config the source's config.json gives."""
  path, hf = files(name)
  hf.save_pretrained(tmp_path)
  ours, source = lm.load(path), lm.load(str(tmp_path))
  assert ours.cfg == in_float32(source.cfg)
  want = dict(flatten(source.params()))
  for key, value in flatten(ours.params()):
    np.testing.assert_allclose(value, want[key], rtol=0, atol=1e-7 if "norm" in key else 0)


def in_float32(cfg):
  """cfg as a GGUF file states it: its norm epsilon a float32."""
  return dataclasses.replace(cfg, norm_eps=float(np.float32(cfg.norm_eps)))


def flatten(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from flatten(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}", np.asarray(v)


@pytest.mark.parametrize("head_dim", [16, 64])  # one divisor in the smoothed band, three
def test_llama3_rope_from_rope_freqs(tmp_path, head_dim):
  """Llama 3's RoPE scaling, stored as rope_freqs.weight, is fitted back to the source's llama3
  parameters: the same logits as the source checkpoint (transformers' GGUF loader ignores it)."""
  hf = hf_model("llama", head_dim=head_dim)  # llama3: factor 8, low 1, high 4, original 64
  scaling = {k: v for k, v in hf.config.rope_parameters.items() if k not in ("rope_type", "type")}
  scaling.pop("rope_theta", None)
  path = gguf_files.write(hf, str(tmp_path / "l3.gguf"), llama3_rope=scaling)
  hf.save_pretrained(tmp_path / "hf")
  ours, source = lm.load(path), lm.load(str(tmp_path / "hf"))
  assert (ours.cfg.rope_type, ours.cfg.rope_original_max_position) == ("llama3", 64)
  np.testing.assert_allclose(
    [ours.cfg.rope_factor, ours.cfg.rope_low_freq_factor, ours.cfg.rope_high_freq_factor],
    [8.0, 1.0, 4.0],
    rtol=1e-6,
  )
  err = np.abs(lm.score(ours, TOKENS) - lm.score(source, TOKENS)).max()
  assert err <= 1e-4, f"max |logit error| {err:.3g}"


def test_gemma3_linear_rope_scaling_on_global_layers(tmp_path):
  """gemma3.rope.scaling.type linear scales the global layers only (local: plain RoPE, base
  10000), as the source's per-layer-type rope_parameters say."""
  hf = hf_model("gemma3_text", **GEMMA3)  # full_attention: linear x8, theta 1e6
  keys = {"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}
  path = gguf_files.write(hf, str(tmp_path / "g.gguf"), tokenizer="spm", metadata=keys)
  hf.save_pretrained(tmp_path / "hf")
  ours, source = lm.load(path), lm.load(str(tmp_path / "hf"))
  assert ours.cfg == in_float32(source.cfg)
  err = np.abs(lm.score(ours, TOKENS) - torch_logits(hf, TOKENS)).max()
  assert err <= 1e-4, f"max |logit error| {err:.3g}"


def test_dtype_and_directory_and_tokenizer(files, tmp_path):
  """dtype casts the dequantized params; a directory holding one .gguf loads it; the model
  carries the file's tokenizer, chat template and end-of-generation ids."""
  path, _ = files("llama-f32")
  f32 = lm.load(path)
  shutil.copy(path, tmp_path / "model.gguf")
  bf16 = lm.load(str(tmp_path), dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.bfloat16 and bf16.path == str(tmp_path / "model.gguf")
  for (_, a), (_, b) in zip(flatten(f32.params()), flatten(bf16.params())):
    np.testing.assert_array_equal(a.astype(jnp.bfloat16), b)
  assert f32.eos_ids == (2,) and f32.tokenizer.eos == "<|im_end|>"
  prompt = f32.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
  assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  assert f32.tokenizer.encode(prompt)[:1] == [1]  # <|im_start|>, kept whole


@pytest.mark.parametrize("name", ["gemma3-f32", "llama-quantized"])
def test_saved_as_hugging_face_directory(files, name, tmp_path):
  """lm.save writes config.json, safetensors and the tokenizer files: transformers reads them to
  the same logits and tokens, and lm.load back to the same model."""
  import transformers

  path, _ = files(name)
  model = lm.load(path)
  lm.save(model, str(tmp_path))
  back = lm.load(str(tmp_path))
  assert back.cfg == model.cfg and back.eos_ids == model.eos_ids
  for (_, a), (_, b) in zip(flatten(model.params()), flatten(back.params())):
    np.testing.assert_array_equal(a, b)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  err = np.abs(lm.score(model, TOKENS) - torch_logits(hf, TOKENS)).max()
  assert err <= 1e-4, f"max |logit error| {err:.3g}"
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  text = "hello  the world, 12 x\n\nand <start_of_turn> é"
  assert tok.encode(text) == model.tokenizer.encode(text) == back.tokenizer.encode(text)
  assert tok.chat_template == model.tokenizer.chat_template
  assert (tok.bos_token, tok.eos_token) == (model.tokenizer.bos, model.tokenizer.eos)
