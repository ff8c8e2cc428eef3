"""Bad input gets a specific exception that says what was wrong, where, and what was expected:
never a traceback from deep inside, a silent truncation, a NaN or an XLA shape error."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_cli import cli

from kvjax import lm
from kvjax.lm import tiny

UP1 = "model.layers.1.mlp.up_proj.weight"  # [F, D] = [128, 64] in the tiny HF llama
IDS = [[0, 5, 17, 300, 42, 9, 2, 77, 123, 250, 3, 8]]


def raises(exc, fn, *parts):
  """fn() raises exactly `exc` (not a subclass or a parent) with every part in its message."""
  with pytest.raises(exc) as info:
    fn()
  assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
  msg = str(info.value)
  missing = [p for p in parts if str(p) not in msg]
  assert not missing, f"{missing} not in message: {msg}"
  return msg


@pytest.fixture(scope="module")
def src(hf_dir):
  return hf_dir("llama")


@pytest.fixture(scope="module")
def model(src):
  """The intact tiny llama: vocab 320, 3 layers, d_model 64, 512 positions, eos 2."""
  return lm.load(src)


@pytest.fixture
def broken(src, tmp_path):
  """A fresh copy of the tiny llama checkpoint to break one file of."""
  return shutil.copytree(src, str(tmp_path / "model"))


def edit_json(d, name, fn):
  file = os.path.join(d, name)
  with open(file) as f:
    data = json.load(f)
  fn(data)
  with open(file, "w") as f:
    json.dump(data, f)


def edit_tensors(d, fn, file="model.safetensors"):
  tensors = load_file(os.path.join(d, file))
  fn(tensors)
  save_file(tensors, os.path.join(d, file), metadata={"format": "pt"})


def write(d, name, text: str | bytes):
  with open(os.path.join(d, name), "wb") as f:
    f.write(text.encode() if isinstance(text, str) else text)


# --- config.json ---------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
  path = str(tmp_path / "nope")
  raises(FileNotFoundError, lambda: lm.load(path), path, "not a model directory", "config.json")


def test_config_missing(broken):
  os.remove(os.path.join(broken, "config.json"))
  raises(lm.ConfigError, lambda: lm.load(broken), broken, "no config.json")


def test_config_invalid_json(broken):
  write(broken, "config.json", '{"model_type": "llama",')
  raises(
    lm.ConfigError, lambda: lm.load(broken), os.path.join(broken, "config.json"), "invalid JSON"
  )


def test_config_not_an_object(broken):
  write(broken, "config.json", "[1, 2]")
  raises(
    lm.ConfigError,
    lambda: lm.load(broken),
    os.path.join(broken, "config.json"),
    "expected a JSON object",
    "list",
  )


def test_unknown_model_type(broken):
  edit_json(broken, "config.json", lambda c: c.update(model_type="gpt2"))
  raises(
    lm.ConfigError,
    lambda: lm.load(broken),
    os.path.join(broken, "config.json"),
    "model_type 'gpt2' is not supported",
    "llama",
    "gemma2",
  )


def test_unsupported_rope_type(broken):
  edit_json(broken, "config.json", lambda c: c["rope_parameters"].update(rope_type="yarn"))
  raises(
    lm.ConfigError,
    lambda: lm.load(broken),
    os.path.join(broken, "config.json"),
    "rope type 'yarn' is not supported",
    "llama3",
  )


@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "intermediate_size"])
def test_missing_required_field(broken, key):
  edit_json(broken, "config.json", lambda c: c.pop(key))
  file = os.path.join(broken, "config.json")
  msg = raises(lm.ConfigError, lambda: lm.load(broken), file, f"missing required field {key!r}")
  assert msg.count(file) == 1, msg


@pytest.mark.parametrize(
  "key,value", [("hidden_size", "64"), ("num_hidden_layers", 0), ("vocab_size", 320.0)]
)
def test_size_field_not_a_positive_int(broken, key, value):
  edit_json(broken, "config.json", lambda c: c.update({key: value}))
  raises(
    lm.ConfigError,
    lambda: lm.load(broken),
    os.path.join(broken, "config.json"),
    f"{key} must be an int >= 1",
    f"got {value!r}",
  )


def test_kv_heads_not_dividing_heads(broken):
  edit_json(broken, "config.json", lambda c: c.update(num_key_value_heads=3))
  raises(
    lm.ConfigError,
    lambda: lm.load(broken),
    os.path.join(broken, "config.json"),
    "num_attention_heads=4 is not a multiple of num_key_value_heads=3",
  )


def test_config_rejects_bad_sizes_directly():
  raises(
    lm.ConfigError, lambda: tiny.config(n_kv_heads=0), "n_kv_heads must be an int >= 1", "got 0"
  )
  raises(lm.ConfigError, lambda: tiny.config(family="gpt2"), "family 'gpt2'")
  raises(lm.ConfigError, lambda: tiny.config(windows=(0,)), "windows has 1 entries for 2 layers")


# Every numeric field is checked for its domain, named by its config.json key; a present value
# is never replaced by a default (only an absent or null one is, as transformers reads it).
@pytest.mark.parametrize(
  "key,value,expected",
  [
    ("num_key_value_heads", 0, "an int >= 1"),
    ("head_dim", 0, "an int >= 1"),
    ("max_position_embeddings", -5, "an int >= 1"),
    ("rms_norm_eps", -1e-6, "a finite number > 0"),
    ("rms_norm_eps", 0, "a finite number > 0"),
    ("rms_norm_eps", float("nan"), "a finite number > 0"),
    ("rms_norm_eps", "1e-6", "a finite number > 0"),
    ("rope_parameters.rope_theta", 0, "a finite number > 0"),
    ("rope_parameters.rope_theta", float("inf"), "a finite number > 0"),
    ("sliding_window", -1, "an int >= 0"),
  ],
)
def test_config_value_outside_its_domain(broken, key, value, expected):
  def put(c):
    table, _, name = key.rpartition(".")
    (c[table] if table else c)[name] = value

  edit_json(broken, "config.json", put)
  name = key.rpartition(".")[2]
  raises(
    lm.ConfigError,
    lambda: lm.load(broken),
    os.path.join(broken, "config.json"),
    f"{name} must be {expected}",
    f"got {value!r}",
  )


def test_config_rope_scaling_factor_checked(broken):
  edit_json(
    broken, "config.json", lambda c: c["rope_parameters"].update(rope_type="linear", factor=0.0)
  )
  raises(
    lm.ConfigError,
    lambda: lm.load(broken),
    "rope_scaling.factor must be a finite number > 0",
    "got 0.0",
  )


def test_config_null_means_default(broken):
  """transformers reads a null num_key_value_heads / head_dim as "absent": so does kvjax."""
  from kvjax.lm import config

  with open(os.path.join(broken, "config.json")) as f:
    hf = json.load(f)
  cfg = config.from_hf({**hf, "num_key_value_heads": None, "head_dim": None})
  assert (cfg.n_kv_heads, cfg.head_dim) == (
    hf["num_attention_heads"],
    hf["hidden_size"] // hf["num_attention_heads"],
  )


def test_config_head_dim_not_derivable(broken):
  edit_json(
    broken, "config.json", lambda c: (c.pop("head_dim", None), c.update(num_attention_heads=3))
  )
  raises(
    lm.ConfigError,
    lambda: lm.load(broken),
    "hidden_size 64 is not a multiple of num_attention_heads 3",
    "no head_dim",
  )


@pytest.mark.parametrize(
  "field,value,expected",
  [
    ("norm_eps", -1.0, "a finite number > 0"),
    ("rope_theta", 0.0, "a finite number > 0"),
    ("rope_factor", float("inf"), "a finite number > 0"),
    ("attn_softcap", 0.0, "null or a finite number > 0"),
    ("query_pre_attn_scalar", -4, "null or a finite number > 0"),
    ("qkv_bias", 1, "true or false"),
    ("windows", (-1, 0), "ints >= 0"),
    ("rope_original_max_position", 0, "an int >= 1"),
  ],
)
def test_config_fields_checked_directly(field, value, expected):
  raises(
    lm.ConfigError,
    lambda: tiny.config(**{field: value}),
    f"{field} must be {expected}",
    f"got {value!r}",
  )


@pytest.mark.parametrize(
  "field,value,expected",
  [
    ("rope_local_theta", 0.0, "null or a finite number > 0"),
    ("rope_local_theta", float("nan"), "null or a finite number > 0"),
    ("rope_local_theta", "1e4", "null or a finite number > 0"),
    ("qk_norm", 1, "true or false"),
  ],
)
def test_new_family_fields_checked_directly(field, value, expected):
  raises(
    lm.ConfigError,
    lambda: tiny.config("gemma3_text", **{field: value}),
    f"{field} must be {expected}",
    f"got {value!r}",
  )


def gemma3_hf(**changes):
  """The tiny gemma3_text config as config.json says it (to_hf), with `changes`."""
  from kvjax.lm import config

  return {**config.to_hf(tiny.config("gemma3_text")), **changes}


G3 = "m/config.json"


@pytest.mark.parametrize(
  "changes,parts",
  [
    (dict(use_bidirectional_attention=True), ["use_bidirectional_attention: true", "causally"]),
    (
      dict(use_bidirectional_attention="yes"),
      ["use_bidirectional_attention must be true or false"],
    ),
    (
      dict(sliding_window=None),
      ["sliding_window must be an int >= 1", "gemma3_text", "sliding_attention layers"],
    ),
    (
      dict(layer_types=None, sliding_window_pattern=0),
      ["sliding_window_pattern must be an int >= 1"],
    ),
    (
      dict(rope_local_base_freq=-1.0),
      ["rope_local_base_freq must be null or a finite number > 0", "got -1.0"],
    ),
    (dict(query_pre_attn_scalar=0), ["query_pre_attn_scalar must be null or a finite number > 0"]),
    (
      dict(
        rope_parameters={
          "full_attention": {"rope_theta": 1e6},
          "sliding_attention": {"rope_type": "linear", "factor": 2.0},
        }
      ),
      ["rope_parameters.sliding_attention.rope_type 'linear' is not supported", "'default'"],
    ),
    (
      dict(rope_parameters={"full_attention": 0, "sliding_attention": {}}),
      ["rope_parameters.full_attention must be an object or null", "got 0"],
    ),
    (
      dict(rope_parameters={"full_attention": {}, "rope_theta": 1e4}),
      ["rope_parameters has both per-layer-type entries and 'rope_theta'"],
    ),
    (
      dict(rope_parameters={"full_attention": {}, "sliding_attention": {"rope_theta": 0}}),
      ["rope_local_base_freq must be null or a finite number > 0", "got 0"],
    ),
  ],
)
def test_gemma3_config_errors(changes, parts):
  from kvjax.lm import config

  raises(lm.ConfigError, lambda: config.from_hf(gemma3_hf(**changes), G3), G3, *parts)


def test_per_layer_type_rope_only_for_gemma3(broken):
  edit_json(
    broken,
    "config.json",
    lambda c: c.update(
      rope_parameters={
        "full_attention": {"rope_theta": 1e6},
        "sliding_attention": {"rope_theta": 1e4},
      }
    ),
  )
  raises(
    lm.ConfigError,
    lambda: lm.load(broken),
    os.path.join(broken, "config.json"),
    "per-layer-type rope_parameters are only read for gemma3_text",
    "'llama'",
  )


def test_qwen_window_layers_domain():
  from kvjax.lm import config

  hf = {
    **config.to_hf(tiny.config("qwen3")),
    "use_sliding_window": True,
    "sliding_window": 8,
    "max_window_layers": -1,
  }
  raises(
    lm.ConfigError,
    lambda: config.from_hf(hf, G3),
    G3,
    "max_window_layers must be an int >= 0",
    "got -1",
  )


@pytest.mark.parametrize(
  "family,changes,parts",
  [
    ("llama", dict(qk_norm=True), ["qk_norm=True cannot be written for family 'llama'"]),
    ("qwen3", dict(qk_norm=False), ["qk_norm=False cannot be written for family 'qwen3'"]),
    (
      "mistral",
      dict(rope_local_theta=1e4),
      ["rope_local_theta=10000.0 cannot be written", "'mistral'"],
    ),
    (
      "gemma3_text",
      dict(rope_local_theta=None),
      ["cannot say rope_local_theta=None", "linear scaling"],
    ),
  ],
)
def test_to_hf_refuses_what_config_json_cannot_say(family, changes, parts):
  from kvjax.lm import config

  cfg = tiny.config(family, **changes)
  raises(lm.ConfigError, lambda: config.to_hf(cfg), *parts)


def test_config_llama3_rope_factors_ordered():
  raises(
    lm.ConfigError,
    lambda: tiny.config(
      rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=4.0, rope_high_freq_factor=4.0
    ),
    "rope_low_freq_factor (4.0) must be below rope_high_freq_factor (4.0)",
  )


@pytest.mark.parametrize(
  "overrides,expected",
  [
    (dict(n_experts_per_tok=5), "n_experts_per_tok must be an int in [1, n_experts=4]; got 5"),
    (dict(n_experts_per_tok=0), "n_experts_per_tok must be an int in [1, n_experts=4]; got 0"),
    (dict(n_experts=-1), "n_experts must be an int >= 0; got -1"),
    (dict(n_experts=0, n_experts_per_tok=0), "n_experts must be an int >= 1 for family 'mixtral'"),
    (dict(n_experts=2.0), "n_experts must be an int >= 0; got 2.0"),
    (dict(moe_renormalize=1), "moe_renormalize must be true or false; got 1"),
    (dict(mlp_bias=True), "mlp_bias is not supported with experts (n_experts > 0)"),
  ],
)
def test_config_expert_fields_checked(overrides, expected):
  raises(lm.ConfigError, lambda: tiny.config("mixtral", **overrides), expected)


def test_config_experts_need_a_moe_family():
  raises(
    lm.ConfigError,
    lambda: tiny.config(n_experts_per_tok=2),
    "n_experts_per_tok must be 0 without experts (n_experts=0: a dense MLP); got 2",
  )
  from kvjax.lm import config

  for cfg in (
    tiny.config(n_experts=4, n_experts_per_tok=2),  # a llama with experts
    tiny.config("mixtral", moe_renormalize=False),
  ):
    raises(
      lm.ConfigError, lambda: config.to_hf(cfg), "no config.json form for family", f"{cfg.family!r}"
    )


@pytest.fixture
def broken_moe(hf_dir, tmp_path):
  """A fresh copy of the tiny mixtral checkpoint (4 experts, top-2, 3 layers)."""
  return shutil.copytree(hf_dir("mixtral"), str(tmp_path / "moe"))


def test_config_experts_per_token_named_by_its_key(broken_moe):
  edit_json(broken_moe, "config.json", lambda c: c.update(num_experts_per_tok=5))
  raises(
    lm.ConfigError,
    lambda: lm.load(broken_moe),
    os.path.join(broken_moe, "config.json"),
    "num_experts_per_tok must be an int in [1, num_local_experts=4]; got 5",
  )


def test_missing_expert_tensor(broken_moe):
  name = "model.layers.2.block_sparse_moe.experts.3.w2.weight"
  edit_tensors(broken_moe, lambda t: t.pop(name))
  raises(
    lm.CheckpointError,
    lambda: lm.load(broken_moe),
    f"missing tensor {name!r}",
    "expected shape [64, 128]",
  )


def test_extra_expert_tensor(broken_moe):
  """A checkpoint with more experts than config.json's num_local_experts is refused."""
  w1 = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
  extra = "model.layers.0.block_sparse_moe.experts.4.w1.weight"
  edit_tensors(broken_moe, lambda t: t.update({extra: t[w1]}))
  raises(
    lm.CheckpointError, lambda: lm.load(broken_moe), "1 tensor(s) that a mixtral model", repr(extra)
  )


# --- safetensors ---------------------------------------------------------------------------------


def test_missing_tensor(broken):
  edit_tensors(broken, lambda t: t.pop(UP1))
  raises(
    lm.CheckpointError,
    lambda: lm.load(broken),
    broken,
    f"missing tensor {UP1!r}",
    "expected shape [128, 64]",
  )


def test_tensor_with_wrong_shape(broken):
  edit_tensors(broken, lambda t: t.update({UP1: t[UP1][:100]}))
  raises(
    lm.CheckpointError,
    lambda: lm.load(broken),
    os.path.join(broken, "model.safetensors"),
    repr(UP1),
    "shape [100, 64]",
    "config.json implies [128, 64]",
  )


def test_unexpected_extra_tensor(broken):
  edit_tensors(broken, lambda t: t.update({"model.layers.3.mlp.up_proj.weight": t[UP1]}))
  raises(
    lm.CheckpointError,
    lambda: lm.load(broken),
    broken,
    "1 tensor(s)",
    "'model.layers.3.mlp.up_proj.weight'",
    "llama",
  )


def test_integer_tensor(broken):
  edit_tensors(broken, lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}))
  raises(
    lm.CheckpointError,
    lambda: lm.load(broken),
    os.path.join(broken, "model.safetensors"),
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
  raises(
    lm.CheckpointError,
    lambda: lm.load(broken),
    os.path.join(broken, "model.safetensors"),
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
  raises(lm.CheckpointError, lambda: lm.load(broken), file, "not a readable safetensors file")


def test_no_weights(broken):
  os.remove(os.path.join(broken, "model.safetensors"))
  raises(
    lm.CheckpointError,
    lambda: lm.load(broken),
    broken,
    "no model.safetensors",
    "model.safetensors.index.json",
  )


def test_load_dtype_must_be_float(src):
  raises(ValueError, lambda: lm.load(src, dtype=jnp.int8), "floating-point dtype", "int8")


# --- Phi-3: fused tensors, longrope ------------------------------------------------------------


QKV1 = "model.layers.1.self_attn.qkv_proj.weight"  # [(N + 2K) H, D] = [128, 64] in the tiny phi3
GATE_UP0 = "model.layers.0.mlp.gate_up_proj.weight"  # [2F, D] = [256, 64]


@pytest.fixture
def phi3(hf_dir, tmp_path):
  """A fresh copy of the tiny phi3 checkpoint (3 layers, head_dim 16, longrope) to break."""
  return shutil.copytree(hf_dir("phi3"), str(tmp_path / "phi3"))


def test_fused_tensor_checks_name_the_fused_tensor(phi3):
  file = os.path.join(phi3, "model.safetensors")
  edit_tensors(phi3, lambda t: t.pop(GATE_UP0))
  raises(
    lm.CheckpointError,
    lambda: lm.load(phi3),
    f"missing tensor {GATE_UP0!r}",
    "expected shape [256, 64]",
  )
  edit_tensors(phi3, lambda t: t.update({QKV1: t[QKV1][:96]}))  # read before any gate_up
  raises(
    lm.CheckpointError,
    lambda: lm.load(phi3),
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
  raises(lm.CheckpointError, lambda: lm.load(phi3), repr(GATE_UP0), "1 non-finite value(s)")


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
  raises(lm.ConfigError, lambda: lm.load(phi3), os.path.join(phi3, "config.json"), *parts)


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
  raises(
    lm.ConfigError,
    lambda: lm.load(phi3),
    "rope type 'longrope' is not supported for model_type 'llama'",
  )


# --- sharded checkpoints -------------------------------------------------------------------------


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
  raises(
    lm.CheckpointError,
    lambda: lm.load(d),
    os.path.join(d, "model.safetensors.index.json"),
    f"names shard {gone!r}",
    "not in",
  )


def test_sharded_index_invalid_json(sharded, tmp_path):
  d = shutil.copytree(sharded, str(tmp_path / "model"))
  write(d, "model.safetensors.index.json", '{"weight_map": {"model.norm.weight": ')
  raises(
    lm.CheckpointError,
    lambda: lm.load(d),
    os.path.join(d, "model.safetensors.index.json"),
    "not a valid safetensors index",
  )


@pytest.mark.parametrize("text", ['{"metadata": {}}', '{"weight_map": ["a.safetensors"]}'])
def test_sharded_index_without_weight_map(sharded, tmp_path, text):
  d = shutil.copytree(sharded, str(tmp_path / "model"))
  write(d, "model.safetensors.index.json", text)
  raises(
    lm.CheckpointError,
    lambda: lm.load(d),
    os.path.join(d, "model.safetensors.index.json"),
    "weight_map",
  )


def test_sharded_index_points_at_wrong_shard(sharded, tmp_path):
  d = shutil.copytree(sharded, str(tmp_path / "model"))
  index = "model.safetensors.index.json"
  with open(os.path.join(d, index)) as f:
    weight_map = json.load(f)["weight_map"]
  wrong = next(f for f in shards(d) if f != weight_map["model.norm.weight"])
  edit_json(d, index, lambda c: c["weight_map"].update({"model.norm.weight": wrong}))
  raises(
    lm.CheckpointError,
    lambda: lm.load(d),
    os.path.join(d, wrong),
    "cannot read tensor 'model.norm.weight'",
  )


def test_corrupt_shard(sharded, tmp_path):
  d = shutil.copytree(sharded, str(tmp_path / "model"))
  bad = shards(d)[0]
  write(d, bad, b"\x00" * 16)
  raises(
    lm.CheckpointError, lambda: lm.load(d), os.path.join(d, bad), "not a readable safetensors file"
  )


# --- tokenizer and generation config -------------------------------------------------------------


@pytest.mark.parametrize("text", ['{"version": "1.0", "model": 3}', '{"version": "1.0", "mod'])
def test_corrupt_tokenizer(broken, text):
  write(broken, "tokenizer.json", text)
  raises(
    lm.TokenizerError,
    lambda: lm.load(broken),
    os.path.join(broken, "tokenizer.json"),
    "not a readable tokenizer",
  )


def test_tokenizer_larger_than_vocab(broken):
  tok = tiny.byte_tokenizer()  # 258 tokens; the checkpoint's vocab_size is 320
  tok.tok.add_tokens([f"<extra_{i}>" for i in range(70)])
  tok.tok.save(os.path.join(broken, "tokenizer.json"))
  raises(
    lm.TokenizerError,
    lambda: lm.load(broken),
    os.path.join(broken, "tokenizer.json"),
    "328 tokens",
    "vocab_size is 320",
  )


def test_eos_token_not_in_vocab(broken):
  edit_json(broken, "tokenizer_config.json", lambda c: c.update(eos_token="<|eot_id|>"))
  raises(
    lm.TokenizerError,
    lambda: lm.load(broken),
    os.path.join(broken, "tokenizer_config.json"),
    "eos_token '<|eot_id|>'",
    "not in the vocabulary",
    os.path.join(broken, "tokenizer.json"),
  )


@pytest.mark.parametrize("eos,bad", [(320, "[320]"), ([1, -1], "[-1]"), ("</s>", "['</s>']")])
def test_generation_config_eos_outside_vocab(broken, eos, bad):
  edit_json(broken, "generation_config.json", lambda c: c.update(eos_token_id=eos))
  raises(
    lm.ConfigError,
    lambda: lm.load(broken),
    os.path.join(broken, "generation_config.json"),
    f"eos_token_id {bad}",
    "[0, 320)",
  )


def test_config_eos_outside_vocab(broken):
  os.remove(os.path.join(broken, "generation_config.json"))
  edit_json(broken, "config.json", lambda c: c.update(eos_token_id=1000))
  raises(
    lm.ConfigError,
    lambda: lm.load(broken),
    os.path.join(broken, "config.json"),
    "eos_token_id [1000]",
    "[0, 320)",
  )


@pytest.mark.parametrize(
  "name,error",
  [("tokenizer_config.json", lm.TokenizerError), ("generation_config.json", lm.ConfigError)],
)
def test_side_file_invalid_json(broken, name, error):
  write(broken, name, "{")
  raises(error, lambda: lm.load(broken), os.path.join(broken, name), "invalid JSON")


# --- dtype ---------------------------------------------------------------------------------------


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


# --- sampling and generation arguments -----------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs,parts",
  [
    (dict(temperature=-1), ("temperature must be 0 (greedy) or a finite number >= 1e-6", "got -1")),
    (dict(temperature=float("inf")), ("temperature", "got inf")),
    (dict(temperature=1e-50), ("temperature", "got 1e-50")),
    (dict(top_k=True), ("top_k must be an int >= 0", "got True")),
    (dict(temperature=float("nan")), ("temperature", "got nan")),
    (dict(top_p=0), ("top_p must be in (0, 1]", "got 0")),
    (dict(top_p=1.5), ("top_p must be in (0, 1]", "got 1.5")),
    (dict(top_k=-1), ("top_k must be an int >= 0", "got -1")),
    (dict(top_k=2.5), ("top_k must be an int >= 0", "got 2.5")),
  ],
)
def test_bad_sampling(kwargs, parts):
  raises(ValueError, lambda: lm.Sampling(**kwargs), *parts)


def test_sampling_needs_key(model):
  raises(
    ValueError,
    lambda: lm.generate(model, "hi", sampling=lm.Sampling(temperature=0.7)),
    "temperature > 0",
    "key=jax.random.key",
  )


@pytest.mark.parametrize("n", [0, -3, 2.0])
def test_bad_max_new_tokens(model, n):
  raises(
    ValueError,
    lambda: lm.generate(model, "hi", max_new_tokens=n),
    "max_new_tokens must be an int >= 1",
    f"got {n!r}",
  )


def test_sampling_must_be_a_sampling(model):
  raises(
    TypeError,
    lambda: lm.generate(model, "hi", sampling={"temperature": 0.5}),
    "kvjax.lm.Sampling",
    "dict",
  )


def test_empty_prompt_list(model):
  raises(ValueError, lambda: lm.generate(model, [], max_new_tokens=2), "prompts is empty")


def test_empty_prompt(model):
  raises(
    ValueError,
    lambda: lm.generate(model, [[5, 6], []], max_new_tokens=2),
    "prompt 1 is empty",
    "at least one token",
  )


@pytest.mark.parametrize("prompt,bad", [([5, 320], "[320]"), ([[5], [-1, 7]], "[-1]")])
def test_token_ids_out_of_range(model, prompt, bad):
  raises(
    ValueError,
    lambda: lm.generate(model, prompt, max_new_tokens=2),
    f"token ids {bad}",
    "outside [0, 320)",
  )


def test_stop_tokens_out_of_range(model):
  raises(
    ValueError,
    lambda: lm.generate(model, [5], max_new_tokens=2, stop_tokens=[1000]),
    "stop_tokens [1000]",
    "outside [0, 320)",
  )


def test_prompt_plus_new_tokens_beyond_context(model):
  raises(
    ValueError,
    lambda: lm.generate(model, [5] * 510, max_new_tokens=5),
    "prompt (510 tokens)",
    "max_new_tokens (5)",
    "context of 512 positions",
  )


def test_text_without_tokenizer(model):
  bare = dataclasses.replace(model, tokenizer=None)
  raises(
    ValueError,
    lambda: lm.generate(bare, "hello", max_new_tokens=2),
    "no tokenizer",
    "pass token ids",
  )
  raises(
    ValueError,
    lambda: lm.generate(bare, [5, 6], max_new_tokens=2, stop=["x"]),
    "stop strings need the model's tokenizer",
  )
  raises(
    ValueError,
    lambda: next(lm.generate_iter(bare, [5, 6], max_new_tokens=2)),
    "stream needs the model's tokenizer",
    "tokenizer=None",
  )


def test_missing_tokenizer_file_is_named(broken):
  os.remove(os.path.join(broken, "tokenizer.json"))
  bare = lm.load(broken)
  assert bare.tokenizer is None
  file = os.path.join(broken, "tokenizer.json")
  raises(
    ValueError,
    lambda: lm.generate(bare, "hello", max_new_tokens=2),
    "a text prompt (pass token ids instead) needs the model's tokenizer",
    f"no {file}",
  )
  raises(
    ValueError,
    lambda: next(lm.generate_iter(bare, [5, 6], max_new_tokens=2)),
    "stream needs the model's tokenizer",
    f"no {file}",
  )


@pytest.mark.parametrize("n", [True, False, 0, -1, 2.0, "3"])
def test_max_new_tokens_must_be_a_positive_int(model, n):
  raises(
    ValueError,
    lambda: lm.generate(model, [[5, 6]], max_new_tokens=n),
    "max_new_tokens must be an int >= 1",
    f"got {n!r}",
  )


def test_score_given_text(model):
  raises(TypeError, lambda: lm.score(model, "hello"), "token ids, not text", "model.tokenizer")
  raises(TypeError, lambda: lm.score(model, ["hello", "there"]), "token ids, not text")


def test_score_3d(model):
  raises(
    ValueError,
    lambda: lm.score(model, np.zeros((1, 2, 3), np.int32)),
    "token_ids must be [T] or [B, T]",
    "(1, 2, 3)",
  )


def test_score_out_of_range(model):
  raises(
    ValueError,
    lambda: lm.score(model, [[1, 2], [3, 999]]),
    "prompt 1",
    "token ids [999]",
    "outside [0, 320)",
  )


# --- decoder forward misuse ----------------------------------------------------------------------


TOKENS = jnp.zeros((2, 5), jnp.int32)
EMBEDS = jnp.zeros((2, 5, 64), jnp.float32)


@pytest.fixture(scope="module")
def decoder(model):
  return model.decoder


def test_decoder_tokens_and_embeds(decoder):
  raises(
    ValueError,
    lambda: decoder(TOKENS, embeds=EMBEDS),
    "exactly one of tokens, embeds, hidden",
    "['tokens', 'embeds']",
  )


def test_decoder_no_input(decoder):
  raises(ValueError, lambda: decoder(), "exactly one of tokens, embeds, hidden", "none")


@pytest.mark.parametrize("layers", [(0, 4), (-1, 2), (1, 1), (2, 1)])
def test_decoder_layer_range_out_of_bounds(decoder, layers):
  raises(ValueError, lambda: decoder(TOKENS, layers=layers), f"layers={layers}", "[0, 3]")


def test_decoder_mid_range_needs_hidden(decoder):
  raises(
    ValueError, lambda: decoder(TOKENS, layers=(1, 2)), "starting at 1", "`hidden`", "not tokens"
  )
  raises(ValueError, lambda: decoder(embeds=EMBEDS, layers=(1, 2)), "starting at 1", "not embeds")
  raises(ValueError, lambda: decoder(hidden=EMBEDS), "`hidden`", "above layer 0")


def test_decoder_mask_shape(decoder):
  raises(
    ValueError,
    lambda: decoder(TOKENS, mask=jnp.ones((2, 5, 4), bool)),
    "mask",
    "bool[2, 5, 4]",
    "shape (2, 5, 5)",
  )
  raises(
    ValueError,
    lambda: decoder(TOKENS, mask=jnp.ones((2, 5, 5))),
    "mask must be a bool",
    "float32[2, 5, 5]",
  )


def test_decoder_positions_shape(decoder):
  raises(
    ValueError,
    lambda: decoder(TOKENS, positions=jnp.zeros((2, 4), jnp.int32)),
    "positions",
    "int32[2, 4]",
    "shape (2, 5)",
  )
  raises(
    ValueError,
    lambda: decoder(TOKENS, positions=jnp.zeros((2, 5))),
    "positions must be a integer array",
    "float32[2, 5]",
  )


def test_decoder_cache_and_n_new_mismatch(decoder):
  from kvjax.cache import KVCache

  cfg = decoder.cfg
  wrong_layers = KVCache.init(
    n_layers=cfg.n_layers + 1, batch=2, size=8, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim
  )
  raises(
    ValueError,
    lambda: decoder(TOKENS, cache=wrong_layers),
    "the cache's slots have shape",
    f"({cfg.n_layers + 1}, 2, {cfg.n_kv_heads}, 8",
  )
  wrong_batch = KVCache.init(
    n_layers=cfg.n_layers, batch=3, size=8, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim
  )
  raises(
    ValueError,
    lambda: decoder(TOKENS, cache=wrong_batch),
    "the cache's slots have shape",
    "a batch of 2",
  )
  raises(
    ValueError, lambda: decoder(TOKENS, n_new=jnp.ones((3,), jnp.int32)), "n_new", "shape (2,)"
  )


def test_prompt_ids_must_be_flat_ints(model):
  raises(
    ValueError,
    lambda: lm.generate(model, [[5.5, 3]], max_new_tokens=2),
    "prompt 0 must be a string or a flat sequence of int token ids",
    "float64",
  )
  raises(
    ValueError,
    lambda: lm.generate(model, [[[1, 2], [3, 4]]], max_new_tokens=2),
    "prompt 0",
    "shape (2, 2)",
  )
  raises(ValueError, lambda: lm.score(model, np.array([1.5, 2.0])), "int token ids")


def test_score_beyond_context():
  small = lm.init(tiny.config(max_position=16))
  raises(ValueError, lambda: lm.score(small, [3] * 20), "20 tokens", "16 positions")


def test_bare_stop_string_is_one_stop_string():
  m = tiny.model(seed=4)
  text = lm.generate(m, "abc", max_new_tokens=12, stop_tokens=[]).texts[0]
  needle = text[4:7]
  out = lm.generate(m, "abc", max_new_tokens=12, stop_tokens=[], stop=needle)
  assert out.texts[0] == text[: text.index(needle)]


@pytest.mark.parametrize("shape", [(2, 5, 32), (5, 64)])
def test_decoder_embeds_width(decoder, shape):
  raises(
    ValueError,
    lambda: decoder(embeds=jnp.zeros(shape)),
    "embeds must be [B, T, 64]",
    f"got {list(shape)}",
  )
  raises(
    ValueError,
    lambda: decoder(hidden=jnp.zeros(shape), layers=(1, 2)),
    "hidden must be [B, T, 64]",
    f"got {list(shape)}",
  )


@pytest.mark.parametrize("tokens", [jnp.zeros((5,), jnp.int32), jnp.zeros((2, 5), jnp.float32)])
def test_decoder_tokens_not_int_matrix(decoder, tokens):
  raises(
    ValueError,
    lambda: decoder(tokens),
    "tokens must be an int array [B, T]",
    f"{tokens.dtype}{list(tokens.shape)}",
  )


def test_artifacts_record_and_check_the_params_they_were_trained_with(tmp_path):
  """A head or coprocessor made for a model records its params fingerprint; a model of the
  same architecture with other weights (a fine-tune) is refused unless allowed (a warning)."""
  from kvjax import coprocessor, speculative

  base = tiny.model("llama", seed=0)
  tuned = base.with_params(jax.tree.map(lambda a: a * 1.01, base.params()))
  speculative.save_head(speculative.init_head(base, "eagle1"), str(tmp_path / "head"))
  coprocessor.save(coprocessor.init(base, 4), str(tmp_path / "cop"))
  assert speculative.load_head(str(tmp_path / "head"), base).hc.target_fingerprint == (
    lm.params_fingerprint(base)
  )
  assert coprocessor.load(str(tmp_path / "cop"), base).cc.base_fingerprint == (
    lm.params_fingerprint(base)
  )
  raises(
    speculative.HeadError,
    lambda: speculative.load_head(str(tmp_path / "head"), tuned),
    "trained against other params",
    "allow_other_params=True",
  )
  raises(
    coprocessor.CoprocessorError,
    lambda: coprocessor.load(str(tmp_path / "cop"), tuned),
    "trained against other params",
    "allow_other_params=True",
  )
  with pytest.warns(UserWarning, match="using it anyway"):
    speculative.load_head(str(tmp_path / "head"), tuned, allow_other_params=True)
  with pytest.warns(UserWarning, match="using it anyway"):
    coprocessor.load(str(tmp_path / "cop"), tuned, allow_other_params=True)
