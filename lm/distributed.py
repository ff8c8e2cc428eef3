"""Several processes (hosts) on one mesh: JAX's multi-controller SPMD through `jax.distributed`.

Every process runs the same program with the same arguments (the same prompts, the same
config, the same seed). `initialize` joins the processes; after it `jax.devices()` lists every
process's devices, so `sharding.make_mesh` builds a global mesh and `sharding.shard` places a
model across all of them. A process holds only its own shards of a global array, so host values
enter with `put` (each process copies the shards it holds out of the same full value) and
results leave with `fetch` (shards gathered from every process; a fully replicated or
single-process array is read directly, as before, at no extra cost).

    from kvjax.lm import distributed, sharding
    distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=i)  # or from env
    model = sharding.shard(lm.load(path), sharding.make_mesh(data=2, model=4))
    out = lm.generate(model, prompts)                  # the same result on every process

On a Cloud TPU pod slice (or under SLURM / Open MPI) plain `initialize()` detects everything.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

__all__ = ["ENV", "barrier", "fetch", "initialize", "is_main", "put"]

# argument -> the environment variable read when the argument is None (JAX's own names).
ENV = {
  "coordinator": "JAX_COORDINATOR_ADDRESS",
  "num_processes": "JAX_NUM_PROCESSES",
  "process_id": "JAX_PROCESS_ID",
  "local_devices": "KVJAX_LOCAL_DEVICES",
}


def _env_int(name: str, value: int | None) -> int | None:
  if value is not None:
    return value
  raw = os.environ.get(ENV[name])
  if raw is None or raw == "":
    return None
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"{ENV[name]}={raw!r}: expected an int") from None


def initialize(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  local_devices: int | None = None,
  timeout_s: int = 300,
) -> None:
  """Joins this process to the others (`jax.distributed.initialize`); call it first, before
  anything touches a device.

  coordinator: "HOST:PORT" of process 0 (every process passes the same); num_processes; process_id
  in [0, num_processes). Each None reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID; all three unset -> JAX's cluster auto-detection (Cloud TPU, SLURM, Open MPI,
  ...). local_devices (or KVJAX_LOCAL_DEVICES): simulated CPU devices per process, for testing on
  one machine (collectives between CPU processes go through gloo). timeout_s: how long to wait for
  every process to join."""
  num_processes = _env_int("num_processes", num_processes)
  process_id = _env_int("process_id", process_id)
  local_devices = _env_int("local_devices", local_devices)
  coordinator = coordinator or os.environ.get(ENV["coordinator"]) or None
  for name, n, lo in (("num_processes", num_processes, 1), ("local_devices", local_devices, 1)):
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < lo):
      raise ValueError(f"distributed.initialize: {name} must be an int >= {lo}; got {n!r}")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(
      f"distributed.initialize: process_id must be in [0, {num_processes}); got {process_id!r}"
    )
  if coordinator is not None and (
    ":" not in coordinator or not coordinator.rsplit(":", 1)[1].isdigit()
  ):
    raise ValueError(f"distributed.initialize: coordinator must be HOST:PORT; got {coordinator!r}")
  given = [coordinator is not None, num_processes is not None, process_id is not None]
  if any(given) and not all(given):
    missing = [n for n, g in zip(("coordinator", "num_processes", "process_id"), given) if not g]
    raise ValueError(
      f"distributed.initialize: {', '.join(missing)} missing (pass it, or set "
      f"{', '.join(ENV[n] for n in missing)}); give all three, or none to "
      "auto-detect the cluster"
    )
  if local_devices is not None:
    jax.config.update("jax_num_cpu_devices", local_devices)
  jax.distributed.initialize(
    coordinator, num_processes, process_id, initialization_timeout=timeout_s
  )


def is_main() -> bool:
  """True on process 0, the one that writes files and prints progress."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def put(x, sharding: Sharding | None = None):
  """Host value x (an array or a pytree of them, the same on every process) as an array placed
  with `sharding` (one sharding for every leaf, or a pytree of them; None: the default device,
  as `jax.device_put`). Across processes each process copies the shards it holds out of x."""
  if sharding is None or jax.process_count() == 1:
    return jax.device_put(x, sharding)
  if isinstance(sharding, Sharding):
    return jax.tree.map(lambda a: _global(a, sharding), x)
  return jax.tree.map(_global, x, sharding)


def _global(x, sharding: Sharding) -> jax.Array:
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.jit(lambda a: a, out_shardings=sharding)(x)  # already global: reshard on device
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def fetch(tree) -> Any:
  """Every array of `tree` as a numpy array on this host (the same on every process): an array
  spread over several processes is gathered from all of them (every process must call this
  together); one this process holds whole is read directly."""
  return jax.tree.map(_fetch, tree)


def _fetch(x):
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
