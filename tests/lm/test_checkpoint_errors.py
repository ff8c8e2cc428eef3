"""Weights that are missing, misshapen, corrupt, non-finite or split over bad shards get a
CheckpointError naming the tensor or file; Phi-3's fused tensors and longrope fields are named by
their own keys; a bfloat16 checkpoint loads as stored or cast."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cli, edit_json, edit_tensors, load_fails, raises, write

from kvjax import lm
from kvjax.lm import tiny

UP1 = "model.layers.1.mlp.up_proj.weight"  # [F, D] = [128, 64] in the tiny HF llama
IDS = [[0, 5, 17, 300, 42, 9, 2, 77, 123, 250, 3, 8]]


def test_missing_tensor(broken):
  edit_tensors(broken, lambda t: t.pop(UP1))
  load_fails(
    lm.CheckpointError, broken, None, broken, f"missing tensor {UP1!r}", "expected shape [128, 64]"
  )


def test_tensor_with_wrong_shape(broken):
  edit_tensors(broken, lambda t: t.update({UP1: t[UP1][:100]}))
  load_fails(
    lm.CheckpointError,
    broken,
    "model.safetensors",
    repr(UP1),
    "shape [100, 64]",
    "config.json implies [128, 64]",
  )


def test_unexpected_extra_tensor(broken):
  edit_tensors(broken, lambda t: t.update({"model.layers.3.mlp.up_proj.weight": t[UP1]}))
  load_fails(
    lm.CheckpointError,
    broken,
    None,
    broken,
    "1 tensor(s)",
    "'model.layers.3.mlp.up_proj.weight'",
    "llama",
  )


def test_integer_tensor(broken):
  edit_tensors(broken, lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}))
  load_fails(
    lm.CheckpointError,
    broken,
    "model.safetensors",
    "'model.norm.weight'",
    "dtype int32",
    "floating-point",
  )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_named(broken, bad):
  """One NaN / Inf in one norm vector is enough to make every logit NaN: refused at load,
  naming the tensor; check_finite=False (--no-check-finite) loads it anyway."""

  def poison(t):
    w = np.array(t["model.layers.1.input_layernorm.weight"])
    w[7] = bad
    t["model.layers.1.input_layernorm.weight"] = w

  edit_tensors(broken, poison)
  load_fails(
    lm.CheckpointError,
    broken,
    "model.safetensors",
    "'model.layers.1.input_layernorm.weight'",
    "1 non-finite value(s)",
    "of 64",
    "check_finite=False",
  )
  loaded = lm.load(broken, check_finite=False)
  assert not np.isfinite(np.asarray(loaded.params()["blocks"]["attn_norm"]["scale"])).all()
  code, out, err = cli("generate", "--model", broken, "--prompt", "hi", "--max-new-tokens", 2)
  assert code == 1 and out == "" and "non-finite" in err and "Traceback" not in err
  assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(broken, how):
  file = os.path.join(broken, "model.safetensors")
  with open(file, "rb") as f:
    data = f.read()
  bad = {"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file", "empty": b""}
  write(broken, "model.safetensors", bad[how])
  load_fails(lm.CheckpointError, broken, None, file, "not a readable safetensors file")


def test_no_weights(broken):
  os.remove(os.path.join(broken, "model.safetensors"))
  load_fails(
    lm.CheckpointError, broken, None, broken, "no model.safetensors", "model.safetensors.index.json"
  )


def test_load_dtype_must_be_float(src):
  raises(ValueError, lambda: lm.load(src, dtype=jnp.int8), "floating-point dtype", "int8")


QKV1 = "model.layers.1.self_attn.qkv_proj.weight"  # [(N + 2K) H, D] = [128, 64] in the tiny phi3


GATE_UP0 = "model.layers.0.mlp.gate_up_proj.weight"  # [2F, D] = [256, 64]


@pytest.fixture
def phi3(hf_dir, tmp_path):
  """A fresh copy of the tiny phi3 checkpoint (3 layers, head_dim 16, longrope) to break."""
  return shutil.copytree(hf_dir("phi3"), str(tmp_path / "phi3"))


def test_fused_tensor_checks_name_the_fused_tensor(phi3):
  file = os.path.join(phi3, "model.safetensors")
  edit_tensors(phi3, lambda t: t.pop(GATE_UP0))
  load_fails(
    lm.CheckpointError, phi3, None, f"missing tensor {GATE_UP0!r}", "expected shape [256, 64]"
  )
  edit_tensors(phi3, lambda t: t.update({QKV1: t[QKV1][:96]}))  # read before any gate_up
  load_fails(
    lm.CheckpointError,
    phi3,
    None,
    file,
    repr(QKV1),
    "shape [96, 64]",
    "config.json implies [128, 64]",
  )


def test_fused_tensor_non_finite_is_named(phi3):
  def poison(t):
    w = np.array(t[GATE_UP0])
    w[200, 3] = np.nan  # in the up half
    t[GATE_UP0] = w

  edit_tensors(phi3, poison)
  load_fails(lm.CheckpointError, phi3, None, repr(GATE_UP0), "1 non-finite value(s)")


@pytest.mark.parametrize(
  "key,value,parts",
  [
    (
      "short_factor",
      [1.0] * 7,
      [
        "rope_scaling.short_factor must be a tuple of 8 finite numbers > 0 (head_dim / 2)",
        "got (1.0,",
      ],
    ),
    ("long_factor", [1.0] * 7 + [0], ["rope_scaling.long_factor must be a tuple of 8", "0)"]),
    ("short_factor", [1.0] * 7 + [float("nan")], ["rope_scaling.short_factor must be", "nan"]),
    ("short_factor", "1.0", ["rope_scaling.short_factor must be a list of numbers", "'1.0'"]),
    ("long_factor", None, ["rope_scaling.long_factor must be a list of numbers", "None"]),
    ("attention_factor", -1.0, ["rope_scaling.attention_factor must be a finite number > 0"]),
    ("factor", "4", ["rope_scaling.factor must be a finite number > 0", "'4'"]),
    ("partial_rotary_factor", 0.5, ["rope_scaling.partial_rotary_factor 0.5 is not supported"]),
    ("rope_type", "linear", ["rope type 'linear' is not supported for model_type 'phi3'"]),
  ],
)
def test_longrope_fields_named(phi3, key, value, parts):
  edit_json(phi3, "config.json", lambda c: c["rope_parameters"].update({key: value}))
  load_fails(lm.ConfigError, phi3, "config.json", *parts)


def test_longrope_serves_the_short_regime_only(phi3):
  """max_position_embeddings 512 is capped at original_max_position_embeddings 128 (past it,
  transformers re-rotates every position with the long factors; a cache cannot)."""
  model = lm.load(phi3, weights=False)
  assert (model.cfg.max_position, model.cfg.rope_original_max_position) == (128, 128)
  raises(
    ValueError, lambda: lm.generate(model, [5] * 100, max_new_tokens=29), "context of 128 positions"
  )
  raises(
    lm.ConfigError,
    lambda: tiny.config("phi3", max_position=2048),
    "max_position (2048) must be <= rope_original_max_position (1024)",
    "short-factor",
  )
  raises(
    lm.ConfigError,
    lambda: tiny.config(rope_short_factor=(1.0,) * 8),
    "rope_short_factor must be () unless rope_type is 'longrope'",
  )
  raises(
    lm.ConfigError,
    lambda: tiny.config("phi3", windows=(16, 0)),
    "phi3 has one sliding_window for every layer",
    "windows=(16, 0)",
  )
  edit_json(phi3, "config.json", lambda c: c.update(attention_bias=True, mlp_bias=True))
  assert lm.load(phi3, weights=False).cfg == model.cfg  # Phi-3's Linears ignore both
  edit_json(phi3, "config.json", lambda c: c.update(model_type="llama"))
  load_fails(
    lm.ConfigError, phi3, None, "rope type 'longrope' is not supported for model_type 'llama'"
  )


@pytest.fixture(scope="module")
def sharded(src, tmp_path_factory):
  """The same weights, written by transformers in shards of at most 100KB."""
  import transformers

  path = str(tmp_path_factory.mktemp("sharded"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(src)
  hf.save_pretrained(path, max_shard_size="100KB")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(src, name), path)
  return path


def shards(path):
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    return sorted(set(json.load(f)["weight_map"].values()))


def test_sharded_loads_like_single_file(model, sharded):
  assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
  assert len(shards(sharded)) > 1
  np.testing.assert_array_equal(lm.score(lm.load(sharded), IDS), lm.score(model, IDS))


def test_sharded_index_names_absent_shard(sharded, tmp_path):
  d = shutil.copytree(sharded, str(tmp_path / "model"))
  gone = shards(d)[1]
  os.remove(os.path.join(d, gone))
  load_fails(
    lm.CheckpointError, d, "model.safetensors.index.json", f"names shard {gone!r}", "not in"
  )


def test_sharded_index_invalid_json(sharded, tmp_path):
  d = shutil.copytree(sharded, str(tmp_path / "model"))
  write(d, "model.safetensors.index.json", '{"weight_map": {"model.norm.weight": ')
  load_fails(lm.CheckpointError, d, "model.safetensors.index.json", "not a valid safetensors index")


@pytest.mark.parametrize("text", ['{"metadata": {}}', '{"weight_map": ["a.safetensors"]}'])
def test_sharded_index_without_weight_map(sharded, tmp_path, text):
  d = shutil.copytree(sharded, str(tmp_path / "model"))
  write(d, "model.safetensors.index.json", text)
  load_fails(lm.CheckpointError, d, "model.safetensors.index.json", "weight_map")


def test_sharded_index_points_at_wrong_shard(sharded, tmp_path):
  d = shutil.copytree(sharded, str(tmp_path / "model"))
  index = "model.safetensors.index.json"
  with open(os.path.join(d, index)) as f:
    weight_map = json.load(f)["weight_map"]
  wrong = next(f for f in shards(d) if f != weight_map["model.norm.weight"])
  edit_json(d, index, lambda c: c["weight_map"].update({"model.norm.weight": wrong}))
  load_fails(lm.CheckpointError, d, wrong, "cannot read tensor 'model.norm.weight'")


def test_corrupt_shard(sharded, tmp_path):
  d = shutil.copytree(sharded, str(tmp_path / "model"))
  bad = shards(d)[0]
  write(d, bad, b"\x00" * 16)
  load_fails(lm.CheckpointError, d, bad, "not a readable safetensors file")


def test_bf16_checkpoint_dtype(src, model, tmp_path):
  from safetensors.flax import load_file as load_jax
  from safetensors.flax import save_file as save_jax

  d = shutil.copytree(src, str(tmp_path / "bf16"))
  f32 = load_jax(os.path.join(src, "model.safetensors"))
  save_jax(
    {k: v.astype(jnp.bfloat16) for k, v in f32.items()},
    os.path.join(d, "model.safetensors"),
    metadata={"format": "pt"},
  )
  ref = model
  kept, cast = lm.load(d), lm.load(d, dtype=jnp.float32)
  assert kept.dtype == jnp.bfloat16 and cast.dtype == jnp.float32
  assert {a.dtype for a in jax.tree.leaves(kept.params())} == {jnp.dtype(jnp.bfloat16)}
  assert {a.dtype for a in jax.tree.leaves(cast.params())} == {jnp.dtype(jnp.float32)}
  for a, b, r in zip(
    jax.tree.leaves(kept.params()), jax.tree.leaves(cast.params()), jax.tree.leaves(ref.params())
  ):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(r.astype(jnp.bfloat16)))
  logits, want = lm.score(kept, IDS), lm.score(ref, IDS)
  assert np.isfinite(logits).all()
  assert np.abs(logits - want).max() < 0.05 * np.abs(want).max()
