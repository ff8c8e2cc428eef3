"""Qwen3-MoE GGUF files (`qwen3moe`, llama.cpp's name), written offline as llama.cpp's converter
writes them (gguf_files): the router as blk.{i}.ffn_gate_inp, each projection of every expert in
one tensor (ffn_{gate,up,down}_exps).

transformers reads a qwen3moe file itself but not its expert_feed_forward_length (it keeps
Qwen3MoeConfig's default width, 768, and refuses the tensors), so its load is given the width by
hand. A layer with a dense MLP (mlp_only_layers) has no GGUF key and no place in llama.cpp's
qwen3moe; kvjax reads it from the tensors present (blk.{i}.ffn_gate/up/down), which
transformers' GGUF loader does not map, so such a file is checked against transformers running
the source checkpoint instead, as is a file stating expert_weights_norm false.
"""

import dataclasses
import os

import gguf_files
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from hf_models import hf_model, prompts

from kvjax import lm

WIDTH = 64  # the experts' (moe_intermediate_size): rows of whole Q8_0 blocks (32)
SOURCE = dict(  # 3 layers, 4 experts (top 2), dense width 128, no sliding window (no GGUF key)
  num_hidden_layers=3, moe_intermediate_size=WIDTH, use_sliding_window=False, norm_topk_prob=True
)
TYPES = {"exps.weight": T.Q8_0, "ffn_gate_inp.weight": T.BF16, "weight": T.F16}
TOKENS = np.array(prompts(lengths=(24, 24)))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


@pytest.fixture(scope="module")
def experts_only(tmp_path_factory):
  """(path, source) of a quantized file with experts in every layer, as llama.cpp makes them."""
  hf = hf_model("qwen3_moe", **SOURCE, mlp_only_layers=[])
  path = str(tmp_path_factory.mktemp("moe") / "moe.gguf")
  return gguf_files.write(hf, path, pre="qwen2", types=TYPES), hf


@pytest.fixture(scope="module")
def with_dense(tmp_path_factory):
  """(path, source) of a float32 file whose layer 1 has a dense MLP."""
  hf = hf_model("qwen3_moe", **SOURCE, mlp_only_layers=[1])
  path = str(tmp_path_factory.mktemp("dense") / "dense.gguf")
  return gguf_files.write(hf, path, pre="qwen2"), hf


@pytest.fixture
def write(with_dense, tmp_path):
  """write(**gguf_files.write keywords) -> path of the dense-layer file's source written so."""
  return lambda **kw: gguf_files.write(with_dense[1], str(tmp_path / "bad.gguf"), pre="qwen2", **kw)


def torch_logits(model) -> np.ndarray:
  with torch.inference_mode():
    return model(torch.tensor(TOKENS)).logits.float().numpy()


def max_error(model, hf) -> float:
  return float(np.abs(lm.score(model, TOKENS) - torch_logits(hf)).max())


def test_logits_equal_transformers_reading_the_same_file(experts_only):
  """Q8_0 experts, a bfloat16 router, float16 projections: transformers dequantizes the same
  bits, so the float tolerance holds."""
  import transformers

  path, _ = experts_only
  model = lm.load(path)
  cfg = model.cfg
  assert (cfg.family, cfg.n_experts, cfg.n_experts_per_tok) == ("qwen3_moe", 4, 2)
  assert (cfg.expert_ffn_dim, cfg.moe_renormalize, cfg.moe_layers) == (WIDTH, True, (True,) * 3)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path),
    gguf_file=os.path.basename(path),
    dtype=torch.float32,
    moe_intermediate_size=WIDTH,  # the one key transformers' GGUF loader does not read
  ).eval()
  assert (hf.config.num_experts, hf.config.num_experts_per_tok, hf.config.norm_topk_prob) == (
    4,
    2,
    True,
  )
  err = max_error(model, hf)
  assert err <= 1e-4, f"max |logit error| {err:.3g}"


def test_dense_layer_read_from_the_tensors(with_dense, tmp_path):
  """A layer holding ffn_gate/up/down and no expert tensors is dense: the config and params of
  the source checkpoint (mlp_only_layers [1]), and its logits."""
  path, hf = with_dense
  hf.save_pretrained(tmp_path)
  ours, source = lm.load(path), lm.load(str(tmp_path))
  assert ours.cfg.dense_layers == (1,) and ours.cfg.moe_layers == (True, False, True)
  assert ours.cfg == dataclasses.replace(
    source.cfg, norm_eps=float(np.float32(source.cfg.norm_eps))
  )
  want = dict(flatten(source.params()))
  for key, value in flatten(ours.params()):
    np.testing.assert_array_equal(value, want[key], err_msg=key)
  err = max_error(ours, hf)
  assert err <= 1e-4, f"max |logit error| {err:.3g}"


def test_saved_as_hugging_face_directory(with_dense, tmp_path):
  """lm.save writes mlp_only_layers and the experts: transformers reads them to the same logits,
  lm.load back to the same model."""
  import transformers

  model = lm.load(with_dense[0])
  lm.save(model, str(tmp_path))
  back = lm.load(str(tmp_path))
  assert back.cfg == model.cfg
  for (_, a), (_, b) in zip(flatten(model.params()), flatten(back.params())):
    np.testing.assert_array_equal(a, b)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert hf.config.mlp_only_layers == [1] and hf.config.norm_topk_prob
  err = max_error(model, hf)
  assert err <= 1e-4, f"max |logit error| {err:.3g}"


def test_expert_weights_norm_stated_false_is_followed(tmp_path):
  """llama.cpp renormalises qwen3moe's top-k weights whatever the file says; a file stating
  expert_weights_norm false (a source with norm_topk_prob false) runs unrenormalised, as its
  source does. Without the key the same tensors run renormalised, which moves the logits."""
  hf = hf_model("qwen3_moe", **{**SOURCE, "norm_topk_prob": False}, mlp_only_layers=[])
  stated = gguf_files.write(
    hf, str(tmp_path / "a.gguf"), pre="qwen2", metadata={"qwen3moe.expert_weights_norm": False}
  )
  model = lm.load(stated)
  assert not model.cfg.moe_renormalize
  err = max_error(model, hf)
  assert err <= 1e-4, f"max |logit error| {err:.3g}"
  assumed = lm.load(gguf_files.write(hf, str(tmp_path / "b.gguf"), pre="qwen2"))
  assert assumed.cfg.moe_renormalize and max_error(assumed, hf) > 1e-2


@pytest.mark.parametrize("width", [None, 0])
def test_expert_width_without_its_key(write, width):
  """Without expert_feed_forward_length (or with 0), llama.cpp's width: feed_forward_length /
  expert_used_count (128 / 2 = 64 here)."""
  path = write(metadata={"qwen3moe.expert_feed_forward_length": width})
  assert lm.load(path).cfg.expert_ffn_dim == WIDTH


def test_dtype(experts_only):
  """dtype casts the dequantized experts with everything else."""
  model = lm.load(experts_only[0], dtype=jnp.bfloat16)
  assert model.dtype == jnp.bfloat16
  assert {str(v.dtype) for _, v in flatten(model.params())} == {"bfloat16"}


def flatten(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from flatten(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}", np.asarray(v)


@pytest.mark.parametrize(
  ("metadata", "message"),
  [
    (
      {"qwen3moe.expert_used_count": 5},
      r"qwen3moe.expert_used_count must be an int in \[1, qwen3moe.expert_count=4\]",
    ),
    ({"qwen3moe.expert_count": None}, r"no qwen3moe.expert_count in the metadata"),
    ({"qwen3moe.expert_used_count": None}, r"no qwen3moe.expert_used_count in the metadata"),
    (
      {"qwen3moe.expert_count": 0},
      r"qwen3moe.expert_count must be an int >= 1 for family 'qwen3_moe'; got 0",
    ),
    (
      {"qwen3moe.expert_feed_forward_length": 1.5},
      r"qwen3moe.expert_feed_forward_length must be an int >= 1 \(absent or 0: "
      r"qwen3moe.feed_forward_length / qwen3moe.expert_used_count\); got 1.5",
    ),
    (
      {"qwen3moe.expert_weights_norm": 1},
      r"qwen3moe.expert_weights_norm must be true or false; got 1",
    ),
    (
      {"qwen3moe.expert_gating_func": 2},
      r"qwen3moe.expert_gating_func is 2; kvjax runs 1 only \(softmax over the router's logits\)",
    ),
    ({"qwen3moe.expert_shared_count": 1}, r"qwen3moe.expert_shared_count is 1; kvjax runs 0"),
    ({"qwen3moe.expert_weights_scale": 2.5}, r"qwen3moe.expert_weights_scale is 2.5; kvjax runs"),
  ],
)
def test_expert_metadata_kvjax_cannot_run(write, metadata, message):
  with pytest.raises(lm.CheckpointError, match=r"bad\.gguf: " + message):
    lm.load(write(metadata=metadata), weights=False)


def test_missing_and_misshapen_expert_tensors(write):
  with pytest.raises(
    lm.CheckpointError,
    match=r"missing tensor 'blk.2.ffn_up_exps.weight' \(expected shape \[4, 64, 64\] from the",
  ):
    lm.load(write(drop=("blk.2.ffn_up_exps.weight",)))
  with pytest.raises(
    lm.CheckpointError,
    match=r"tensor 'blk.0.ffn_gate_exps.weight' has shape \[4, 64, 64\] \(ggml dims "
    r"\[64, 64, 4\]\); the metadata implies \[4, 32, 64\]",
  ):
    lm.load(write(metadata={"qwen3moe.expert_feed_forward_length": 32}))
  with pytest.raises(
    lm.CheckpointError,
    match=r"tensor 'blk.0.ffn_gate_inp.weight' has shape \[4, 64\] \(ggml dims \[64, 4\]\); "
    r"the metadata implies \[5, 64\]",
  ):
    lm.load(write(metadata={"qwen3moe.expert_count": 5}))


def test_a_layer_with_both_kinds_of_mlp(write, with_dense):
  """A layer holding expert tensors is a mixture of experts: a dense MLP's tensor beside them is
  refused by name; a dense layer lacking one of its tensors is refused naming it, and one
  lacking all three is read as experts and refused for lacking those."""
  w = with_dense[1].model.layers[1].mlp.up_proj.weight.detach().numpy()
  with pytest.raises(
    lm.CheckpointError,
    match=r"1 tensor\(s\) that a qwen3moe model with this metadata does not have: "
    r"'blk.0.ffn_up.weight'",
  ):
    lm.load(write(extra={"blk.0.ffn_up.weight": w}))
  with pytest.raises(lm.CheckpointError, match=r"missing tensor 'blk.1.ffn_up.weight'"):
    lm.load(write(drop=("blk.1.ffn_up.weight",)))
  with pytest.raises(lm.CheckpointError, match=r"missing tensor 'blk.1.ffn_gate_inp.weight'"):
    lm.load(write(drop=tuple(f"blk.1.{n}.weight" for n in ("ffn_gate", "ffn_up", "ffn_down"))))
