"""A config.json (and a Config built directly) that is wrong gets a ConfigError naming the key,
what it holds and what was expected; a present value is never replaced by a default."""

import functools
import json
import os
import shutil

import pytest
from helpers import edit_json, edit_tensors, load_fails, raises, write

from kvjax import lm
from kvjax.lm import tiny


def test_missing_directory(tmp_path):
  path = str(tmp_path / "nope")
  load_fails(FileNotFoundError, path, None, path, "not a model directory", "config.json")


def test_config_missing(broken):
  os.remove(os.path.join(broken, "config.json"))
  load_fails(lm.ConfigError, broken, None, broken, "no config.json")


def test_config_invalid_json(broken):
  write(broken, "config.json", '{"model_type": "llama",')
  load_fails(lm.ConfigError, broken, "config.json", "invalid JSON")


def test_config_not_an_object(broken):
  write(broken, "config.json", "[1, 2]")
  load_fails(lm.ConfigError, broken, "config.json", "expected a JSON object", "list")


def test_unknown_model_type(broken):
  edit_json(broken, "config.json", lambda c: c.update(model_type="gpt2"))
  load_fails(
    lm.ConfigError, broken, "config.json", "model_type 'gpt2' is not supported", "llama", "gemma2"
  )


def test_unsupported_rope_type(broken):
  edit_json(broken, "config.json", lambda c: c["rope_parameters"].update(rope_type="yarn"))
  load_fails(lm.ConfigError, broken, "config.json", "rope type 'yarn' is not supported", "llama3")


@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "intermediate_size"])
def test_missing_required_field(broken, key):
  edit_json(broken, "config.json", lambda c: c.pop(key))
  file = os.path.join(broken, "config.json")
  msg = load_fails(lm.ConfigError, broken, None, file, f"missing required field {key!r}")
  assert msg.count(file) == 1, msg


@pytest.mark.parametrize(
  "key,value", [("hidden_size", "64"), ("num_hidden_layers", 0), ("vocab_size", 320.0)]
)
def test_size_field_not_a_positive_int(broken, key, value):
  edit_json(broken, "config.json", lambda c: c.update({key: value}))
  load_fails(lm.ConfigError, broken, "config.json", f"{key} must be an int >= 1", f"got {value!r}")


def test_kv_heads_not_dividing_heads(broken):
  edit_json(broken, "config.json", lambda c: c.update(num_key_value_heads=3))
  load_fails(
    lm.ConfigError,
    broken,
    "config.json",
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
  load_fails(lm.ConfigError, broken, "config.json", f"{name} must be {expected}", f"got {value!r}")


@pytest.mark.parametrize("key", ["attention_bias", "mlp_bias", "tie_word_embeddings"])
def test_flag_not_a_bool(broken, key):
  edit_json(broken, "config.json", lambda c: c.update({key: 1}))
  file = os.path.join(broken, "config.json")
  msg = load_fails(lm.ConfigError, broken, None, file, f"{key} must be true or false")
  assert msg.count(file) == 1, msg


def test_config_rope_scaling_factor_checked(broken):
  edit_json(
    broken, "config.json", lambda c: c["rope_parameters"].update(rope_type="linear", factor=0.0)
  )
  load_fails(
    lm.ConfigError, broken, None, "rope_scaling.factor must be a finite number > 0", "got 0.0"
  )


def test_config_null_means_default(broken):
  """transformers reads a null num_key_value_heads / head_dim as "absent": so does kvjax."""
  from kvjax.lm import hf_config

  with open(os.path.join(broken, "config.json")) as f:
    hf = json.load(f)
  cfg = hf_config.from_hf({**hf, "num_key_value_heads": None, "head_dim": None})
  assert (cfg.n_kv_heads, cfg.head_dim) == (
    hf["num_attention_heads"],
    hf["hidden_size"] // hf["num_attention_heads"],
  )


def test_config_head_dim_not_derivable(broken):
  edit_json(
    broken, "config.json", lambda c: (c.pop("head_dim", None), c.update(num_attention_heads=3))
  )
  load_fails(
    lm.ConfigError,
    broken,
    None,
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
  from kvjax.lm import hf_config

  return {**hf_config.to_hf(tiny.config("gemma3_text")), **changes}


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
  from kvjax.lm import hf_config

  raises(lm.ConfigError, lambda: hf_config.from_hf(gemma3_hf(**changes), G3), G3, *parts)


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
  load_fails(
    lm.ConfigError,
    broken,
    "config.json",
    "per-layer-type rope_parameters are only read for gemma3_text",
    "'llama'",
  )


def test_qwen_window_layers_domain():
  from kvjax.lm import hf_config

  hf = {
    **hf_config.to_hf(tiny.config("qwen3")),
    "use_sliding_window": True,
    "sliding_window": 8,
    "max_window_layers": -1,
  }
  raises(
    lm.ConfigError,
    lambda: hf_config.from_hf(hf, G3),
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
  from kvjax.lm import hf_config

  cfg = tiny.config(family, **changes)
  raises(lm.ConfigError, lambda: hf_config.to_hf(cfg), *parts)


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
  from kvjax.lm import hf_config

  for cfg in (
    tiny.config(n_experts=4, n_experts_per_tok=2),  # a llama with experts
    tiny.config("mixtral", moe_renormalize=False),
  ):
    raises(
      lm.ConfigError,
      functools.partial(hf_config.to_hf, cfg),
      "no config.json form for family",
      f"{cfg.family!r}",
    )


@pytest.fixture
def broken_moe(hf_dir, tmp_path):
  """A fresh copy of the tiny mixtral checkpoint (4 experts, top-2, 3 layers)."""
  return shutil.copytree(hf_dir("mixtral"), str(tmp_path / "moe"))


def test_config_experts_per_token_named_by_its_key(broken_moe):
  edit_json(broken_moe, "config.json", lambda c: c.update(num_experts_per_tok=5))
  load_fails(
    lm.ConfigError,
    broken_moe,
    "config.json",
    "num_experts_per_tok must be an int in [1, num_local_experts=4]; got 5",
  )


def test_missing_expert_tensor(broken_moe):
  name = "model.layers.2.block_sparse_moe.experts.3.w2.weight"
  edit_tensors(broken_moe, lambda t: t.pop(name))
  load_fails(
    lm.CheckpointError, broken_moe, None, f"missing tensor {name!r}", "expected shape [64, 128]"
  )


def test_extra_expert_tensor(broken_moe):
  """A checkpoint with more experts than config.json's num_local_experts is refused."""
  w1 = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
  extra = "model.layers.0.block_sparse_moe.experts.4.w1.weight"
  edit_tensors(broken_moe, lambda t: t.update({extra: t[w1]}))
  load_fails(lm.CheckpointError, broken_moe, None, "1 tensor(s) that a mixtral model", repr(extra))
