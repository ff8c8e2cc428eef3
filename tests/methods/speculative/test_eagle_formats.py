"""Published EAGLE heads (SafeAILab EAGLE-1/2 cnets1.py, EAGLE-3 cnets.py / SpecForge / vLLM /
SGLang layout) load into kvjax and draft exactly as a torch reference of the published math.

The reference below re-expresses the published draft models (the key layout and forward of
cnets1.py's Model with layer 0 lacking input_layernorm, and of cnets.py's Model with midlayer's
two input norms, 2D-wide q/k/v, residual from the fused feature, own norm + lm_head, d2t);
the target is a tiny random HF llama (plain RoPE, as the reference heads rotate). The published
code itself, from PyPI (installed --no-deps): eagle-llm's EAGLE-1 model is the reference, and
kvjax's EAGLE-3 heads are SpecForge's LlamaForCausalLMEagle3 in both directions.
"""

import json
import math

import hf_models
import jax
import numpy as np
import pytest
import torch
from eagle_reference import hf_aux_features, installed, kvjax_draft, specforge_draft
from safetensors.torch import save_file

from kvjax import lm, speculative
from kvjax.speculative.tree import TreeSpec

D, N, K, F, V, L = 64, 4, 2, 128, hf_models.VOCAB, 4
H = D // N
AUX = [0, 1, 2]  # eagle_aux_hidden_state_layer_ids: outputs of layers 0-2 = inputs of 1-3


@pytest.fixture(scope="module")
def target(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("target"))
  hf_models.build("llama", path, num_hidden_layers=L, rope_scaling=None, rope_theta=10000.0)
  hf = hf_models.hf_model("llama", num_hidden_layers=L, rope_scaling=None, rope_theta=10000.0)
  return hf, lm.load(path)


def draft_tensors(kind: str, seed: int, n_draft: int = V) -> dict[str, torch.Tensor]:
  """Random published-layout tensors at unit gain (torch Linear [out, in])."""
  g = torch.Generator().manual_seed(seed)
  lin = lambda o, i: torch.randn(o, i, generator=g) / math.sqrt(i)
  scale = lambda: 1 + 0.1 * torch.randn(D, generator=g)
  C, pre = (2 * D, "midlayer.") if kind == "eagle3" else (D, "layers.0.")
  w = {
    pre + "self_attn.q_proj.weight": lin(N * H, C),
    pre + "self_attn.k_proj.weight": lin(K * H, C),
    pre + "self_attn.v_proj.weight": lin(K * H, C),
    pre + "self_attn.o_proj.weight": lin(D, N * H),
    pre + "mlp.gate_proj.weight": lin(F, D),
    pre + "mlp.up_proj.weight": lin(F, D),
    pre + "mlp.down_proj.weight": lin(D, F),
    pre + "post_attention_layernorm.weight": scale(),
  }
  if kind == "eagle1":
    w.update({"fc.weight": lin(D, 2 * D), "fc.bias": 0.1 * torch.randn(D, generator=g)})
  else:
    ids = torch.randperm(V, generator=g)[:n_draft].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    w.update(
      {
        "fc.weight": lin(D, 3 * D),
        pre + "input_layernorm.weight": scale(),
        pre + "hidden_norm.weight": scale(),
        "norm.weight": scale(),
        "lm_head.weight": lin(n_draft, D),
        "d2t": ids - torch.arange(n_draft),
        "t2d": t2d,
      }
    )
  return w


def write_head(path, kind: str, w: dict, **extra) -> str:
  cfg = {
    "architectures": ["LlamaForCausalLMEagle3" if kind == "eagle3" else "LlamaForCausalLM"],
    "hidden_size": D,
    "intermediate_size": F,
    "num_attention_heads": N,
    "num_key_value_heads": K,
    "num_hidden_layers": 1,
    "vocab_size": V,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "bias": True,
  }
  if kind == "eagle3":
    cfg.update(
      draft_vocab_size=int(w["lm_head.weight"].shape[0]),
      target_hidden_size=D,
      eagle_config={"eagle_aux_hidden_state_layer_ids": AUX},
    )
  cfg.update(extra)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(cfg))
  save_file({k: v.contiguous() for k, v in w.items()}, str(path / "model.safetensors"))
  return str(path)


# --- the torch reference of the published draft models ---------------------------------------


def rms(x, w, eps=1e-6):
  return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, pos):  # x [B, heads, T, H], HF rotate-half convention
  inv = 1.0 / 10000.0 ** (torch.arange(0, H, 2, dtype=torch.float32) / H)
  ang = pos[:, None].float() * inv[None]
  cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
  x1, x2 = x[..., : H // 2], x[..., H // 2 :]
  return x * cos + torch.cat([-x2, x1], -1) * sin


def layer(w, pre, resid, attn_in):
  B, T, _ = resid.shape
  pos = torch.arange(T)
  proj = lambda n, h: (
    (attn_in @ w[pre + f"self_attn.{n}_proj.weight"].T).view(B, T, h, H).transpose(1, 2)
  )
  q, k, v = rope(proj("q", N), pos), rope(proj("k", K), pos), proj("v", K)
  k, v = k.repeat_interleave(N // K, 1), v.repeat_interleave(N // K, 1)
  s = q @ k.transpose(-1, -2) / math.sqrt(H) + torch.full((T, T), -1e30).triu(1)
  a = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, N * H) @ w[
    pre + "self_attn.o_proj.weight"
  ].T
  x = resid + a
  m = rms(x, w[pre + "post_attention_layernorm.weight"])
  m = (
    torch.nn.functional.silu(m @ w[pre + "mlp.gate_proj.weight"].T)
    * (m @ w[pre + "mlp.up_proj.weight"].T)
  ) @ w[pre + "mlp.down_proj.weight"].T
  return x + m


def reference(kind, w, hf, tokens):
  """(head output [1, T, D], draft logits over the target vocabulary [1, T, V] (-inf off the
  draft vocabulary)) for pairs (feature_i, token_{i+1})."""
  with torch.no_grad():
    out = hf(torch.tensor(tokens)[None], output_hidden_states=True)
    nxt = torch.tensor(tokens[1:] + [tokens[-1]])[None]
    emb = hf.model.embed_tokens(nxt)
    if kind == "eagle1":
      x = torch.cat([emb, out.hidden_states[-1]], -1) @ w["fc.weight"].T + w["fc.bias"]
      h = layer(w, "layers.0.", x, x)  # layer 0: no input_layernorm
      return h, hf.lm_head(h)
    f = torch.cat([out.hidden_states[i + 1] for i in AUX], -1) @ w["fc.weight"].T
    u = torch.cat(
      [rms(emb, w["midlayer.input_layernorm.weight"]), rms(f, w["midlayer.hidden_norm.weight"])], -1
    )
    h = layer(w, "midlayer.", f, u)
    z = rms(h, w["norm.weight"]) @ w["lm_head.weight"].T
    full = torch.full((*z.shape[:-1], V), -torch.inf)
    full[..., torch.arange(z.shape[-1]) + w["d2t"]] = z
    return h, full


TOKENS = [5, 17, 99, 3, 250, 41, 8, 77, 123, 9, 64, 200]


@pytest.mark.parametrize("kind,n_draft", [("eagle1", V), ("eagle3", V), ("eagle3", 100)])
def test_published_head_drafts_as_the_reference(target, tmp_path, kind, n_draft):
  hf, model = target
  w = draft_tensors(kind, seed=3, n_draft=n_draft)
  head = speculative.load_head(write_head(tmp_path / "h", kind, w), model)
  assert head.hc.published and head.hc.kind == kind
  _, ref = reference(kind, w, hf, TOKENS)
  got = kvjax_draft(head, model, TOKENS)
  on = np.isfinite(ref.numpy())
  assert on.sum() == len(TOKENS) * n_draft
  np.testing.assert_allclose(got[on], ref.numpy()[on], atol=1e-4, rtol=1e-4)
  assert (got[~on] < -1e20).all()
  spec = TreeSpec(top_k=4, depth=3, total_tokens=12)
  plain = lm.generate(model, ["ab", "hello"], max_new_tokens=20)
  fast = speculative.generate(model, head, ["ab", "hello"], max_new_tokens=20, tree=spec)
  assert fast.tokens == plain.tokens


@pytest.mark.parametrize(
  "kind,edit,msg",
  [
    ("eagle1", dict(drop="layers.0.mlp.up_proj.weight"), "layers.0.mlp.up_proj.weight is missing"),
    ("eagle1", dict(add="layers.0.input_layernorm.weight"), "unexpected tensors"),
    ("eagle3", dict(cfg=dict(hidden_size=32)), "hidden_size is 32"),
    ("eagle3", dict(cfg=dict(vocab_size=999)), "vocab_size is 999"),
    ("eagle1", dict(cfg=dict(rms_norm_eps=1e-5)), "rms_norm_eps is 1e-05"),
    (
      "eagle3",
      dict(cfg=dict(rope_parameters={"rope_theta": 5e5}), uncfg="rope_theta"),
      "rope_theta is 500000.0",
    ),
    ("eagle3", dict(cfg=dict(norm_output=False)), "norm_output False"),
    ("eagle3", dict(cfg=dict(fc_norm=True)), "fc_norm True"),
    (
      "eagle3",
      dict(cfg=dict(eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 1, 5]})),
      "eagle_aux_hidden_state_layer_ids",
    ),
    ("eagle3", dict(cfg=dict(eagle_aux_hidden_state_layer_ids=[1, 2, 2])), "name different layers"),
    ("eagle3", dict(shape="fc.weight"), "fc.weight has shape"),
    ("eagle3", dict(corrupt=True), "cannot read the weights"),
  ],
)
def test_mismatched_published_heads(target, tmp_path, kind, edit, msg):
  _, model = target
  w = draft_tensors(kind, seed=4)
  if "drop" in edit:
    del w[edit["drop"]]
  if "add" in edit:
    w[edit["add"]] = torch.ones(D)
  if "shape" in edit:
    w[edit["shape"]] = w[edit["shape"]][:, : 2 * D]
  path = write_head(tmp_path / "h", kind, w, **edit.get("cfg", {}))
  if "uncfg" in edit:
    f = tmp_path / "h" / "config.json"
    f.write_text(
      json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k != edit["uncfg"]})
    )
  if edit.get("corrupt"):
    f = tmp_path / "h" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
  with pytest.raises(speculative.HeadError, match=msg):
    speculative.load_head(path, model)


def test_eagle1_reference_is_eagle_llms(target):
  """The EAGLE-1 reference above is PyPI eagle-llm's own draft model (eagle/model/cnets.py,
  strict load of the same tensors) on the same features and tokens."""
  import types

  Model = installed("eagle-llm", "eagle.model.cnets").Model
  hf, _ = target
  cfg = types.SimpleNamespace(  # the LlamaConfig fields cnets.py reads (it predates rope_type)
    hidden_size=D,
    intermediate_size=F,
    num_attention_heads=N,
    num_key_value_heads=K,
    num_hidden_layers=1,
    vocab_size=V,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
    pretraining_tp=1,
    rope_scaling=None,
    hidden_act="silu",
    pad_token_id=None,
  )
  m = Model(cfg, bias=True).eval()
  w = draft_tensors("eagle1", seed=3)
  m.load_state_dict(
    {**w, "embed_tokens.weight": hf.model.embed_tokens.weight.detach()}, strict=True
  )
  with torch.no_grad():
    feats = hf(torch.tensor(TOKENS)[None], output_hidden_states=True).hidden_states[-1]
    h = m(feats, torch.tensor(TOKENS[1:] + [TOKENS[-1]])[None])
  ref, _ = reference("eagle1", w, hf, TOKENS)
  assert h.abs().max() > 0.1
  np.testing.assert_allclose(h.numpy(), ref.numpy(), atol=1e-5)


def published_head(model, kind):
  """A kvjax published-architecture head as training leaves it (eagle3: fusing the inputs of
  layers 1-3, a draft vocabulary of every third id): every tensor moved off its init (norm
  scales of ones, zero bias)."""
  fuse = tuple(i + 1 for i in AUX) if kind == "eagle3" else ()
  head = speculative.init_head(
    model,
    kind,
    seed=5,
    fuse_layers=fuse,
    published=True,
    draft_vocab=tuple(range(0, V, 3)) if kind == "eagle3" else (),
  )
  rng = np.random.default_rng(0)
  return head.with_params(
    jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(a.dtype), head.params())
  )


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_export_loads_back_and_into_the_reference(target, tmp_path, kind):
  """A kvjax-trained published-architecture head exports to the published layout: load_head
  reads it back drafting the same logits, and the torch reference (strict: exactly the
  tensors it reads) computes the same draft logits from the exported tensors."""
  from safetensors.torch import load_file

  hf, model = target
  head = published_head(model, kind)
  path = speculative.export_head(head, str(tmp_path / "x"))
  back = speculative.load_head(path, model)
  np.testing.assert_array_equal(kvjax_draft(back, model, TOKENS), kvjax_draft(head, model, TOKENS))
  w = load_file(path + "/model.safetensors")
  assert set(w) == set(draft_tensors(kind, seed=0, n_draft=len(head.hc.draft_vocab) or V))
  _, ref = reference(kind, w, hf, TOKENS)
  on = np.isfinite(ref.numpy())
  np.testing.assert_allclose(
    kvjax_draft(head, model, TOKENS)[on], ref.numpy()[on], atol=1e-4, rtol=1e-4
  )
  cfg = json.loads((tmp_path / "x" / "config.json").read_text())
  if kind == "eagle3":
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == AUX  # SGLang: outputs
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in AUX]  # vLLM: inputs
    assert cfg["draft_vocab_size"] == len(head.hc.draft_vocab)


@pytest.mark.filterwarnings("ignore:flash_attn is not found")  # its CUDA backend; sdpa runs
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # torch's mkldnn
def test_eagle3_reference_is_specforges(target, tmp_path):
  """kvjax's published EAGLE-3 head is PyPI specforge's own draft model (SGLang's trainer,
  LlamaForCausalLMEagle3): an exported head builds it through SpecForge's config reader from
  the exported config.json and loads strictly (+ the target's embedding); a head SpecForge
  then writes as its SGLang serving export does (save_pretrained without the embedding,
  legacy RoPE fields) loads into kvjax; both draft as SpecForge does at the target ids d2t
  names."""
  from safetensors.torch import load_file

  auto = installed("specforge", "specforge.modeling.auto")
  hf, model = target
  head = published_head(model, "eagle3")
  path = speculative.export_head(head, str(tmp_path / "x"))
  m = auto.AutoDraftModel.from_config(  # attention_backend="sdpa"
    auto.AutoDraftModelConfig.from_file(path + "/config.json")
  ).eval()
  m.load_state_dict(
    {
      **load_file(path + "/model.safetensors"),
      "embed_tokens.weight": hf.model.embed_tokens.weight.detach(),
    },
    strict=True,
  )
  ids = (torch.arange(m.config.draft_vocab_size) + m.d2t).numpy()
  assert ids.tolist() == list(head.hc.draft_vocab) == m.t2d.nonzero()[:, 0].tolist()
  z = specforge_draft(m, hf_aux_features(m, hf, TOKENS), TOKENS)
  assert np.abs(z).max() > 1
  np.testing.assert_allclose(kvjax_draft(head, model, TOKENS)[0][:, ids], z, atol=1e-4, rtol=1e-4)

  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in m.named_parameters():
      if name != "embed_tokens.weight":
        p.add_(0.1 * torch.randn(p.shape, generator=g))
  out = str(tmp_path / "specforge")
  m.save_pretrained(out, state_dict={k: v for k, v in m.state_dict().items() if "embed" not in k})
  installed("specforge", "specforge.export.checkpoint_io").apply_legacy_rope_scaling(out)
  back = speculative.load_head(out, model)
  z2 = specforge_draft(m, hf_aux_features(m, hf, TOKENS), TOKENS)
  assert np.abs(z2 - z).max() > 0.1
  np.testing.assert_allclose(kvjax_draft(back, model, TOKENS)[0][:, ids], z2, atol=1e-4, rtol=1e-4)


def test_export_refuses_kvjax_architectures(target, tmp_path):
  _, model = target
  for kind in ("eagle1", "eagle3"):
    with pytest.raises(speculative.HeadError, match="kvjax's own"):
      speculative.export_head(speculative.init_head(model, kind), str(tmp_path / kind))
  with pytest.raises(speculative.HeadError, match="cannot be exported in the eagle3 layout"):
    speculative.export_head(
      speculative.init_head(model, "eagle1", published=True), str(tmp_path / "x"), format="eagle3"
    )
