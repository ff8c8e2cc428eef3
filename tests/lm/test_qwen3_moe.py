"""Qwen3-MoE's own pieces, each against transformers or the checkpoint's tensors: which layers
keep a dense MLP, its config.json keys, the fused expert layout, and the per-layer views of a
model whose dense and mixture layers stack apart (`decoder.stack_blocks`) as the methods take
them (a layer range, an EAGLE head's copied top layer, LoRA deltas, the sinks diagnostic)."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import raises
from hf_models import prompts
from safetensors.numpy import load_file, save_file

from kvjax import coprocessor, lm, speculative
from kvjax.lm import hf_config, tiny
from kvjax.lm.decoder import layer_block, layer_slice
from kvjax.speculative.head import check

SMALL = dict(
  vocab_size=32,
  hidden_size=8,
  intermediate_size=16,
  moe_intermediate_size=4,
  num_attention_heads=2,
  num_key_value_heads=1,
  head_dim=4,
  num_experts=4,
  num_experts_per_tok=2,
)


@pytest.fixture(scope="module")
def model(hf_dir):
  """The tiny qwen3_moe checkpoint of the parity tests: layers experts, experts, dense,
  experts (mlp_only_layers [2]); expert width 48, dense width 128."""
  return lm.load(hf_dir("qwen3_moe"))


@pytest.mark.parametrize(
  "layers,step,mlp_only",
  [(4, 1, []), (5, 2, []), (6, 3, [0, 4]), (4, 1, [3, 1]), (3, 2, [1]), (2, 1, [0, 1])],
)
def test_dense_layers_are_the_ones_transformers_builds(layers, step, mlp_only):
  """Config.moe_layers, from config.json's mlp_only_layers and decoder_sparse_step, names the
  layers that transformers' Qwen3MoeDecoderLayer gives a sparse MoE block; to_hf writes them
  back (as indices, step 1) so that transformers builds the same layers again."""
  import transformers
  from transformers.models.qwen3_moe import modeling_qwen3_moe as q

  hf = transformers.Qwen3MoeConfig(
    **SMALL, num_hidden_layers=layers, decoder_sparse_step=step, mlp_only_layers=mlp_only
  )
  want = tuple(
    isinstance(layer.mlp, q.Qwen3MoeSparseMoeBlock)
    for layer in transformers.Qwen3MoeForCausalLM(hf).model.layers
  )
  cfg = hf_config.from_hf(hf.to_dict())
  assert cfg.moe_layers == want
  assert cfg.dense_layers == tuple(i for i, m in enumerate(want) if not m)
  again = transformers.Qwen3MoeConfig(**hf_config.to_hf(cfg))
  assert hf_config.from_hf(again.to_dict()) == cfg
  assert again.mlp_only_layers == list(cfg.dense_layers) and again.decoder_sparse_step == 1


def test_published_config_json():
  """The keys of a published Qwen3-MoE config.json (num_experts, max_window_layers, null
  mlp_only_layers and sliding_window) at transformers' meaning: every layer sparse, no window;
  expert width moe_intermediate_size, top-k renormalised by norm_topk_prob."""
  hf = dict(
    SMALL,
    model_type="qwen3_moe",
    num_hidden_layers=3,
    num_experts=8,
    norm_topk_prob=True,
    max_window_layers=1,
    use_sliding_window=False,
    sliding_window=None,
    mlp_only_layers=None,
    decoder_sparse_step=1,
  )
  cfg = hf_config.from_hf(hf)
  assert (cfg.n_experts, cfg.n_experts_per_tok, cfg.expert_ffn_dim) == (8, 2, 4)
  assert cfg.moe_renormalize and cfg.qk_norm and cfg.moe_layers == (True,) * 3
  assert cfg.windows == (0, 0, 0) and cfg.ffn_dim == 16
  slide = hf_config.from_hf(dict(hf, use_sliding_window=True, sliding_window=5))
  assert slide.windows == (5, 5, 5)  # every layer, whatever max_window_layers says
  assert hf_config.from_hf({k: v for k, v in hf.items() if k != "num_experts"}).n_experts == 128
  assert not hf_config.from_hf(dict(hf, norm_topk_prob=None)).moe_renormalize


@pytest.mark.parametrize(
  "changes,parts",
  [
    (dict(num_experts_per_tok=9), ["num_experts_per_tok must be an int in [1, num_experts=8]"]),
    (dict(num_experts=0), ["num_experts must be an int >= 1 for family 'qwen3_moe'; got 0"]),
    (dict(decoder_sparse_step=0), ["decoder_sparse_step must be an int >= 1; got 0"]),
    (dict(mlp_only_layers=[1, 3]), ["mlp_only_layers entries must be layer indices in [0, 3)"]),
    (dict(mlp_only_layers=3), ["mlp_only_layers must be a list of layer indices or null"]),
    (
      dict(moe_intermediate_size=0),
      ["moe_intermediate_size must be null (intermediate_size) or an int >= 1"],
    ),
  ],
)
def test_config_json_errors_name_the_key(changes, parts):
  hf = {**SMALL, "model_type": "qwen3_moe", "num_hidden_layers": 3, "num_experts": 8, **changes}
  raises(lm.ConfigError, lambda: hf_config.from_hf(hf, "q/config.json"), "q/config.json", *parts)


def test_what_a_config_json_cannot_say():
  """qwen3_moe writes one window for every layer; mixtral has no expert width or dense layers
  of its own; a dense family has no experts fields."""
  raises(
    lm.ConfigError,
    lambda: hf_config.to_hf(tiny.config("qwen3_moe", windows=(6, 0))),
    "one sliding_window for every layer",
  )
  for changes in (dict(moe_ffn_dim=32), dict(dense_layers=(1,))):
    raises(
      lm.ConfigError,
      lambda changes=changes: hf_config.to_hf(tiny.config("mixtral", **changes)),
      "no config.json form for family 'mixtral'",
    )
  raises(
    lm.ConfigError,
    lambda: tiny.config("qwen3", dense_layers=(1,)),
    "dense_layers must be () without experts",
  )
  raises(
    lm.ConfigError,
    lambda: tiny.config("qwen3_moe", dense_layers=(1, 1)),
    "dense_layers must be a tuple of distinct ascending layer indices in [0, 2)",
  )
  assert tiny.config("qwen3_moe", moe_ffn_dim=128).moe_ffn_dim is None  # = ffn_dim: one form


def test_fused_expert_layout_loads(hf_dir, tmp_path, model):
  """transformers 5's in-memory layout (mlp.experts.gate_up_proj [E, 2F, D], gate rows
  first; mlp.experts.down_proj [E, D, F]) in the mixture layers loads like the per-expert
  tensors save_pretrained writes; the dense layer keeps its gate/up/down_proj."""
  src = hf_dir("qwen3_moe")
  path = shutil.copytree(src, str(tmp_path / "fused"))
  per_expert = load_file(f"{src}/model.safetensors")
  fused = {n: w for n, w in per_expert.items() if ".mlp.experts." not in n}
  for i in (0, 1, 3):
    old = f"model.layers.{i}.mlp.experts.{{}}.{{}}.weight"
    stack = lambda n, old=old: np.stack([per_expert[old.format(e, n)] for e in range(4)])
    fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate(
      [stack("gate_proj"), stack("up_proj")], axis=1
    )
    fused[f"model.layers.{i}.mlp.experts.down_proj"] = stack("down_proj")
  assert "model.layers.2.mlp.gate_proj.weight" in fused
  save_file(fused, f"{path}/model.safetensors", metadata={"format": "pt"})
  jax.tree.map(np.testing.assert_array_equal, lm.load(path).params(), model.params())


def test_each_layer_holds_its_own_tensors(hf_dir, model):
  """layer_block(l) of the stacked params is layer l of the checkpoint: its attention, and
  its router and experts or its dense MLP; a range mixing the kinds is refused."""
  w = load_file(f"{hf_dir('qwen3_moe')}/model.safetensors")
  blocks, cfg = model.decoder.blocks, model.cfg
  for l in range(4):
    blk, pre = layer_block(blocks, cfg, l), f"model.layers.{l}."
    q = w[pre + "self_attn.q_proj.weight"].T.reshape(64, 4, 24)
    np.testing.assert_array_equal(blk.attn.q[...], q)
    if l == 2:
      assert not hasattr(blk, "moe")
      np.testing.assert_array_equal(blk.mlp.down[...], w[pre + "mlp.down_proj.weight"].T)
    else:
      assert not hasattr(blk, "mlp")
      np.testing.assert_array_equal(blk.moe.router[...], w[pre + "mlp.gate.weight"].T)
      up = w[pre + "mlp.experts.3.up_proj.weight"].T
      np.testing.assert_array_equal(blk.moe.up[...][3], up)
  with pytest.raises(ValueError, match=r"layers \[1, 3\) mix dense and mixture"):
    layer_slice(blocks, cfg, 1, 3)


def test_layer_ranges_compose(model):
  """Ranges cut inside and across runs of one MLP kind ([0, 1), [1, 3), [3, 4)) chain to the
  full forward: the same logits, layer inputs and K/V."""
  dec = model.decoder
  tokens = jnp.asarray(prompts(lengths=(9,)))
  full, _ = dec(tokens, return_layer_inputs=True, return_kv=True)
  hidden, inputs, ks = None, [], []
  for r in ((0, 1), (1, 3), (3, 4)):
    x = dict(tokens=tokens) if hidden is None else dict(hidden=hidden)
    out, _ = dec(**x, layers=r, return_layer_inputs=True, return_kv=True)
    hidden = out.hidden
    inputs.append(out.layer_inputs)
    ks.append(out.k)
  np.testing.assert_allclose(out.logits, full.logits, atol=1e-5, rtol=0)
  np.testing.assert_allclose(jnp.concatenate(inputs), full.layer_inputs, atol=1e-5, rtol=0)
  np.testing.assert_allclose(jnp.concatenate(ks), full.k, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_layers", [2, 3])
def test_eagle_head_copies_the_top_layer_of_its_kind(n_layers):
  """A head's one layer has the kind of the target's top layer (tiny.config's qwen3_moe: dense
  in odd layers) and starts as a copy of it; a target with other dense layers is refused."""
  target = tiny.model("qwen3_moe", n_layers=n_layers)
  head = speculative.init_head(target, "eagle1", copy_top_layer=True)
  top_moe = n_layers == 3
  assert head.hc.layer.moe_layers == (top_moe,)
  got, blocks = head.params()["blocks"], target.params()["blocks"]
  kind = "moe" if top_moe else "mlp"
  assert set(got) == set(blocks) - {"mlp" if top_moe else "moe"}
  for name in ("attn", "mlp_norm", kind):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b[-1:]), got[name], blocks[name])
  other = dataclasses.replace(target.cfg, dense_layers=())  # every layer sparse
  raises(speculative.HeadError, lambda: check(head.hc, other), "dense_layers")


def test_coprocessor_lora_adapts_the_dense_layers():
  """LoRA deltas of a mixed base: attention in every layer, the dense MLP in the dense layers
  only ([L_dense, ...]); at b = 0 its generation is the copy's."""
  base = tiny.model("qwen3_moe", n_layers=2)
  lora = coprocessor.init(base, 4, init="lora", seed=5)
  assert lora.params["lora"]["mlp"]["gate"]["a"].shape == (1, 64, 16)
  assert lora.params["lora"]["attn"]["q"]["a"].shape == (2, 64, 16)
  rows = [[5, 9, 12, 40, 7], [44, 2, 90]]
  copy = coprocessor.init(base, 4, seed=5)
  want = coprocessor.generate(base, copy, rows, max_new_tokens=4, stop_tokens=[]).tokens
  assert coprocessor.generate(base, lora, rows, max_new_tokens=4, stop_tokens=[]).tokens == want


def test_sinks_diagnostic_equals_transformers_attentions(hf_dir, model):
  """`kvjax sinks`' attention mass per layer and head equals transformers' own attention
  weights (eager, output_attentions) of every layer, dense and mixture alike."""
  import transformers

  from kvjax.lm.streaming.sinks import attention_mass

  ids = prompts(lengths=(20,))[0]  # longer than the window (12)
  got = attention_mass(model, ids, sink_tokens=3).mass
  hf = transformers.AutoModelForCausalLM.from_pretrained(
    hf_dir("qwen3_moe"), attn_implementation="eager"
  ).eval()
  with torch.inference_mode():
    att = hf(torch.tensor([ids]), output_attentions=True).attentions
  want = np.stack([a[0, :, 3:, :3].sum(-1).mean(-1).numpy() for a in att])
  assert want.shape == got.shape == (4, 4) and want.max() > 0.05
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
