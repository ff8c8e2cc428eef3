"""Data- and tensor-parallel layout with JAX SPMD: logical axes -> mesh axes, no hand-written
communication.

Every param and cache array has a tuple of logical axis names, one per dimension, declared
once where it is made: a param by `declare` (its nnx.Param's metadata, which Flax's
`nnx.get_partition_spec` also reads), a cache field in its class's `AXES`. `rules` map logical
names onto the axes of a 2-D ("data", "model") mesh. Arrays are placed with `NamedSharding`s
and the jitted steps of `steps` run unchanged: XLA's SPMD partitioner inserts the collectives.
A dimension whose size the mesh axis does not divide (e.g. 2 kv heads on a 4-way "model" axis,
or a batch of 3 on 2-way "data") is replicated along that axis rather than rejected, so every
model runs on every mesh; only the speed-up for that dimension is lost. Results equal the
single-device ones up to float summation order. A mixture of experts' expert axis ("experts")
takes the model axis ahead of its ffn axis (expert parallelism); when the experts do not divide
it, their ffn dimension takes it instead.

    mesh = sharding.make_mesh(data=2, model=4)
    out = lm.generate(sharding.shard(model, mesh), prompts)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

if TYPE_CHECKING:
  from kvjax.lm.model import Model

AXES = ("data", "model")

# (logical axis, mesh axis or None). Logical names not listed are replicated.
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
DEFAULT_RULES: Rules = (
  ("batch", "data"),
  ("heads", "model"),
  ("kv_heads", "model"),
  ("ffn", "model"),
  ("vocab", "model"),
  ("experts", "model"),  # expert parallelism: ahead of ffn in each expert array, so it wins
)


def _normalize(rules: Rules | None) -> Rules:
  """rules as a hashable tuple of (logical, mesh axis | tuple of mesh axes | None); None ->
  DEFAULT_RULES."""
  if rules is None:
    return DEFAULT_RULES
  if isinstance(rules, dict):
    rules = rules.items()
  return tuple((str(k), v if v is None or isinstance(v, str) else tuple(v)) for k, v in rules)


def make_mesh(data: int = 1, model: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, model) mesh with axes ("data", "model") over exactly data * model devices:
  `devices`, default all of `jax.devices()` (pass a slice such as `jax.devices()[:4]` to use
  fewer). Axes are Auto (GSPMD propagates shardings)."""
  for name, n in (("data", data), ("model", model)):
    if not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f"make_mesh: {name} must be an int >= 1; got {n!r}")
  given = devices is not None
  devices = list(jax.devices() if devices is None else devices)
  if data * model != len(devices):
    where = "given" if given else "available (jax.devices())"
    hint = (
      ""
      if given or data * model > len(devices)
      else (f"; to use a subset pass devices=jax.devices()[:{data * model}]")
    )
    raise ValueError(
      f"make_mesh: data={data} x model={model} = {data * model} devices, but "
      f"{len(devices)} {'are' if len(devices) != 1 else 'is'} {where}{hint}"
    )
  return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def logical_spec(
  axes: Sequence[str], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose dimensions have logical names `axes`.

  Each dimension takes the mesh axis (or axes) its rule names, unless that mesh axis is not in
  the mesh, is already used by an earlier dimension, or its size does not divide the
  dimension: then the dimension is replicated. Trailing replicated dims are kept as None."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
  table = dict(_normalize(rules))
  used: set[str] = set()
  spec = []
  for name, size in zip(axes, shape):
    target = table.get(name)
    names = (target,) if isinstance(target, str) else tuple(target or ())
    ways = int(np.prod([mesh.shape.get(a, 0) for a in names])) if names else 1
    if not names or used & set(names) or any(a not in mesh.shape for a in names) or size % ways:
      spec.append(None)
      continue
    used.update(names)
    spec.append(names[0] if len(names) == 1 else names)
  return PartitionSpec(*spec)


def declare(value: Any, axes: Sequence[str]) -> nnx.Param:
  """value [*shape] as an nnx.Param that declares its logical axes, one name per dimension:
  the only record of how the param shards (`param_shardings`). Placing it on a mesh is left to
  `shard_params` (no eager sharding at creation)."""
  axes = tuple(axes)
  if len(axes) != len(value.shape):
    raise ValueError(f"logical axes {axes} do not match the param's shape {tuple(value.shape)}")
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def param_axes(state: nnx.State) -> dict[str, Any]:
  """The logical axes each param of `state` declares, as a nested dict shaped like its pure
  dict (`nnx.to_pure_dict`). A param made without them is a ValueError naming it: nothing is
  replicated by omission."""
  out: dict[str, Any] = {}
  for path, var in nnx.to_flat_state(state):
    name = "/".join(str(k) for k in path)
    axes = var.get_metadata().get("out_sharding")
    shape = np.shape(var.get_value())
    if axes is None:
      raise ValueError(
        f"sharding: param {name!r} {list(shape)} was made without logical axes; declare them "
        "where it is made (sharding.declare(value, axes))"
      )
    if len(axes) != len(shape):
      raise ValueError(
        f"sharding: param {name!r} has shape {list(shape)}, but declares "
        f"{len(axes)} logical axes {tuple(axes)}"
      )
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = tuple(axes)
  return out


def param_shardings(params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict[str, Any]:
  """NamedSharding per param from the logical axes it declared, as a nested dict shaped like
  the params' pure dict. params: an nnx.State of declared params, or anything whose `state` is
  one (a Model, an EAGLE head's LoadedHead, a Coprocessor)."""
  state = params if isinstance(params, nnx.State) else params.state
  return jax.tree.map(
    lambda a, ax: NamedSharding(mesh, logical_spec(ax, np.shape(a), mesh, rules)),
    nnx.to_pure_dict(state),
    param_axes(state),
  )


def shard_params(x: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """x (a Model, an EAGLE head's LoadedHead, a Coprocessor: anything with a `state` of declared
  params and `with_params`) with every param placed on `mesh` by its logical axes and `rules`.
  A model is placed by `shard`, which also lays out its caches and activations."""
  # Through host memory one param at a time: a device-to-device reshard compiles a small
  # program per (shape, layout), which costs more than the copy for a one-off placement.
  params = jax.tree.map(
    lambda a, s: jax.device_put(np.asarray(a), s),
    nnx.to_pure_dict(x.state),
    param_shardings(x, mesh, rules),
  )
  return x.with_params(params)


def shard(model: Model, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Model:
  """`model` with every param placed on `mesh` by its logical axes and `rules` (a hashable
  tuple of (logical, mesh axis) pairs). The result carries mesh and rules (so `new_cache`
  lays caches out to match) and an empty compile cache."""
  rules = _normalize(rules)
  dec = shard_params(model, mesh, rules).decoder
  dec.layout = (mesh, rules)  # static: the forward constrains its activations to match
  graphdef, state = nnx.split(dec)
  return dataclasses.replace(
    model, graphdef=graphdef, state=state, mesh=mesh, rules=rules, compiled={}
  )


def constrain(x: jax.Array, axes: Sequence[str], layout: tuple[Mesh, Rules] | None) -> jax.Array:
  """x laid out by its logical `axes` on layout = (mesh, rules); unchanged when layout is None."""
  if layout is None:
    return x
  mesh, rules = layout
  return jax.lax.with_sharding_constraint(
    x, NamedSharding(mesh, logical_spec(axes, x.shape, mesh, rules))
  )


def cache_shardings(cache, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """The cache (any of `kvjax.cache`'s dataclasses) with a NamedSharding in place of each
  array: every array field by the logical axes its class declares once in `AXES` (K/V
  [L, B, K, S, H] by (layers, batch, kv_heads, cache_len, head_dim)); a field holding a cache
  (PrefixCache's prefix and rows) by that cache's own declaration."""
  axes = getattr(type(cache), "AXES", {})
  out = {}
  for f in dataclasses.fields(cache):
    x = getattr(cache, f.name)
    if dataclasses.is_dataclass(x):
      out[f.name] = cache_shardings(x, mesh, rules)
    elif isinstance(x, jax.Array | np.ndarray):
      if f.name not in axes:
        raise ValueError(
          f"sharding: {type(cache).__name__}.{f.name} has no logical axes; "
          f"declare them in {type(cache).__name__}.AXES"
        )
      out[f.name] = NamedSharding(mesh, logical_spec(axes[f.name], x.shape, mesh, rules))
  return dataclasses.replace(cache, **out)


def shard_cache(cache, mesh: Mesh, rules: Rules | None = DEFAULT_RULES):
  """`cache` placed on `mesh` (a batch the data axis does not divide is replicated)."""
  return jax.device_put(cache, cache_shardings(cache, mesh, rules))
