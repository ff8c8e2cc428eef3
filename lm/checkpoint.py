"""Params <-> Hugging Face safetensors (single or sharded), and orbax save/restore.

kvjax params are the pure dict of a `Decoder`'s nnx.State: per-layer tensors stacked on a
leading layer axis (an MLP's over the layers with that kind of MLP: `decoder.stack_blocks`),
projections stored as einsum operands ([D, N, H], [N, H, D], [D, F], ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.lm import user_warnings
from kvjax.lm.config import Config

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
  """A checkpoint whose files or tensors do not match its config."""


# Each entry: (our path, HF name, HF shape, to_ours, to_hf). `{i}` marks a per-layer tensor,
# `{e}` a per-expert one (stacked on an expert axis after the layer axis). A fused HF tensor
# (Phi-3's qkv_proj, gate_up_proj) has a list of our paths: to_ours returns one array per path,
# in order, and to_hf takes them in that order.
Path = tuple[str, ...]
Entry = tuple[Path | list[Path], str, tuple[int, ...], Callable, Callable]
# A Mixtral or Qwen3-MoE checkpoint in transformers 5's in-memory layout (experts fused per
# layer) has this tensor in its first mixture-of-experts layer; save_pretrained and published
# checkpoints write one tensor per expert instead.
FUSED_EXPERTS = "model.layers.{i}.mlp.experts.gate_up_proj"


LAYER = "model.layers.{i}."


def _same(w):
  return w


def _proj_in(D: int, a: int, b: int) -> tuple[Callable, Callable]:
  """torch Linear [a*b, D] <-> [D, a, b]."""
  return (lambda w: w.T.reshape(D, a, b)), (lambda w: w.reshape(D, a * b).T)


def _dense() -> tuple[Callable, Callable]:
  """torch Linear [out, in] <-> [in, out]."""
  return (lambda w: w.T), (lambda w: w.T)


def _heads(a: int, b: int) -> tuple[Callable, Callable]:
  """a bias [a*b] <-> [a, b]."""
  return (lambda w: w.reshape(a, b)), (lambda w: w.reshape(a * b))


def _rows(D: int, *shapes) -> tuple[Callable, Callable]:
  """torch Linears' rows stacked [sum(prod(shape)), D] <-> one [D, *shape] per shape."""
  bounds = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
  return (
    (
      lambda w: tuple(
        w[lo:hi].T.reshape(D, *s) for lo, hi, s in zip(bounds[:-1], bounds[1:], shapes)
      )
    ),
    (lambda *ws: jnp.concatenate([w.reshape(D, -1).T for w in ws])),
  )


def _entries(cfg: Config, *, fused: bool = False) -> list[Entry]:
  """Every tensor of a checkpoint for cfg, in a fixed order. fused: read the experts from
  FUSED_EXPERTS' layout (load only; saving writes per-expert tensors)."""
  D, V = cfg.d_model, cfg.vocab_size
  e: list[Entry] = [(("embed",), "model.embed_tokens.weight", (V, D), _same, _same)]
  e += _attention_entries(cfg)
  e += _mlp_entries(cfg, fused=fused)
  e += _optional_entries(cfg)
  e += [(("final_norm", "scale"), "model.norm.weight", (D,), _same, _same)]
  if not cfg.tie_embeddings:
    e += [(("head",), "lm_head.weight", (V, D), *_dense())]
  return e


def _attention_entries(cfg: Config) -> list[Entry]:
  """The layers' two pre-norms and attention projections (Phi-3: q, k, v rows in one
  tensor)."""
  D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  mlp_norm = "pre_feedforward_layernorm" if cfg.post_norms else "post_attention_layernorm"
  e: list[Entry] = [
    (("blocks", "attn_norm", "scale"), LAYER + "input_layernorm.weight", (D,), _same, _same),
    (("blocks", "mlp_norm", "scale"), LAYER + mlp_norm + ".weight", (D,), _same, _same),
    (
      ("blocks", "attn", "o"),
      LAYER + "self_attn.o_proj.weight",
      (D, N * H),
      lambda w: w.T.reshape(N, H, D),
      lambda w: w.reshape(N * H, D).T,
    ),
  ]
  if cfg.family == "phi3":
    return e + [
      (
        [("blocks", "attn", n) for n in "qkv"],
        LAYER + "self_attn.qkv_proj.weight",
        ((N + 2 * K) * H, D),
        *_rows(D, (N, H), (K, H), (K, H)),
      )
    ]
  return e + [
    (("blocks", "attn", n), LAYER + f"self_attn.{n}_proj.weight", (h * H, D), *_proj_in(D, h, H))
    for n, h in (("q", N), ("k", K), ("v", K))
  ]


def _mlp_entries(cfg: Config, *, fused: bool) -> list[Entry]:
  """The layers' MLPs (Phi-3: gate rows, then up rows in one tensor): dense in the layers that
  have a dense MLP, the mixture of experts in the others (`_expert_entries`)."""
  D, F = cfg.d_model, cfg.ffn_dim
  mlp = LAYER + "mlp."
  if cfg.family == "phi3":
    return [
      (
        [("blocks", "mlp", "gate"), ("blocks", "mlp", "up")],
        mlp + "gate_up_proj.weight",
        (2 * F, D),
        *_rows(D, (F,), (F,)),
      ),
      (("blocks", "mlp", "down"), mlp + "down_proj.weight", (D, F), *_dense()),
    ]
  e: list[Entry] = []
  if not all(cfg.moe_layers):
    e += [
      (("blocks", "mlp", "gate"), mlp + "gate_proj.weight", (F, D), *_dense()),
      (("blocks", "mlp", "up"), mlp + "up_proj.weight", (F, D), *_dense()),
      (("blocks", "mlp", "down"), mlp + "down_proj.weight", (D, F), *_dense()),
    ]
  if any(cfg.moe_layers):
    e += _expert_entries(cfg, fused=fused)
  return e


def _expert_entries(cfg: Config, *, fused: bool) -> list[Entry]:
  """The mixture-of-experts layers' router and experts: per-expert tensors (Mixtral's
  block_sparse_moe.experts.{e}.w1/w3/w2, Qwen3-MoE's mlp.experts.{e}.gate/up/down_proj), or
  with `fused` transformers 5's fused layout (gate_up_proj [E, 2F, D], gate rows first;
  down_proj [E, D, F])."""
  D, F, E = cfg.d_model, cfg.expert_ffn_dim, cfg.n_experts
  mlp = LAYER + "mlp."
  if fused:
    swap = lambda w: w.transpose(0, 2, 1)
    return [
      (("blocks", "moe", "router"), mlp + "gate.weight", (E, D), *_dense()),
      (
        [("blocks", "moe", "gate"), ("blocks", "moe", "up")],
        mlp + "experts.gate_up_proj",
        (E, 2 * F, D),
        lambda w: (swap(w[:, :F]), swap(w[:, F:])),
        None,
      ),
      (("blocks", "moe", "down"), mlp + "experts.down_proj", (E, D, F), swap, None),
    ]
  if cfg.family == "qwen3_moe":
    router, expert, names = mlp, mlp + "experts.{e}.", ("gate_proj", "up_proj", "down_proj")
  else:  # Mixtral: w1 gate, w3 up, w2 down
    router = LAYER + "block_sparse_moe."
    expert, names = router + "experts.{e}.", ("w1", "w3", "w2")
  return [
    (("blocks", "moe", "router"), router + "gate.weight", (E, D), *_dense()),
    (("blocks", "moe", "gate"), expert + f"{names[0]}.weight", (F, D), *_dense()),
    (("blocks", "moe", "up"), expert + f"{names[1]}.weight", (F, D), *_dense()),
    (("blocks", "moe", "down"), expert + f"{names[2]}.weight", (D, F), *_dense()),
  ]


def _optional_entries(cfg: Config) -> list[Entry]:
  """The layer tensors only some families have: Gemma-2's post-norms, q/k/v biases, q/k
  norms, the output projection's bias and MLP biases."""
  D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
  e: list[Entry] = []
  if cfg.post_norms:
    e += [
      (("blocks", f"post_{n}_norm", "scale"), LAYER + f"{name}.weight", (D,), _same, _same)
      for n, name in (("attn", "post_attention_layernorm"), ("mlp", "post_feedforward_layernorm"))
    ]
  if cfg.qkv_bias:
    e += [
      (("blocks", "attn", f"{n}_bias"), LAYER + f"self_attn.{n}_proj.bias", (h * H,), *_heads(h, H))
      for n, h in (("q", N), ("k", K), ("v", K))
    ]
  if cfg.qk_norm:
    e += [
      (
        ("blocks", "attn", f"{n}_norm", "scale"),
        LAYER + f"self_attn.{n}_norm.weight",
        (H,),
        _same,
        _same,
      )
      for n in ("q", "k")
    ]
  if cfg.o_bias:
    e += [(("blocks", "attn", "o_bias"), LAYER + "self_attn.o_proj.bias", (D,), _same, _same)]
  if cfg.mlp_bias:
    e += [
      (("blocks", "mlp", f"{n}_bias"), LAYER + f"mlp.{n}_proj.bias", (d,), _same, _same)
      for n, d in (("gate", F), ("up", F), ("down", D))
    ]
  return e


def _names(entry: Entry, cfg: Config) -> list[str]:
  """The entry's names, one per layer for a per-layer tensor (a per-expert one keeps `{e}`):
  an MLP tensor's over the layers with that kind of MLP (`Config.moe_layers`), whose params
  stack in that order."""
  if "{i}" not in entry[1]:
    return [entry[1]]
  path = entry[0][0] if isinstance(entry[0], list) else entry[0]
  layers = range(cfg.n_layers)
  if path[:2] in (("blocks", "mlp"), ("blocks", "moe")):
    layers = [l for l in layers if cfg.moe_layers[l] == (path[1] == "moe")]
  return [entry[1].format(i=i, e="{e}") for i in layers]


def _experts(name: str, cfg: Config) -> list[str]:
  """name's per-expert names (`{e}` filled), or [name] when it is not per expert."""
  return [name.format(e=e) for e in range(cfg.n_experts)] if "{e}" in name else [name]


class Located(NamedTuple):
  """Where one Hugging Face weight lives in kvjax params: `paths` (one, or several for a fused
  tensor such as Phi-3's qkv_proj), the index on the stacked layer axis (None: not per layer),
  the tensor's Hugging Face shape and `to_ours`, its layout map (a fused tensor's returns one
  array per path)."""

  paths: list[Path]
  index: int | None
  shape: tuple[int, ...]
  to_ours: Callable


def locate(cfg: Config, name: str) -> Located | None:
  """The kvjax place of Hugging Face tensor `name` (e.g. "model.layers.3.self_attn.q_proj.weight")
  in a model of cfg, or None when the model has no such tensor (a per-expert tensor is None
  too: its place has an expert axis)."""
  for entry in _entries(cfg):
    if "{e}" in entry[1]:
      continue
    names = _names(entry, cfg)
    if name in names:
      paths = entry[0] if isinstance(entry[0], list) else [entry[0]]
      index = names.index(name) if "{i}" in entry[1] else None
      return Located(paths, index, entry[2], entry[3])
  return None


def _shards(path: str) -> dict[str, str]:
  """tensor name -> file name, from the index or the single file."""
  index = os.path.join(path, INDEX)
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
      raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
    if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
      raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    for file in sorted(set(weight_map.values())):
      if not os.path.exists(os.path.join(path, file)):
        raise CheckpointError(f"{index} names shard {file!r}, which is not in {path}")
    return weight_map
  single = os.path.join(path, SINGLE)
  if not os.path.exists(single):
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX}")
  return dict.fromkeys(_open(single).keys(), SINGLE)


def _open(file: str):
  from safetensors import safe_open

  try:
    return safe_open(file, framework="np")  # numpy: checked and cast before one transfer
  except Exception as err:  # safetensors raises its own error types for bad headers
    raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None


# safetensors' dtype names of the floating-point dtypes a checkpoint may store
STORED_FLOATS = {
  "F64": jnp.float64,
  "F32": jnp.float32,
  "F16": jnp.float16,
  "BF16": jnp.bfloat16,
  "F8_E4M3": jnp.float8_e4m3fn,
  "F8_E5M2": jnp.float8_e5m2,
}


class MixedDtypeWarning(UserWarning):
  """A checkpoint whose floating-point tensors are stored in several dtypes was loaded in one."""


class TiedHeadWarning(UserWarning):
  """config.json ties the embeddings, but the checkpoint holds a different lm_head.weight,
  which was loaded as an untied output head."""


class _Reader:
  """The tensors of a checkpoint directory by HF name, read one at a time from its files.

  file(name): the file holding it; get(name, shape, dtype): the tensor, its shape, dtype and
  (with check_finite) values checked, cast to dtype unless None; stored(name): (dtype, shape)
  from the file's header, without reading the data (dtype None for a non-floating one)."""

  def __init__(self, path: str, check_finite: bool):
    self.path = path
    self.check_finite = check_finite
    self.weight_map = _shards(path)
    self.handles: dict[str, Any] = {}

  def file(self, name: str, shape: tuple[int, ...]) -> tuple[str, Any]:
    """(path, open handle) of the file holding tensor `name` (shape: for the message when
    the checkpoint lacks it)."""
    if name not in self.weight_map:
      raise CheckpointError(
        f"{self.path}: missing tensor {name!r} (expected shape {list(shape)} from config.json)"
      )
    file = os.path.join(self.path, self.weight_map[name])
    if file not in self.handles:
      self.handles[file] = _open(file)
    return file, self.handles[file]

  def stored(self, name: str, shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
    file, handle = self.file(name, shape)
    try:
      part = handle.get_slice(name)
      kind, stored_shape = part.get_dtype(), tuple(part.get_shape())
    except Exception as err:
      raise CheckpointError(f"{file}: cannot read tensor {name!r} ({err})") from None
    return STORED_FLOATS.get(kind), stored_shape

  def get(self, name: str, shape: tuple[int, ...], dtype=None) -> np.ndarray:
    file, handle = self.file(name, shape)
    try:
      w = handle.get_tensor(name)
    except Exception as err:
      raise CheckpointError(f"{file}: cannot read tensor {name!r} ({err})") from None
    if tuple(w.shape) != shape:
      raise CheckpointError(
        f"{file}: tensor {name!r} has shape {list(w.shape)}; config.json implies {list(shape)}"
      )
    if not jnp.issubdtype(w.dtype, jnp.floating):
      raise CheckpointError(
        f"{file}: tensor {name!r} has dtype {w.dtype}; expected a floating-point dtype"
      )
    finite = np.isfinite(w) if self.check_finite else None
    if finite is not None and not finite.all():
      bad = int(w.size - finite.sum())
      raise CheckpointError(
        f"{file}: tensor {name!r} holds {bad} non-finite value(s) (NaN or "
        f"Inf) of {w.size}; load with check_finite=False (--no-check-finite) "
        "to skip this check"
      )
    return w if dtype is None else w.astype(dtype)


def load_hf(
  path: str, cfg: Config, dtype=None, *, check_finite: bool = True
) -> tuple[Config, dict[str, Any]]:
  """Reads a HF checkpoint directory -> (cfg, kvjax params pure dict).

  dtype: cast every tensor to it; None keeps the stored dtype or, when the floating tensors
  mix dtypes, loads them all in the dtype that holds most of the params (a MixedDtypeWarning
  names the others; transformers casts to config.json's `dtype`, which in the checkpoints it
  writes is that one). The returned cfg is untied (with a TiedHeadWarning) when it ties the
  embeddings but the files hold an lm_head.weight with other values than the embedding
  table: that head is loaded, as transformers does, never dropped. check_finite: refuse a
  tensor holding NaN or Inf, naming it (one reduction per tensor)."""
  reader = _Reader(path, check_finite)
  cfg = _untie_if_distinct(reader, cfg)
  moe = [l for l in range(cfg.n_layers) if cfg.moe_layers[l]]
  fused = bool(moe) and FUSED_EXPERTS.format(i=moe[0]) in reader.weight_map
  if dtype is None:
    named = [
      (n, entry[2])
      for entry in _entries(cfg, fused=fused)
      for group in (_experts(name, cfg) for name in _names(entry, cfg))
      for n in group
    ]
    dtype = _one_dtype(reader, named)
  params, used = from_tensors(cfg, lambda n, shape: reader.get(n, shape, dtype), fused=fused)
  _check_no_extra(reader, cfg, used)
  return cfg, jax.tree.map(jnp.asarray, params)


def from_tensors(
  cfg: Config, tensor: Callable[[str, tuple[int, ...]], Any], *, fused: bool = False
) -> tuple[dict[str, Any], set[str]]:
  """kvjax params from a checkpoint's tensors by Hugging Face name: `tensor(name, shape)` returns
  tensor `name` in its Hugging Face layout, checked to have `shape` (it raises for a missing or
  misshapen one). fused: the experts in FUSED_EXPERTS' layout. Returns the params pure dict (of
  numpy arrays when `tensor` gives numpy: the caller transfers them) and the names read, so that
  the caller can refuse the tensors left over."""
  params: dict[str, Any] = {}
  used = set()
  for entry in _entries(cfg, fused=fused):
    ours, name, shape, to_ours, _ = entry
    names = _names(entry, cfg)
    paths = ours if isinstance(ours, list) else [ours]
    ws = []  # per layer: one array per path (per-expert tensors stacked on the expert axis)
    for group in (_experts(n, cfg) for n in names):
      used.update(group)
      got = [to_ours(tensor(n, shape)) for n in group]
      got = got if isinstance(ours, list) else [(w,) for w in got]
      ws.append(
        tuple(np.stack([g[j] for g in got]) for j in range(len(paths))) if "{e}" in name else got[0]
      )
    for j, path_ in enumerate(paths):
      value = np.stack([w[j] for w in ws]) if "{i}" in name else ws[0][j]
      node = params
      for key in path_[:-1]:
        node = node.setdefault(key, {})
      node[path_[-1]] = value
  return params, used


def _check_no_extra(reader: _Reader, cfg: Config, used: set[str]) -> None:
  """CheckpointError naming the tensors of the files that the config has no place for (a tied
  lm_head.weight equal to the embedding table is the table itself)."""
  extra = sorted(
    n
    for n in reader.weight_map
    if n not in used
    and not n.endswith(IGNORED_SUFFIXES)
    and not (cfg.tie_embeddings and n == "lm_head.weight")
  )
  if extra:
    shown = ", ".join(repr(n) for n in extra[:5]) + (" ..." if len(extra) > 5 else "")
    raise CheckpointError(
      f"{reader.path}: {len(extra)} tensor(s) that a {cfg.family} model with this "
      f"config.json does not have: {shown}"
    )


def _untie_if_distinct(reader: _Reader, cfg: Config) -> Config:
  """cfg, untied when it ties the embeddings but the files also hold an lm_head.weight whose
  values differ from model.embed_tokens.weight (a TiedHeadWarning says so)."""
  head, embed = "lm_head.weight", "model.embed_tokens.weight"
  if not cfg.tie_embeddings or head not in reader.weight_map:
    return cfg
  shape = (cfg.vocab_size, cfg.d_model)
  file, _ = reader.file(head, shape)
  # (a head of another shape is reported by its entry once untied)
  if reader.stored(head, shape)[1] == shape and bool(
    np.array_equal(reader.get(head, shape), reader.get(embed, shape))
  ):
    return cfg  # the same table written twice: nothing is lost by tying
  user_warnings.warn(
    f"{file}: config.json ties the embeddings (tie_word_embeddings true), but the file's "
    f"{head!r} differs from {embed!r}: loaded it as an untied output head, as transformers "
    "does (set tie_word_embeddings to false in config.json to say so)",
    TiedHeadWarning,
  )
  return dataclasses.replace(cfg, tie_embeddings=False)


def _one_dtype(reader: _Reader, tensors: list[tuple[str, tuple[int, ...]]]):
  """The dtype to load the (name, shape) tensors in when none was asked for: None (each as
  stored) when their floating dtypes agree, else the one holding the most elements (the first
  in the checkpoint's order on a tie), with a MixedDtypeWarning naming the tensors cast."""
  # a missing tensor is reported by the reads, in the checkpoint's order
  stored = {n: reader.stored(n, shape) for n, shape in tensors if n in reader.weight_map}
  # as JAX holds them: float64 is float32 unless jax_enable_x64
  kinds = {n: jax.dtypes.canonicalize_dtype(k) for n, (k, _) in stored.items() if k is not None}
  sizes: dict[Any, int] = {}
  for n, kind in kinds.items():
    sizes[kind] = sizes.get(kind, 0) + int(np.prod(stored[n][1]))
  if len(sizes) < 2:
    return None
  chosen = max(sizes, key=lambda k: sizes[k])  # max keeps the first of equals
  odd = [n for n, kind in kinds.items() if kind != chosen]
  shown = ", ".join(f"{n!r} from {jnp.dtype(stored[n][0]).name}" for n in odd[:3])
  more = f" and {len(odd) - 3} more" if len(odd) > 3 else ""
  user_warnings.warn(
    f"{reader.path}: the checkpoint's tensors mix floating dtypes "
    f"({', '.join(dict.fromkeys(jnp.dtype(k).name for k, _ in stored.values() if k))}): "
    f"loaded all in {chosen.name}, "
    f"the dtype of most params, casting {shown}{more} (choose another with dtype=..., --dtype)",
    MixedDtypeWarning,
  )
  return chosen


def hf_tensors(params: dict[str, Any], cfg: Config) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array) for every tensor of a kvjax params pure dict."""
  for entry in _entries(cfg):
    ours, _, _, _, to_hf = entry
    values = []
    for path_ in ours if isinstance(ours, list) else [ours]:
      value = params
      for key in path_:
        value = value[key]
      values.append(value)
    names = _names(entry, cfg)
    if "{i}" in entry[1]:
      for i, name in enumerate(names):
        if "{e}" in name:
          for e, expert in enumerate(_experts(name, cfg)):
            yield expert, np.asarray(to_hf(*(v[i][e] for v in values)))
        else:
          yield name, np.asarray(to_hf(*(v[i] for v in values)))
    else:
      yield names[0], np.asarray(to_hf(*values))


def save_hf(path: str, params: dict[str, Any], cfg: Config) -> None:
  """Writes `model.safetensors` (tensors as stored, e.g. float32 or bfloat16)."""
  from safetensors.flax import save_file

  os.makedirs(path, exist_ok=True)
  tensors = {name: jnp.asarray(np.ascontiguousarray(w)) for name, w in hf_tensors(params, cfg)}
  save_file(tensors, os.path.join(path, SINGLE), metadata={"format": "pt"})


def save_params(path: str, params: Any, *, dtype=None) -> None:
  """Saves a params pytree with orbax (path must not exist yet), cast to `dtype` when given
  (e.g. bfloat16 to ship); `restore_params` casts back to its `like`'s dtypes."""
  import orbax.checkpoint as ocp

  if os.path.exists(path):
    raise FileExistsError(f"{path} already exists; save_params writes a new directory")
  if dtype is not None:
    params = jax.tree.map(lambda a: np.asarray(a).astype(dtype), jax.device_get(params))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), params)


def restore_params(path: str, like: Any) -> Any:
  """Restores what `save_params` wrote; `like` gives the tree, shapes and dtypes."""
  import orbax.checkpoint as ocp

  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no orbax checkpoint directory")
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like)
  with ocp.StandardCheckpointer() as ckptr:
    # Compare shapes first: a failed restore leaves orbax's async reads printing tracebacks.
    meta = ckptr.metadata(os.path.abspath(path)).item_metadata
    if meta is None:
      raise CheckpointError(
        f"{path}: not an orbax checkpoint (no metadata; was it written by save_params?)"
      )
    stored = _shapes(meta.tree)
    wanted = _shapes(abstract)
    diff = [
      f"{k}: stored {list(stored[k])}, model has {list(wanted[k])}"
      for k in wanted
      if k in stored and stored[k] != wanted[k]
    ]
    diff += [f"{k}: missing from the checkpoint" for k in wanted if k not in stored]
    diff += [f"{k}: not in the model" for k in stored if k not in wanted]
    if diff:
      shown = "; ".join(diff[:5]) + (f"; ... ({len(diff)} in all)" if len(diff) > 5 else "")
      raise CheckpointError(f"{path}: orbax checkpoint does not match the model: {shown}")
    try:
      return ckptr.restore(os.path.abspath(path), abstract)
    except (ValueError, KeyError, FileNotFoundError) as err:
      raise CheckpointError(f"{path}: orbax checkpoint does not match the model ({err})") from None


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """'a/b/c' path -> shape for every leaf (arrays, ShapeDtypeStructs or orbax ArrayMetadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape) for p, x in leaves}
