"""Data- and tensor-parallel sharding on 8 simulated CPU devices equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import prompts
from jax.sharding import PartitionSpec as P

from kvjax import lm
from kvjax.lm import sharding
from kvjax.lm.decoder import layer_runs
from kvjax.lm.generate import new_cache

MESHES = {"data4": (4, 1), "model4": (1, 4), "data2_model4": (2, 4)}
# On a 4-way model axis the tiny models' 2 kv heads do not divide: k, v are replicated.
CASES = [
  ("llama", "data4"),
  ("llama", "model4"),
  ("llama", "data2_model4"),
  ("gemma2", "data2_model4"),
  ("qwen3", "data2_model4"),
  ("gemma3_text", "data2_model4"),
  ("phi3", "data2_model4"),
  ("mixtral", "data2_model4"),
  ("qwen3_moe", "data2_model4"),
]  # mixtral, qwen3_moe: 4 experts on 4 shards
ROWS = prompts(lengths=(7, 3, 18, 11))  # 18 > gemma2's sliding window of 12


def mesh(name):
  data, model = MESHES[name]
  return sharding.make_mesh(data, model, jax.devices()[: data * model])


def run(model):
  out = lm.generate(model, ROWS, max_new_tokens=16, stop_tokens=[])
  return out, lm.score(model, ROWS)


@pytest.fixture(scope="module")
def load(hf_dir):
  """family -> the unsharded model, loaded once."""
  made = {}

  def get(family):
    if family not in made:
      made[family] = lm.load(hf_dir(family))
    return made[family]

  return get


@pytest.fixture(scope="module")
def models(load):
  """family -> (unsharded model, its generate result, its score logits), computed once."""
  made = {}

  def get(family):
    if family not in made:
      made[family] = (load(family), *run(load(family)))
    return made[family]

  return get


def spec(variable):
  return variable[...].sharding.spec


@pytest.mark.parametrize("family,mesh_name", CASES)
def test_sharded_equals_unsharded(models, family, mesh_name):
  model, ref, ref_logits = models(family)
  sharded = sharding.shard(model, mesh(mesh_name))
  out, logits = run(sharded)
  assert out.tokens == ref.tokens
  assert all(len(t) == 16 for t in out.tokens)
  for got, want in zip(logits, ref_logits, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # the params really are spread out: each device holds 1/ways of the vocab
  ways = MESHES[mesh_name][1]
  embed = sharded.state["embed"][...]
  assert {s.data.shape for s in embed.addressable_shards} == {
    (model.cfg.vocab_size // ways, model.cfg.d_model)
  }
  # the forward constrains its activations to the same mesh and rules
  assert sharded.decoder.layout == (sharded.mesh, sharded.rules)
  hlo = (
    jax.jit(lambda st: nnx.merge(sharded.graphdef, st)(jnp.zeros((4, 8), jnp.int32))[0].logits)
    .lower(sharded.state)
    .as_text()
  )
  # embeddings, each layer (one scan body per run of layers with one MLP kind), logits
  runs = layer_runs(model.cfg, 0, model.cfg.n_layers)
  assert hlo.count("sharding_constraint") == 2 + len(runs)
  # a second call reuses the executables: shardings are stable from call to call
  again = lm.generate(sharded, ROWS, max_new_tokens=16, stop_tokens=[])
  assert again.tokens == ref.tokens and again.stats["compile_s"] == 0


def test_param_specs(load):
  model = load("llama")  # 4 heads, 2 kv heads, ffn 128, vocab 320
  s4 = sharding.shard(model, mesh("data2_model4")).state
  assert spec(s4["embed"]) == P("model", None)
  assert spec(s4["head"]) == P(None, "model")
  assert spec(s4["blocks"]["attn"]["q"]) == P(None, None, "model", None)
  assert spec(s4["blocks"]["attn"]["o"]) == P(None, "model", None, None)
  assert spec(s4["blocks"]["attn"]["k"]) == P(None, None, None, None)  # 2 kv heads: replicated
  assert spec(s4["blocks"]["mlp"]["gate"]) == P(None, None, "model")
  assert spec(s4["blocks"]["mlp"]["down"]) == P(None, "model", None)
  assert spec(s4["blocks"]["attn_norm"]["scale"]) == P(None, None)
  s2 = sharding.shard(model, sharding.make_mesh(4, 2)).state
  assert spec(s2["blocks"]["attn"]["k"]) == P(None, None, "model", None)
  assert spec(s2["blocks"]["attn"]["v"]) == P(None, None, "model", None)
  s8 = sharding.shard(model, sharding.make_mesh(1, 8)).state  # 4 heads on 8 shards
  assert spec(s8["blocks"]["attn"]["q"]) == P(None, None, None, None)
  assert spec(s8["blocks"]["mlp"]["up"]) == P(None, None, "model")
  assert spec(s8["embed"]) == P("model", None)


def test_expert_specs(load):
  """Experts shard on the model axis when it divides them (expert parallelism: one expert per
  device on 4 shards), else their ffn dimension does."""
  model = load("mixtral")  # 4 experts, ffn 128
  moe = sharding.shard(model, mesh("data2_model4")).state["blocks"]["moe"]
  assert spec(moe["gate"]) == spec(moe["up"]) == P(None, "model", None, None)
  assert spec(moe["down"]) == P(None, "model", None, None)
  assert spec(moe["router"]) == P(None, None, "model")
  assert {s.data.shape for s in moe["gate"][...].addressable_shards} == {(3, 1, 64, 128)}
  moe8 = sharding.shard(model, sharding.make_mesh(1, 8)).state["blocks"]["moe"]
  assert spec(moe8["gate"]) == P(None, None, None, "model")
  assert spec(moe8["down"]) == P(None, None, "model", None)
  assert spec(moe8["router"]) == P(None, None, None)


def test_mixed_layer_specs(load):
  """Qwen3-MoE's dense and mixture layers stack apart ([L_dense, ...], [L_moe, ...]), each
  sharding by its own declared axes: the experts on the model axis, the dense MLP by ffn."""
  state = sharding.shard(load("qwen3_moe"), mesh("data2_model4")).state  # layers M M d M
  moe, mlp = state["blocks"]["moe"], state["blocks"]["mlp"]
  assert spec(moe["gate"]) == spec(moe["down"]) == P(None, "model", None, None)
  assert moe["gate"][...].shape == (3, 4, 64, 48)
  assert spec(mlp["gate"]) == P(None, None, "model") and mlp["gate"][...].shape == (1, 64, 128)
  assert spec(state["blocks"]["attn"]["q"]) == P(None, None, "model", None)
  assert state["blocks"]["attn"]["q"][...].shape == (4, 64, 4, 24)


def test_experts_sharded_decode_one_row(load):
  """One row decodes through the gathered experts form (k=2 of 4 experts per step); sharded
  on the expert axis, it equals one device."""
  model = load("mixtral")
  row = ROWS[2]
  want = lm.generate(model, row, max_new_tokens=8, stop_tokens=[]).tokens
  sharded = sharding.shard(model, mesh("model4"))
  assert lm.generate(sharded, row, max_new_tokens=8, stop_tokens=[]).tokens == want


def test_qkv_bias_specs(load):
  model = load("qwen2")  # q/k/v biases, 1 kv head
  state = sharding.shard(model, sharding.make_mesh(2, 4)).state
  assert spec(state["blocks"]["attn"]["q_bias"]) == P(None, "model", None)
  assert spec(state["blocks"]["attn"]["k_bias"]) == P(None, None, None)


def test_qk_norm_specs(load):
  """Per-head q/k norm scales [L, H] are replicated (no rule shards head_dim)."""
  state = sharding.shard(load("gemma3_text"), sharding.make_mesh(2, 4)).state
  for n in ("q_norm", "k_norm"):
    assert spec(state["blocks"]["attn"][n]["scale"]) == P(None, None)
    assert state["blocks"]["attn"][n]["scale"][...].shape == (3, 16)


def test_custom_rules(load):
  model = load("gemma2")
  sharded = sharding.shard(model, mesh("data2_model4"), rules=(("ffn", "model"),))
  assert sharded.rules == (("ffn", "model"),)
  state = sharded.state
  assert spec(state["embed"]) == P(None, None)
  assert spec(state["blocks"]["attn"]["q"]) == P(None, None, None, None)
  assert spec(state["blocks"]["mlp"]["up"]) == P(None, None, "model")
  cache = new_cache(sharded, 4, 16)
  assert cache.k.sharding.spec == P(None, None, None, None, None)  # no batch rule


def test_new_cache_sharded_on_batch(load):
  model = sharding.shard(load("llama"), sharding.make_mesh(4, 2))
  cache = new_cache(model, 8, 32)
  assert cache.k.sharding.spec == P(None, "data", "model", None, None)
  assert cache.v.sharding.spec == P(None, "data", "model", None, None)
  assert cache.pos.sharding.spec == P("data", None)
  assert cache.length.sharding.spec == P("data")
  assert {s.data.shape for s in cache.k.addressable_shards} == {(3, 2, 1, 32, 16)}
  odd = new_cache(model, 3, 32)  # 3 rows on 4 data shards: replicated along data
  assert odd.k.sharding.spec == P(None, None, "model", None, None)
  assert odd.length.sharding.spec == P(None)
  assert new_cache(load("llama"), 8, 32).k.sharding.is_fully_replicated


def test_logical_spec():
  m = sharding.make_mesh(2, 4)
  assert sharding.logical_spec(("batch", "heads"), (4, 8), m) == P("data", "model")
  assert sharding.logical_spec(("batch", "heads"), (3, 6), m) == P(None, None)
  assert sharding.logical_spec(("layers", "embed"), (3, 64), m) == P(None, None)
  # a mesh axis is used once per array; a rule naming an axis the mesh lacks is ignored
  assert sharding.logical_spec(("heads", "ffn"), (4, 8), m) == P("model", None)
  assert sharding.logical_spec(("batch",), (4,), m, (("batch", "pipe"),)) == P(None)
  both = (("batch", ("data", "model")),)
  assert sharding.logical_spec(("batch",), (8,), m, both) == P(("data", "model"))
  assert sharding.logical_spec(("batch",), (4,), m, both) == P(None)
  with pytest.raises(ValueError, match="do not match shape"):
    sharding.logical_spec(("batch",), (4, 4), m)


def test_make_mesh():
  m = sharding.make_mesh(2, 4)
  assert m.axis_names == ("data", "model") and dict(m.shape) == {"data": 2, "model": 4}
  assert dict(sharding.make_mesh(data=8).shape) == {"data": 8, "model": 1}
  assert dict(sharding.make_mesh(model=2, devices=jax.devices()[2:4]).shape) == {
    "data": 1,
    "model": 2,
  }
  with pytest.raises(ValueError, match=r"data=3 x model=2 = 6 devices, but 8 are available"):
    sharding.make_mesh(3, 2)
  with pytest.raises(ValueError, match=r"devices=jax.devices\(\)\[:4\]"):
    sharding.make_mesh(2, 2)
  with pytest.raises(ValueError, match=r"= 8 devices, but 4 are given"):
    sharding.make_mesh(2, 4, devices=jax.devices()[:4])
  with pytest.raises(ValueError, match="model must be an int >= 1"):
    sharding.make_mesh(8, 0)


def test_every_cache_type_shards_from_its_declared_axes(load):
  """SinkCache and PrefixCache take their shardings from their own AXES declarations, like
  KVCache: K/V by (layers, batch, kv_heads, cache_len, head_dim), per-row scalars by batch; a
  shared prefix (one row) is replicated along the data axis."""
  from kvjax.cache import KVCache, PrefixCache, SinkCache

  mesh = sharding.make_mesh(4, 2)
  cfg = load("llama").cfg
  dims = dict(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)
  sink = sharding.shard_cache(SinkCache.init(batch=8, n_sink=2, window=14, **dims), mesh)
  assert sink.k.sharding.spec == sink.v.sharding.spec == P(None, "data", "model", None, None)
  assert sink.count.sharding.spec == sink.start.sharding.spec == P("data")
  assert sink.n_sink == 2
  shared = PrefixCache(
    prefix=KVCache.init(batch=1, size=24, **dims), rows=KVCache.init(batch=8, size=16, **dims)
  )
  shared = sharding.shard_cache(shared, mesh)
  assert shared.prefix.k.sharding.spec == P(None, None, "model", None, None)
  assert shared.rows.k.sharding.spec == P(None, "data", "model", None, None)
  assert shared.rows.pos.sharding.spec == P("data", None)


def test_params_declare_their_axes_where_they_are_made(load):
  """Each param's logical axes are its nnx.Param's metadata, set where the Decoder makes it
  (the stacked blocks gain a leading "layers"); Flax's own partition specs read the same."""
  state = load("qwen2").state
  axes = sharding.param_axes(state)
  assert axes["embed"] == ("vocab", "embed")
  assert axes["blocks"]["attn"]["q_bias"] == ("layers", "heads", "head_dim")
  assert axes["blocks"]["mlp_norm"]["scale"] == ("layers", "embed")
  specs = nnx.get_partition_spec(state)
  assert specs["blocks"]["attn"]["k"].get_value() == P("layers", "embed", "kv_heads", "head_dim")


def test_a_param_made_without_axes_is_an_error():
  state = nnx.State({"fc": {"w": nnx.Param(jnp.ones((4, 8)))}})
  with pytest.raises(ValueError, match=r"param 'fc/w' \[4, 8\] was made without logical axes"):
    sharding.param_shardings(state, sharding.make_mesh(2, 4))
  with pytest.raises(ValueError, match=r"logical axes \('embed',\) do not match .* \(4, 8\)"):
    sharding.declare(jnp.ones((4, 8)), ("embed",))


def test_heads_and_coprocessors_shard_by_their_own_declarations(load):
  """An EAGLE head's and a coprocessor's params take their shardings from the axes declared
  where they are made: the head's one stacked layer (a published eagle3's 2D-wide q/k/v) and
  its draft LM head; a coprocessor's copied blocks as the base's, its LoRA deltas by the
  adapted weight's axes. A sharded head drafts exactly as unsharded."""
  from kvjax import coprocessor, speculative

  model = load("llama")  # 4 heads, 2 kv heads, ffn 128, vocab 320, 3 layers
  m = sharding.make_mesh(2, 4)
  head = speculative.init_head(model, "eagle3", published=True)  # drafts over the whole vocab
  s = sharding.param_shardings(head, m)
  assert s["blocks"]["attn"]["q"].spec == P(None, None, "model", None)  # [1, 2D, N, H]
  assert s["blocks"]["attn"]["k"].spec == P(None, None, None, None)  # 2 kv heads: replicated
  assert s["blocks"]["mlp"]["down"].spec == P(None, "model", None)
  assert s["draft_head"].spec == P(None, "model") and s["fuse"].spec == P(None, None)
  placed = sharding.shard_params(head, m)
  assert spec(placed.state["blocks"]["mlp"]["gate"]) == P(None, None, "model")
  lora = sharding.param_shardings(coprocessor.init(model, 4, init="lora"), m)
  assert lora["soft"].spec == P(None, None) and lora["final_norm"]["scale"].spec == P(None)
  assert lora["lora"]["mlp"]["gate"]["b"].spec == P(None, None, "model")  # [L, r, F]
  assert lora["lora"]["attn"]["o"]["a"].spec == P(None, "model", None)  # [L, N * H, r]
  assert lora["lora"]["mlp"]["down"]["a"].spec == P(None, "model", None)  # [L, F, r]
  copy = sharding.shard_params(coprocessor.init(model, 4), m)
  assert spec(copy.state["blocks"]["attn"]["q"]) == P(None, None, "model", None)
  tree = speculative.TreeSpec(top_k=2, depth=3, total_tokens=6)
  want = speculative.generate(model, head, ROWS[:2], max_new_tokens=8, tree=tree, stop_tokens=[])
  got = speculative.generate(
    sharding.shard(model, m), placed, ROWS[:2], max_new_tokens=8, tree=tree, stop_tokens=[]
  )
  assert got.tokens == want.tokens
  assert got.stats["mean_accept_len"] == want.stats["mean_accept_len"]
