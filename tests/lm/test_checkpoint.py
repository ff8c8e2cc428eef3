"""Saving and restoring: orbax params checkpoints and Hugging Face format directories."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kvjax import lm
from kvjax.lm import tiny

IDS = np.random.RandomState(0).randint(0, 258, (2, 20))


@pytest.fixture(scope="module")
def models():
  """family -> tiny random model (vocab 258, 2 layers), built once."""
  made = {}

  def get(family):
    if family not in made:
      made[family] = tiny.model(family)
    return made[family]

  return get


def leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- orbax ---------------------------------------------------------------------------------------


def test_orbax_round_trip(models, tmp_path):
  model = models("llama")
  path = str(tmp_path / "ckpt")
  lm.save_params(path, model.params())
  like = jax.eval_shape(model.params)  # shapes and dtypes only: every value comes from disk
  restored = lm.restore_params(path, like)
  leaves_equal(restored, model.params())
  np.testing.assert_array_equal(lm.score(model.with_params(restored), IDS), lm.score(model, IDS))


def test_orbax_saved_in_bfloat16_restores_in_the_likes_dtype(models, tmp_path):
  model = models("llama")
  path = str(tmp_path / "ckpt16")
  lm.save_params(path, model.params(), dtype=jnp.bfloat16)
  restored = lm.restore_params(path, jax.eval_shape(model.params))
  want = jax.tree.map(
    lambda a: np.asarray(a).astype(jnp.bfloat16).astype(np.float32), model.params()
  )
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(restored))
  leaves_equal(restored, want)


def test_orbax_restore_into_other_shape(models, tmp_path):
  path = str(tmp_path / "ckpt")
  lm.save_params(path, models("llama").params())
  with pytest.raises(lm.CheckpointError) as info:
    lm.restore_params(path, jax.eval_shape(lambda: tiny.model(n_layers=3).params()))
  msg = str(info.value)
  assert path in msg and "does not match the model" in msg
  assert "blocks/attn/q: stored [2, 64, 4, 16], model has [3, 64, 4, 16]" in msg
  with pytest.raises(lm.CheckpointError, match="k_bias: missing from the checkpoint"):
    lm.restore_params(path, jax.eval_shape(lambda: tiny.model("qwen2").params()))  # q/k/v biases


def test_orbax_bad_paths(models, tmp_path):
  params = models("llama").params()
  with pytest.raises(lm.CheckpointError, match="no orbax checkpoint directory"):
    lm.restore_params(str(tmp_path / "missing"), params)
  (tmp_path / "empty").mkdir()
  with pytest.raises(lm.CheckpointError, match="not an orbax checkpoint"):
    lm.restore_params(str(tmp_path / "empty"), params)
  with pytest.raises(FileExistsError, match="already exists"):
    lm.save_params(str(tmp_path / "empty"), params)


# --- Hugging Face format -------------------------------------------------------------------------


@pytest.mark.parametrize(
  "family", ["llama", "gemma2", "qwen3", "gemma3_text", "phi3", "mixtral", "qwen3_moe"]
)
def test_save_load_and_transformers(models, family, tmp_path):
  import transformers

  model = models(family)
  path = str(tmp_path / family)
  lm.save(model, path)
  ours = lm.score(model, IDS)
  back = lm.load(path)
  assert back.cfg == model.cfg and back.eos_ids == model.eos_ids
  assert back.tokenizer.encode("Hi there") == model.tokenizer.encode("Hi there")
  leaves_equal(back.params(), model.params())
  np.testing.assert_array_equal(lm.score(back, IDS), ours)
  hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  with torch.inference_mode():
    ref = hf(torch.tensor(IDS)).logits.numpy()
  assert np.abs(ours).max() > 0.1  # not a degenerate model
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_gemma3_config_layouts_read_like_transformers(tmp_path):
  """A transformers 4.x style gemma3_text config.json (rope_theta, rope_local_base_freq,
  rope_scaling, no layer_types: the default pattern of 6) and the 5.x one transformers writes
  from it (per-layer-type rope_parameters, layer_types) give the same Config; to_hf's config
  goes through transformers and back unchanged."""
  import json

  import transformers

  from kvjax.lm import hf_config

  legacy = dict(
    vocab_size=258,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=7,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=12,
    rope_theta=1e6,
    rope_local_base_freq=2e4,
    rope_scaling={"rope_type": "linear", "factor": 8.0},
  )
  cfg = hf_config.from_hf({"model_type": "gemma3_text", **legacy})
  assert cfg.windows == (12, 12, 12, 12, 12, 0, 12)
  assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_type, cfg.rope_factor) == (
    1e6,
    2e4,
    "linear",
    8.0,
  )
  assert cfg.query_pre_attn_scalar == 256 and cfg.tie_embeddings and cfg.qk_norm
  transformers.Gemma3TextConfig(**legacy).save_pretrained(tmp_path)
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert set(saved["rope_parameters"]) == {"full_attention", "sliding_attention"}
  assert hf_config.from_hf(saved) == cfg
  for family in ("gemma3_text", "qwen3"):
    cfg = tiny.config(family, windows=(8, 0, 8) if family == "gemma3_text" else (0, 8))
    hf = hf_config.to_hf(cfg)
    hf_cls = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    assert hf_config.from_hf(hf_cls.to_dict()) == cfg, family


def test_phi3_fused_tensors_written_back(hf_dir, tmp_path):
  """transformers' phi3 -> kvjax -> lm.save: the same tensors (qkv_proj, gate_up_proj fused
  again, bit for bit) and a config.json that reads back to the same Config."""
  from safetensors.numpy import load_file

  src = hf_dir("phi3")
  model = lm.load(src)
  lm.save(model, str(tmp_path / "out"))
  want, got = (load_file(f"{d}/model.safetensors") for d in (src, str(tmp_path / "out")))
  assert "model.layers.2.self_attn.qkv_proj.weight" in got and sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert lm.load(str(tmp_path / "out"), weights=False).cfg == model.cfg


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])
def test_n_params_counts_every_weight(models, family):
  model = models(family)
  assert model.cfg.n_params == sum(a.size for a in jax.tree.leaves(model.params()))


def test_experts_load_from_either_layout(hf_dir, tmp_path):
  """Mixtral's experts load from the per-expert tensors that save_pretrained and published
  checkpoints write (block_sparse_moe.experts.{e}.w1/w2/w3, block_sparse_moe.gate) and from
  transformers 5's fused in-memory layout (mlp.experts.gate_up_proj [E, 2F, D] with gate rows
  first, mlp.experts.down_proj [E, D, F], mlp.gate) alike."""
  import shutil

  from safetensors.numpy import load_file, save_file

  src = hf_dir("mixtral")
  path = shutil.copytree(src, str(tmp_path / "fused"))
  per_expert = load_file(f"{src}/model.safetensors")
  fused = {}
  cfg = lm.load(src).cfg
  for name, w in per_expert.items():
    if ".block_sparse_moe.experts." not in name:
      fused[name.replace(".block_sparse_moe.", ".mlp.")] = w
  for i in range(cfg.n_layers):
    old = f"model.layers.{i}.block_sparse_moe.experts.{{}}.{{}}.weight"

    def stack(n, old=old):
      return np.stack([per_expert[old.format(e, n)] for e in range(cfg.n_experts)])

    fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate(
      [stack("w1"), stack("w3")], axis=1
    )
    fused[f"model.layers.{i}.mlp.experts.down_proj"] = stack("w2")
  save_file(fused, f"{path}/model.safetensors", metadata={"format": "pt"})
  leaves_equal(lm.load(path).params(), lm.load(src).params())
