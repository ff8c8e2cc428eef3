"""A run's files under OUT: run.json (the settings a resume must share), the orbax checkpoints
in OUT/checkpoints, and the best evaluation's state in OUT/best with best.json.

A damaged checkpoint (a write cut short, a truncated copy) is found before training starts
(`check_checkpoints`) or when it is restored (`restore`), and reported as a TrainError naming
its directory and the checkpoint that removing it falls back to; what orbax's abandoned reads
of it would print later is dropped (`_drop_leftovers`).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from kvjax.lm import distributed
from kvjax.train.errors import TrainError

CHECKPOINTS = "checkpoints"
BEST = "best"  # OUT/best: the state of the best evaluation, and best.json
RUN_FILE = "run.json"


def start_run(rc, model: dict[str, Any], ignore: tuple[str, ...] = ()) -> None:
  """Creates the run directory of rc (a `kvjax.train.loop.RunConfig`) and checks that a run
  already there is this run, or writes its run.json (`check_resume`): `model`, the config of
  the model or module it trains, less its `ignore` keys (where a frozen model came from, which
  makes no other run), and rc.resume_key()."""
  os.makedirs(rc.out_dir, exist_ok=True)
  model = {k: v for k, v in model.items() if k not in ignore}
  check_resume(rc.out_dir, {"model": model, "train": rc.resume_key()})


def read_run(run_dir: str) -> dict[str, Any] | None:
  """run_dir/run.json ({"model": ..., "train": ...}), or None where there is none."""
  try:
    with open(os.path.join(run_dir, RUN_FILE)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
  """The keys, sorted, whose values differ between a and b (absent counts as None)."""
  return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def check_resume(out_dir: str, run: dict[str, Any]) -> None:
  """Writes out_dir/run.json, or checks that a run already there is the same run (every
  process checks; process 0 writes). `run` is compared as it reads back from JSON (tuples
  become lists)."""
  run = json.loads(json.dumps(run))
  path = os.path.join(out_dir, RUN_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for part in ("model", "train"):
      if old.get(part) != run[part]:
        diff = differing(old.get(part, {}), run[part])
        raise TrainError(
          f"{out_dir} holds checkpoints of a different run ({part} settings "
          f"differ: {', '.join(diff)}); resume with the same settings or pass a "
          "new out dir"
        )
  distributed.barrier("kvjax check_resume")  # every process has read run.json before it is written
  if distributed.is_main():
    with open(path, "w") as f:
      json.dump(run, f, indent=2)


def open_manager(
  out_dir: str, keep: int | None, where: str = CHECKPOINTS, check: int | str | None = None
) -> ocp.CheckpointManager:
  """The orbax manager of OUT/where, keeping `keep` checkpoints (None: all), after
  `check_checkpoints(OUT/where, check)` (before orbax opens it and logs about what it finds)."""
  path = os.path.join(out_dir, where)
  check_checkpoints(path, check)
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=True, enable_async_checkpointing=False
  )
  return ocp.CheckpointManager(os.path.abspath(path), options=options)


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
  """Checkpoints `state` as `step`, even off the manager's own save interval."""
  manager.save(step, args=ocp.args.StandardSave(state), force=True)


def check_checkpoints(path: str, step: int | str | None = "latest") -> None:
  """TrainError when the checkpoint directory path (e.g. OUT/checkpoints) is there but no
  directory, or when its step dir `step` ("latest": the highest) is visibly damaged (see
  `_damage`): found before any training starts, not at the first save or the restore."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise TrainError(
      f"{path} is not a directory: it is where the run keeps its checkpoints; "
      "remove it or pass a new out dir"
    )
  steps = _step_dirs(path)
  if step == "latest":
    step = max(steps, default=None)
  if step in steps:
    why = _damage(os.path.join(path, str(step)))
    if why:
      raise _damaged(path, step, steps, why)


def _step_dirs(path: str) -> list[int]:
  """The steps of the checkpoint directories under path (orbax names them by step)."""
  if not os.path.isdir(path):
    return []
  return sorted(
    int(n) for n in os.listdir(path) if n.isdigit() and os.path.isdir(os.path.join(path, n))
  )


def _damage(where: str) -> str | None:
  """What makes the checkpoint dir `where` unreadable on sight (empty, no default/ item, an
  empty file in it: a write cut short or a truncated copy), or None."""
  if not os.listdir(where):
    return "it is empty"
  item = os.path.join(where, "default")
  if not os.path.isdir(item):
    return "it has no default/ item"
  empty = [
    os.path.relpath(os.path.join(d, f), where)
    for d, _, files in os.walk(item)
    for f in files
    if os.path.getsize(os.path.join(d, f)) == 0
  ]
  if empty:
    return f"empty file {empty[0]}" + (f" and {len(empty) - 1} more" if len(empty) > 1 else "")
  return None


def _damaged(path: str, step: int, steps: list[int], why: str) -> TrainError:
  """The error for checkpoint `step` under path that cannot be read: which directory, why,
  and which checkpoint removing it falls back to."""
  where = os.path.join(path, str(step))
  earlier = [s for s in steps if s < step]
  then = f"resume from step {max(earlier)}" if earlier else "start afresh"
  return TrainError(
    f"{where}: the checkpoint of step {step} cannot be read ({why}); it is "
    f"damaged (e.g. a write that was cut short): remove {where} to {then}"
  )


def restore(manager: ocp.CheckpointManager, state, step: int | None = None):
  """Checkpoint `step` (default the latest) restored with state's structure, shapes, dtypes
  and shardings; TrainError naming its directory when it cannot be read (and what orbax's
  abandoned reads of it would print later is dropped: see `_drop_leftovers`)."""
  step = manager.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  _drop_leftovers(None)  # hooked before the restore: leftovers may come before it fails
  try:
    with warnings.catch_warnings(record=True) as seen:
      warnings.simplefilter("always")
      restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    for w in seen:  # the restore worked: its warnings are real, shown as they would have been
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return restored
  except Exception as err:  # orbax and tensorstore raise many kinds for damaged files
    path = str(manager.directory)
    where = os.path.join(path, str(step))
    failure = _damaged(path, step, list(manager.all_steps()), _damage(where) or _first_line(err))
  _drop_leftovers(where)
  gc.collect()  # collect what is collectable now, while the hooks are surely in place
  raise failure


def _first_line(err: Exception) -> str:
  """`Type: the first line of err's message`, tensorstore's spec dump cut off, at most ~160
  characters."""
  text = str(err).strip().splitlines()[0] if str(err).strip() else ""
  text = text.split(" See full TensorStore")[0].split(" [tensorstore_spec=")[0]
  text = text if len(text) <= 160 else text[:157] + "..."
  return f"{type(err).__name__}: {text}" if text else type(err).__name__


_DAMAGED: set[str] = set()  # checkpoint dirs already reported as unreadable


def _drop_leftovers(where: str | None) -> None:
  """Once a restore of checkpoint dir `where` failed (and was reported), drops what orbax's
  abandoned reads of it make Python print later, often at exit, as tracebacks and error logs:
  unraisable exceptions (coroutines garbage-collected with an error about `where`, callbacks
  into orbax's event loop after it closed) and asyncio's "exception was never retrieved" logs
  about `where`, and the RuntimeWarnings of coroutines it abandoned ("never awaited"). Anything
  else passes. The hooks go in once (again when a test runner swaps
  sys.unraisablehook)."""
  if where is not None:
    _DAMAGED.add(os.path.abspath(where))
    # an abandoned read's coroutine, collected later, warns that it was never awaited
    warnings.filterwarnings(
      "ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning
    )

  def about_damaged(err) -> bool:
    return err is not None and any(d in str(err) for d in _DAMAGED)

  previous = sys.unraisablehook
  if not getattr(previous, "kvjax_leftovers", False):

    def hook(unraisable):
      err = unraisable.exc_value
      closed = isinstance(err, RuntimeError) and str(err) == "Event loop is closed"
      if not (closed or about_damaged(err)):
        previous(unraisable)

    hook.kvjax_leftovers = True
    sys.unraisablehook = hook
  log = logging.getLogger("asyncio")
  if not any(getattr(f, "kvjax_leftovers", False) for f in log.filters):

    def keep(record) -> bool:
      err = record.exc_info[1] if record.exc_info else None
      return not ("exception was never retrieved" in record.getMessage() and about_damaged(err))

    keep.kvjax_leftovers = True
    log.addFilter(keep)


def read_best(out_dir: str) -> dict[str, Any] | None:
  """OUT/best/best.json: {step, metric, value, evals_since} of the best evaluation, or None."""
  path = os.path.join(out_dir, BEST, "best.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_best(out_dir: str, best: dict[str, Any]) -> None:
  """Writes OUT/best/best.json (see `read_best`)."""
  os.makedirs(os.path.join(out_dir, BEST), exist_ok=True)
  with open(os.path.join(out_dir, BEST, "best.json"), "w") as f:
    json.dump(best, f)


def restore_step(out_dir: str, state, step: int | str):
  """(state, step) of checkpoint `step` (an int kept in OUT/checkpoints, or "best": OUT/best)
  of the run in out_dir, restored with state's structure; TrainError naming what is there
  otherwise."""
  where = BEST if step == "best" else CHECKPOINTS
  check = "latest" if step == "best" else step
  with open_manager(out_dir, None, where, check=check) as manager:
    steps = sorted(manager.all_steps())
    want = steps[-1] if step == "best" and steps else step
    if want not in steps:
      kept = f"kept steps: {steps}" if steps else "none kept"
      raise TrainError(f"{os.path.join(out_dir, where)} has no checkpoint {step} ({kept})")
    return restore(manager, state, want), want
