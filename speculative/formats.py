"""Every way an EAGLE head is read and written: kvjax's own directory and the published
EAGLE layouts; `load` detects which.

kvjax's own: `head.json` (the HeadConfig, with the target's architecture) and `params/`
(orbax), written by `save`; the heads shipped in speculative/heads/ load by name (`HEADS`).

A published head is a directory with `config.json` (LlamaConfig-like: hidden_size,
num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, ...) and
`model.safetensors` or `pytorch_model.bin`; torch Linear weights are [out, in].

  EAGLE-1/2 (SafeAILab/EAGLE cnets1.py): fc.weight [D, 2D], fc.bias [D] over
    concat(embed(t), feature); layers.0.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj,
    post_attention_layernorm}.weight (layer 0 has no input_layernorm); the target's LM head;
    embed_tokens.weight optional (a copy of the target's: checked, not used).
  EAGLE-3 (SafeAILab cnets.py, SpecForge LlamaForCausalLMEagle3, the vLLM/SGLang readers):
    fc.weight [D, 3D] over the concatenated target hidden states; midlayer.input_layernorm
    (embeddings), midlayer.hidden_norm (fused feature), midlayer.self_attn.{q,k,v}_proj
    [*, 2D], o_proj, post_attention_layernorm, mlp.*; norm.weight; lm_head.weight [N, D]; d2t
    [N] (draft id i -> target id i + d2t[i]); t2d [V] bool (target ids the draft covers).
    config: draft_vocab_size (N); the fused layers as eagle_config.eagle_aux_hidden_state_layer_ids
    (SGLang's and SpecForge's convention: id i = the output of target layer i = kvjax
    layer_inputs[i + 1]; SGLang adds the 1) and/or a top-level eagle_aux_hidden_state_layer_ids
    (vLLM's: layer inputs, used as they are); neither: EAGLE-3's default, the inputs of layers
    2, L//2, L-3. `export` writes both.
    rope_theta (or transformers 5's rope_parameters.rope_theta) and rms_norm_eps must be the
    target's: the head's layer runs with the target's RoPE and norms. SpecForge's variants
    norm_output false and fc_norm true are refused.

Both run as HeadConfig(published=True) heads (`kvjax.speculative.head`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.lm import artifact, config, hf_config
from kvjax.speculative.head import Head, HeadConfig, HeadError, LoadedHead, check

# Shipped heads (see docs/shipped-models.md), loadable by name.
HEADS = artifact.Kind(
  noun="head",
  config="head.json",
  shipped_in=os.path.join(os.path.dirname(os.path.abspath(__file__)), "heads"),
  error=HeadError,
)
WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def detect(path: str) -> str:
  """ "kvjax" (head.json), "eagle1" or "eagle3" (config.json + weights) for a head directory."""
  if os.path.isfile(os.path.join(path, HEADS.config)):
    return "kvjax"
  file, w = read_tensors(published_dir(path))
  return published_kind(file, w)


def save(head: LoadedHead, path: str, *, dtype=None) -> None:
  """Writes head.json and params/ (orbax; cast to `dtype` when given, e.g. bfloat16 to ship)
  into a new directory `path`. `load` casts the params to the target's dtype."""
  HEADS.save(path, head.hc.to_json(), head.params(), dtype=dtype)


def load(path: str, target, *, allow_other_params: bool = False) -> LoadedHead:
  """A head directory or shipped name, in kvjax's format or a published one (see the module
  docstring), for `target` (a kvjax.lm.Model). Mismatches raise HeadError naming the file and
  the field or tensor; a head in kvjax's format trained against other params of the target's
  architecture (its recorded `target_fingerprint`) too, unless allow_other_params, which
  warns instead."""
  path, _ = HEADS.locate(path)
  if os.path.isfile(os.path.join(path, HEADS.config)):
    return load_kvjax(path, target, allow_other_params=allow_other_params)
  return load_published(published_dir(path), target)


def load_kvjax(path: str, target, *, allow_other_params: bool = False) -> LoadedHead:
  """A head directory in kvjax's format (head.json + params/) for `target`; a head trained
  for another architecture raises HeadError, and so does one trained against other params
  of the same architecture, unless allow_other_params."""
  hc = HEADS.read_config(path, HeadConfig.from_json)
  check(hc, target.cfg)
  HEADS.check_fingerprint(hc.target_fingerprint, target, path=path, allow=allow_other_params)
  hc = dataclasses.replace(hc, target=target.cfg)  # the target's own rope/eps settings
  graphdef, state = nnx.split(
    nnx.eval_shape(lambda: Head(hc, rngs=nnx.Rngs(0), dtype=target.dtype))
  )
  like = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, HEADS.restore(path, like))
  return LoadedHead(hc, graphdef, state, path)


def published_dir(path: str) -> str:
  """path, checked to be a published head's directory (config.json)."""
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise HeadError(
      f"{path}: neither a kvjax head (head.json) nor a published EAGLE head "
      f"(config.json + {' or '.join(WEIGHTS)})"
    )
  return path


def published_kind(file: str, w: dict) -> str:
  """ "eagle3" or "eagle1", from the tensor names w of weights file `file`."""
  if "midlayer.post_attention_layernorm.weight" in w:
    return "eagle3"
  if "layers.0.post_attention_layernorm.weight" in w:
    return "eagle1"
  raise HeadError(f"{file}: neither EAGLE-3 tensors (midlayer.*) nor EAGLE-1 tensors (layers.0.*)")


def weights_file(path: str) -> str:
  for name in WEIGHTS:
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  raise HeadError(f"{path}: config.json without {' or '.join(WEIGHTS)}")


def read_tensors(path: str) -> tuple[str, dict[str, np.ndarray]]:
  """(file, name -> float32/int/bool numpy array) of a published head's weights."""
  file = weights_file(path)
  try:
    if file.endswith(".safetensors"):
      from safetensors.numpy import load_file

      try:
        return file, dict(load_file(file))
      except TypeError:  # bfloat16: numpy cannot hold it, read through torch
        from safetensors.torch import load_file as load_torch

        return file, {k: _np(v) for k, v in load_torch(file).items()}
    import torch

    return file, {
      k: _np(v) for k, v in torch.load(file, map_location="cpu", weights_only=True).items()
    }
  except HeadError:
    raise
  except Exception as err:
    raise HeadError(f"{file}: cannot read the weights ({type(err).__name__}: {err})") from None


def _np(t) -> np.ndarray:
  return (t.float() if t.is_floating_point() else t).numpy()


def _config(path: str, target, kind: str) -> tuple[dict, tuple[int, ...]]:
  """(config.json's dict, the fused target layers (inputs; () for eagle1)), checked against
  the target."""
  file = os.path.join(path, "config.json")
  d = hf_config.read_json(file, required=True, error=HeadError)
  t = target.cfg
  want = {
    "hidden_size": t.d_model,
    "vocab_size": t.vocab_size,
    "num_attention_heads": t.n_heads,
    "num_key_value_heads": t.n_kv_heads,
    "intermediate_size": t.ffn_dim,
  }
  if kind == "eagle3":
    want["target_hidden_size"] = t.d_model
  for name, v in want.items():
    got = d.get(name, v if name in ("target_hidden_size", "num_key_value_heads") else None)
    if got != v:
      raise HeadError(f"{file}: {name} is {got!r}; the target has {v}")
  hd = d.get("head_dim") or t.d_model // t.n_heads
  if hd != t.head_dim:
    raise HeadError(f"{file}: head_dim is {hd}; the target has {t.head_dim}")
  rope = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
  theta = d.get("rope_theta", rope.get("rope_theta", t.rope_theta))  # transformers 5 nests it
  if theta != t.rope_theta:
    raise HeadError(
      f"{file}: rope_theta is {theta}; the target's is {t.rope_theta} "
      "(kvjax runs the head's layer with the target's RoPE)"
    )
  if d.get("rms_norm_eps", t.norm_eps) != t.norm_eps:
    raise HeadError(
      f"{file}: rms_norm_eps is {d['rms_norm_eps']!r}; the target's is "
      f"{t.norm_eps} (kvjax's head norms with the target's)"
    )
  if kind == "eagle3" and (d.get("norm_output", True) is not True or d.get("fc_norm", False)):
    raise HeadError(
      f"{file}: norm_output {d.get('norm_output', True)!r}, fc_norm "
      f"{d.get('fc_norm', False)!r}: SpecForge's variants (draft logits from the "
      "un-normed state; a norm per fused hidden state) are not the EAGLE-3 "
      "architecture kvjax runs (norm_output true, fc_norm false)"
    )
  if d.get("num_hidden_layers", 1) != 1:
    raise HeadError(
      f"{file}: num_hidden_layers is {d['num_hidden_layers']}; an EAGLE head has one decoder layer"
    )
  return d, () if kind == "eagle1" else _fused_layers(file, d, t.n_layers)


def _fused_layers(file: str, d: dict, L: int) -> tuple[int, ...]:
  """The target layers (inputs) an EAGLE-3 config fuses: its layer-output ids (SGLang,
  SpecForge) plus one, or vLLM's layer-input ids, or EAGLE-3's default for L layers."""
  ids = (d.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
  inputs = d.get("eagle_aux_hidden_state_layer_ids")  # vLLM's: layer inputs
  for name, v, lo in (
    ("eagle_config.eagle_aux_hidden_state_layer_ids", ids, 0),
    ("eagle_aux_hidden_state_layer_ids", inputs, 1),
  ):
    if v is not None and not (
      isinstance(v, list) and all(isinstance(i, int) and lo <= i < L - 1 + lo for i in v)
    ):
      raise HeadError(
        f"{file}: {name} {v} must be a list of target layer ids in [{lo}, "
        f"{L - 1 + lo}) (the target has {L} layers)"
      )
  if ids is not None and inputs is not None and [i + 1 for i in ids] != inputs:
    raise HeadError(
      f"{file}: eagle_config.eagle_aux_hidden_state_layer_ids {ids} (layer "
      f"outputs) and eagle_aux_hidden_state_layer_ids {inputs} (layer inputs) "
      "name different layers"
    )
  if ids is not None:
    fuse = tuple(i + 1 for i in ids)
  elif inputs is not None:
    fuse = tuple(inputs)
  else:
    fuse = tuple(sorted({2, L // 2, L - 3}))
  if len(fuse) != 3 or len(set(fuse)) != 3 or not all(0 <= i < L for i in fuse):
    raise HeadError(
      f"{file}: the fused hidden states {fuse} (inputs of target layers) must be "
      f"3 distinct layers of the target's {L}"
    )
  return fuse


def load_published(path: str, target) -> LoadedHead:
  """A published EAGLE-1/2 or EAGLE-3 head (the kind from its tensors) for `target`."""
  t = target.cfg
  file, w = read_tensors(path)
  kind = published_kind(file, w)
  d, fuse = _config(path, target, kind)
  vocab = _draft_vocab(w, file, d, t) if kind == "eagle3" else ()
  hc = HeadConfig(
    kind=kind,
    target=t,
    fuse_layers=fuse,
    published=True,
    draft_vocab=tuple(int(i) for i in vocab),
    target_name=str(d.get("_name_or_path", "")),
  )
  check(hc, t)
  params = _published_params(w, file, hc, bias=d.get("bias", True))
  if "embed_tokens.weight" in w:
    e = _take(w, file, "embed_tokens.weight", (t.vocab_size, t.d_model))
    ref = np.asarray(target.params()["embed"], np.float32)
    if not np.allclose(e, ref, rtol=1e-2, atol=1e-2 * float(np.abs(ref).max())):
      raise HeadError(
        f"{file}: embed_tokens.weight is not the target's embedding (the head "
        "was trained for another target)"
      )
  if w:
    raise HeadError(f"{file}: unexpected tensors for an {kind} head: {sorted(w)[:8]}")
  graphdef, state = nnx.split(
    nnx.eval_shape(lambda: Head(hc, rngs=nnx.Rngs(0), dtype=target.dtype))
  )
  shapes = nnx.to_pure_dict(state)
  got = jax.tree.structure(params), jax.tree.structure(shapes)
  if got[0] != got[1]:
    raise HeadError(f"{file}: the tensors do not make an {kind} head ({got[0]} vs {got[1]})")
  nnx.replace_by_pure_dict(
    state,
    jax.tree.map(
      lambda a, s: jnp.asarray(a, target.dtype if s.dtype != jnp.int32 else s.dtype), params, shapes
    ),
  )
  return LoadedHead(hc, graphdef, state, path)


def _draft_vocab(w: dict, file: str, d: dict, t: config.Config) -> np.ndarray:
  """An EAGLE-3 head's draft vocabulary [Nd]: the target ids of its draft ids (d2t's offsets
  added), checked against t2d; pops both tensors from w."""
  Nd = d.get("draft_vocab_size", t.vocab_size)
  d2t = _take(w, file, "d2t", (Nd,), dtype=np.int64)
  t2d = _take(w, file, "t2d", (t.vocab_size,), dtype=bool)
  vocab = np.arange(Nd) + d2t
  if (vocab < 0).any() or (vocab >= t.vocab_size).any() or len(set(vocab.tolist())) != Nd:
    raise HeadError(
      f"{file}: d2t maps the {Nd} draft ids to {len(set(vocab.tolist()))} "
      f"distinct ids, not all in [0, {t.vocab_size})"
    )
  if t2d.sum() != Nd or not t2d[vocab].all():
    raise HeadError(f"{file}: t2d marks {int(t2d.sum())} target ids; d2t maps to {Nd} others")
  return vocab


def _published_params(w: dict, file: str, hc: HeadConfig, *, bias: bool) -> dict:
  """The params pure dict of a published head `hc` from its tensors w (popped; float32 numpy,
  Linear weights transposed to [in, out]); bias: config.json's `bias` (EAGLE-1's fc.bias)."""
  t = hc.target
  D, N, K, H, F = t.d_model, t.n_heads, t.n_kv_heads, t.head_dim, t.ffn_dim
  pre = "layers.0." if hc.kind == "eagle1" else "midlayer."
  C = 2 * D if hc.kind == "eagle3" else D
  lin = lambda name, o, i: _take(w, file, name, (o, i)).T  # [in, out]
  blocks = {
    "attn": {
      "q": lin(pre + "self_attn.q_proj.weight", N * H, C).reshape(C, N, H),
      "k": lin(pre + "self_attn.k_proj.weight", K * H, C).reshape(C, K, H),
      "v": lin(pre + "self_attn.v_proj.weight", K * H, C).reshape(C, K, H),
      "o": lin(pre + "self_attn.o_proj.weight", D, N * H).reshape(N, H, D),
    },
    "mlp": {
      "gate": lin(pre + "mlp.gate_proj.weight", F, D),
      "up": lin(pre + "mlp.up_proj.weight", F, D),
      "down": lin(pre + "mlp.down_proj.weight", D, F),
    },
    "mlp_norm": {"scale": _take(w, file, pre + "post_attention_layernorm.weight", (D,))},
  }
  params = {"blocks": jax.tree.map(lambda a: a[None], blocks)}
  if hc.kind == "eagle1":
    params["fc"] = lin("fc.weight", D, 2 * D)
    params["fc_bias"] = (
      _take(w, file, "fc.bias", (D,)) if bias or "fc.bias" in w else np.zeros((D,), np.float32)
    )
    return params
  params["fuse"] = lin("fc.weight", D, 3 * D)
  params["embed_norm"] = {"scale": _take(w, file, pre + "input_layernorm.weight", (D,))}
  params["feature_norm"] = {"scale": _take(w, file, pre + "hidden_norm.weight", (D,))}
  params["final_norm"] = {"scale": _take(w, file, "norm.weight", (D,))}
  params["draft_head"] = lin("lm_head.weight", len(hc.draft_vocab), D)
  return params


def _take(w: dict, file: str, name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
  """Pops tensor `name` of `shape` from w (HeadError naming it otherwise)."""
  if name not in w:
    raise HeadError(f"{file}: tensor {name} is missing")
  a = np.asarray(w.pop(name))
  if a.shape != tuple(shape):
    raise HeadError(f"{file}: tensor {name} has shape {list(a.shape)}; expected {list(shape)}")
  return a.astype(dtype)


def export(head: LoadedHead, path: str, *, format: str | None = None) -> str:
  """Writes `head` into a new directory `path` in a published layout (`format`: "eagle1",
  "eagle3" or None for the head's kind): config.json + model.safetensors (float32), the
  tensors and config fields this module's `load`, SafeAILab's EAGLE, vLLM's and SGLang's
  llama_eagle3 readers read (midlayer.* -> their layers.0.*, d2t as offsets, t2d; the
  embedding is the target's, not stored). Only published-architecture heads (HeadConfig
  published=True: read from published files, or trained with `init(..., published=True)`)
  export: kvjax's own eagle1/eagle3 compute something else. Returns path."""
  from safetensors.numpy import save_file

  _check_exportable(head.hc, format)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(_published_config(head.hc), f, indent=2)
  w = _published_tensors(head)
  save_file(
    {k: np.ascontiguousarray(v) for k, v in w.items()}, os.path.join(path, "model.safetensors")
  )
  return path


def _check_exportable(hc: HeadConfig, format: str | None) -> None:
  """HeadError unless a head `hc` can be written in the published layout `format` (None: its
  kind's)."""
  fmt = format or hc.kind
  if fmt not in ("eagle1", "eagle3"):
    raise HeadError(f"export format must be 'eagle1' or 'eagle3'; got {format!r}")
  if fmt != hc.kind:
    raise HeadError(
      f"an {hc.kind} head cannot be exported in the {fmt} layout (another "
      "architecture); export it as " + hc.kind
    )
  if not hc.published:
    raise HeadError(
      f"this head has kvjax's own {hc.kind} architecture ("
      + (
        "its decoder layer's input norm"
        if hc.kind == "eagle1"
        else "a 2D -> D fc before a standard decoder layer"
      )
      + "), which published readers would compute differently; train it with "
      "the published architecture (--published) to export it"
    )
  t = hc.target
  if t.family not in ("llama", "mistral") or t.qkv_bias or t.o_bias or t.mlp_bias:
    raise HeadError(
      f"the published EAGLE layouts are Llama layers; this head's target is {t.family!r}"
    )
  if fmt == "eagle3" and len(hc.fuse_layers) != 3:
    raise HeadError(
      f"fuse_layers {hc.fuse_layers}: the EAGLE-3 layout fuses exactly 3 target hidden states"
    )
  if fmt == "eagle3" and min(hc.fuse_layers) < 1:
    raise HeadError(
      f"fuse_layers {hc.fuse_layers}: the embeddings (layer 0's input) are no "
      "target layer's output; the EAGLE-3 config cannot name them"
    )


def _published_config(hc: HeadConfig) -> dict:
  """The config.json of a published-architecture head in its kind's layout."""
  t = hc.target
  cfg = {
    "architectures": ["LlamaForCausalLM" if hc.kind == "eagle1" else "LlamaForCausalLMEagle3"],
    "model_type": "llama",
    "hidden_size": t.d_model,
    "intermediate_size": t.ffn_dim,
    "num_attention_heads": t.n_heads,
    "num_key_value_heads": t.n_kv_heads,
    "head_dim": t.head_dim,
    "num_hidden_layers": 1,
    "vocab_size": t.vocab_size,
    "rms_norm_eps": t.norm_eps,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "max_position_embeddings": t.max_position,
    "torch_dtype": "float32",
    **{k: v for k, v in hf_config.to_hf(t).items() if k in ("rope_theta", "rope_scaling")},
  }
  if hc.kind == "eagle1":
    return {**cfg, "bias": True}
  return {
    **cfg,
    "draft_vocab_size": len(hc.draft_vocab),
    "target_hidden_size": t.d_model,
    "eagle_config": {
      "eagle_aux_hidden_state_layer_ids": [i - 1 for i in hc.fuse_layers],
      "use_aux_hidden_state": True,
    },
    "eagle_aux_hidden_state_layer_ids": list(hc.fuse_layers),
  }


def _published_tensors(head: LoadedHead) -> dict[str, np.ndarray]:
  """A published-architecture head's tensors by their published names (float32, torch Linear
  weights [out, in]; eagle3's d2t offsets and t2d mask)."""
  hc = head.hc
  p = jax.tree.map(lambda a: np.asarray(a, np.float32), head.params())
  b = jax.tree.map(lambda a: a[0], p["blocks"])
  D, C = hc.target.d_model, b["attn"]["q"].shape[0]
  pre = "layers.0." if hc.kind == "eagle1" else "midlayer."
  w = {
    pre + "self_attn.q_proj.weight": b["attn"]["q"].reshape(C, -1).T,
    pre + "self_attn.k_proj.weight": b["attn"]["k"].reshape(C, -1).T,
    pre + "self_attn.v_proj.weight": b["attn"]["v"].reshape(C, -1).T,
    pre + "self_attn.o_proj.weight": b["attn"]["o"].reshape(-1, D).T,
    pre + "mlp.gate_proj.weight": b["mlp"]["gate"].T,
    pre + "mlp.up_proj.weight": b["mlp"]["up"].T,
    pre + "mlp.down_proj.weight": b["mlp"]["down"].T,
    pre + "post_attention_layernorm.weight": b["mlp_norm"]["scale"],
  }
  if hc.kind == "eagle1":
    return {**w, "fc.weight": p["fc"].T, "fc.bias": p["fc_bias"]}
  vocab = np.asarray(hc.draft_vocab, np.int64)
  t2d = np.zeros((hc.target.vocab_size,), bool)
  t2d[vocab] = True
  return {
    **w,
    "fc.weight": p["fuse"].T,
    pre + "input_layernorm.weight": p["embed_norm"]["scale"],
    pre + "hidden_norm.weight": p["feature_norm"]["scale"],
    "norm.weight": p["final_norm"]["scale"],
    "lm_head.weight": p["draft_head"].T,
    "d2t": vocab - np.arange(len(vocab)),
    "t2d": t2d,
  }
