"""The trainer core every task shares (lm, eagle, coprocessor): the run config, AdamW under
warmup + cosine decay, the cache of compiled steps, batch checks and transfer, the run loop
(resume from orbax checkpoints, metrics, evaluation, progress), the run record.

A task supplies its loss (compiled into train / eval steps by `compiled`), its batches and its
validation; `run_loop` does the rest:

    opt_init, train_step, eval_step = compiled((model.graphdef, model.cfg), rc, build)
    state, records, start = run_loop(rc, state, batches, step, evaluate=..., ...)
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from kvjax.lm import distributed
from kvjax.train import metrics

Batch = dict[str, np.ndarray]

BATCH_KEYS = {
  "inputs": np.integer,
  "targets": np.integer,
  "mask": np.floating,
  "chars": np.floating,
}
# Optional int [B, T] arrays of packed batches: document index of each input inside its row
# and its position inside that document. When given, attention stays within a document.
OPTIONAL_KEYS = ("segment_ids", "positions")
CHECKPOINTS = "checkpoints"
BEST = "best"  # OUT/best: the state of the best evaluation, and best.json
RUN_FILE = "run.json"


class TrainError(ValueError):
  """A training setup that cannot run (bad hyperparameters, mismatched resume, bad batch)."""


class TrainInterrupted(KeyboardInterrupt):
  """Ctrl-C during training; its message says where the run stopped and how to resume."""


@dataclasses.dataclass(frozen=True)
class Domain:
  """The values a config field may take: a number of `kind` (int: an int; float: an int or a
  float; never a bool) for which ok(value), described as `expected`."""

  kind: type
  ok: Callable[[float], bool]
  expected: str


INT_POSITIVE = Domain(int, lambda v: v >= 1, "an int >= 1")
INT_NONNEG = Domain(int, lambda v: v >= 0, "an int >= 0")
POSITIVE = Domain(float, lambda v: 0 < v < math.inf, "a finite number > 0")
NONNEG = Domain(float, lambda v: 0 <= v < math.inf, "a number >= 0")
UNIT = Domain(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
UNIT_OPEN = Domain(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """What every training run has (TrainConfig's and kvjax.train.eagle.EagleConfig's base).

  steps: optimizer steps in total (a resumed run continues up to it).
  warmup: linear warmup steps from 0 to lr, then cosine decay to lr * final_lr_ratio at `steps`.
  weight_decay, clip_norm (global norm), b1, b2: AdamW's.
  save_every / eval_every / log_every: in steps; 0 = only at the end (save, eval) or never (log).
  keep: how many checkpoints the manager keeps.
  keep_best: also keep the state of the best evaluation so far (by the task's best metric,
    e.g. eval_bpc) in OUT/best, whatever `keep` drops. patience: stop early after this many
    evaluations in a row without a new best (0 = never; needs eval_every).

  BOOKKEEPING: the fields no compiled step reads (where and how often to save, log and
  evaluate; the seed, which only orders the data or is passed in as a PRNG key): every other
  field keys the compiled steps (`compiled`), so a field a loss reads can never reuse a step
  built for another value. NOT_RESUMED: the fields a resumed run may change. DOMAINS: each
  numeric field's domain, checked on construction (a subclass extends it).
  """

  BOOKKEEPING: ClassVar[frozenset[str]] = frozenset(
    {"out_dir", "save_every", "keep", "eval_every", "log_every", "seed", "keep_best", "patience"}
  )
  NOT_RESUMED: ClassVar[frozenset[str]] = frozenset(
    {"out_dir", "save_every", "keep", "eval_every", "log_every", "keep_best", "patience"}
  )

  steps: int
  batch_size: int
  seq_len: int
  lr: float = 3e-3
  warmup: int = 0
  final_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.95
  seed: int = 0
  out_dir: str
  save_every: int = 0
  keep: int = 3
  eval_every: int = 0
  log_every: int = 10
  keep_best: bool = False
  patience: int = 0

  DOMAINS: ClassVar[dict[str, Domain]] = {
    **dict.fromkeys(("steps", "batch_size", "seq_len", "keep"), INT_POSITIVE),
    **dict.fromkeys(
      ("warmup", "save_every", "eval_every", "log_every", "seed", "patience"), INT_NONNEG
    ),
    "lr": POSITIVE,
    "weight_decay": NONNEG,
    "clip_norm": POSITIVE,
    "final_lr_ratio": UNIT,
    "b1": UNIT_OPEN,
    "b2": UNIT_OPEN,
  }

  def __post_init__(self):
    for name, domain in self.DOMAINS.items():
      require(name, getattr(self, name), domain.ok, domain.expected, domain.kind)
    if self.warmup >= self.steps:
      raise TrainError(f"warmup ({self.warmup}) must be smaller than steps ({self.steps})")
    if self.patience and not self.eval_every:
      raise TrainError("patience (early stopping) needs eval_every > 0: it counts evaluations")
    if not isinstance(self.keep_best, bool):
      raise TrainError(f"keep_best must be a bool; got {self.keep_best!r}")
    if not isinstance(self.out_dir, str) or not self.out_dir:
      raise TrainError(f"out_dir must be a non-empty path; got {self.out_dir!r}")

  def compute_key(self) -> tuple:
    """The config as the compiled steps see it: its type and every field but BOOKKEEPING."""
    return (
      type(self),
      *(
        (f.name, getattr(self, f.name))
        for f in dataclasses.fields(self)
        if f.name not in self.BOOKKEEPING
      ),
    )

  def resume_key(self) -> dict[str, Any]:
    """The fields a resumed run must share with the run it continues."""
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.NOT_RESUMED}


def require(name, value, ok, expected, kind):
  """TrainError unless value is a number of `kind` (an int for int; no bool) for which ok(value)."""
  numeric = (int,) if kind is int else (int, float)
  if isinstance(value, bool) or not isinstance(value, numeric) or not ok(value):
    raise TrainError(f"{name} must be {expected}; got {value!r}")


def optimizer(tc: RunConfig) -> optax.GradientTransformation:
  """clip_by_global_norm(clip_norm), then AdamW under warmup + cosine decay."""
  return optax.chain(
    optax.clip_by_global_norm(tc.clip_norm),
    optax.adamw(optimizer_lr(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay),
  )


def optimizer_lr(tc: RunConfig) -> Callable[[jax.Array], jax.Array]:
  """The learning rate used at a step (the same schedule `optimizer` builds)."""
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=tc.lr,
    warmup_steps=tc.warmup,
    decay_steps=tc.steps,
    end_value=tc.lr * tc.final_lr_ratio,
  )


def check_batch(
  batch: Batch, tc: RunConfig, vocab_size: int, step: int, keys: dict = BATCH_KEYS
) -> None:
  """Raises TrainError unless batch matches the contract (shapes [B, T], dtypes, token range).
  keys: the required arrays and their kinds (EAGLE batches need no "chars")."""
  if not isinstance(batch, dict) or not set(keys) <= set(batch):
    got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise TrainError(f"batch {step}: expected a dict with keys {sorted(keys)}; got {got}")
  want = (tc.batch_size, tc.seq_len)
  optional = {k: np.integer for k in OPTIONAL_KEYS if k in batch}
  for key, kind in {**keys, **optional}.items():
    a = batch[key]
    if tuple(np.shape(a)) != want or not np.issubdtype(np.asarray(a).dtype, kind):
      raise TrainError(
        f"batch {step}: {key} must be a {kind.__name__} array of shape "
        f"[B, T] = {list(want)}; got {np.asarray(a).dtype}{list(np.shape(a))}"
      )
  for key in ("inputs", "targets"):
    a = np.asarray(batch[key])
    if a.min() < 0 or a.max() >= vocab_size:
      raise TrainError(
        f"batch {step}: {key} has token ids outside [0, {vocab_size}) "
        f"(min {a.min()}, max {a.max()}): the data and the model's vocabulary "
        "disagree"
      )


def to_device(batch: Batch, sharding_=None, keys: dict = BATCH_KEYS) -> dict[str, jax.Array]:
  """The `keys` arrays (int32 / float32 by kind; plus segment_ids, positions [B, T] int32 when
  present) on device: placed with sharding_ (the same global batch on every process, each
  taking the shards it holds), or on the default device."""
  out = {
    k: np.asarray(batch[k], np.int32 if kind is np.integer else np.float32)
    for k, kind in keys.items()
  }
  for key in OPTIONAL_KEYS:
    if key in batch:
      out[key] = np.asarray(batch[key], np.int32)
  return distributed.put(out, sharding_)


def batch_iter(batches, start: int) -> Iterator[Batch]:
  """The batches for steps start, start + 1, ... from a callable or an iterable."""
  if callable(batches):
    return iter(batches(start))
  it = iter(batches)
  for _ in range(start):
    next(it)
  return it


def check_resume(out_dir: str, run: dict[str, Any]) -> None:
  """Writes out_dir/run.json, or checks that a run already there is the same run (every
  process checks; process 0 writes)."""
  path = os.path.join(out_dir, RUN_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for part in ("model", "train"):
      if old.get(part) != run[part]:
        diff = sorted(
          k
          for k in set(old.get(part, {})) | set(run[part])
          if old.get(part, {}).get(k) != run[part].get(k)
        )
        raise TrainError(
          f"{out_dir} holds checkpoints of a different run ({part} settings "
          f"differ: {', '.join(diff)}); resume with the same settings or pass a "
          "new out dir"
        )
  distributed.barrier("kvjax check_resume")  # every process has read run.json before it is written
  if distributed.is_main():
    with open(path, "w") as f:
      json.dump(run, f, indent=2)


def _manager(
  tc: RunConfig, where: str = CHECKPOINTS, keep: int | None = -1, check: int | str | None = None
):
  """The orbax manager of OUT/where, keeping tc.keep checkpoints (keep=-1), `keep`, or all
  (None), after `check_checkpoints(OUT/where, check)` (before orbax opens it and logs about
  what it finds)."""
  path = os.path.join(tc.out_dir, where)
  check_checkpoints(path, check)
  options = ocp.CheckpointManagerOptions(
    max_to_keep=tc.keep if keep == -1 else keep, create=True, enable_async_checkpointing=False
  )
  return ocp.CheckpointManager(os.path.abspath(path), options=options)


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


def _restore(manager, state, step: int | None = None):
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


def run_loop(
  rc: RunConfig,
  state,
  batches,
  step: Callable,
  *,
  evaluate: Callable[[Any], dict[str, float]] | None,
  amount: Callable[[Batch], float],
  rate_name: str,
  postfix: Callable[[dict[str, Any]], dict[str, str]],
  plot_label: str | None = None,
  progress: bool = True,
  flops: Callable[[Batch], float] | None = None,
  best_metric: str | None = None,
):
  """The loop every trainer shares: resume from rc.out_dir's latest checkpoint, then for steps
  start + 1 .. rc.steps take the next batch and run `step(state, batch, i) -> (state, stats)`
  (i = the 0-based step index); on log steps record the stats (without "n"), the rate
  (`amount` of the batches per second, excluding evaluation and checkpoint writes, as
  `rate_name`), with `flops` (a step's training FLOPs on its batch) the model FLOPs
  utilisation `mfu` against this device's measured matmul peak, and, on eval steps,
  `evaluate(state)`; checkpoint every rc.save_every steps and at the end; metrics.jsonl and
  loss.png. best_metric (an evaluate key, lower is better): with rc.keep_best the best state is
  kept in OUT/best; with rc.patience the run stops after that many evaluations without a new
  best (the last state is checkpointed; its record has stopped_early). Returns (state,
  records, start step)."""
  label = {} if plot_label is None else {"ylabel": plot_label}
  records: list[dict[str, Any]] = []
  has_eval = evaluate is not None
  tracking = best_metric is not None and has_eval and (rc.keep_best or rc.patience)
  if (rc.keep_best or rc.patience) and not tracking:
    raise TrainError(
      "keep_best and patience need held-out evaluation batches (a validation metric to compare)"
    )
  peak = matmul_peak() if flops is not None else None
  with _manager(rc, check="latest") as manager, _manager(rc, BEST, 1) as best_manager:
    start = 0
    if manager.latest_step() is not None:
      state = _restore(manager, state)
      start = int(state["step"])
    main = distributed.is_main()  # the one process that writes files and shows progress
    if main:
      metrics.truncate(rc.out_dir, start)
    best = read_best(rc.out_dir)
    end = rc.steps
    if tracking and rc.patience and best and best["evals_since"] >= rc.patience:
      end = start  # this run already stopped early: nothing more to train
    it = batch_iter(batches, start)
    bar = _progress(progress and main, start, rc.steps)
    t0, done, work = time.perf_counter(), 0.0, 0.0
    try:
      for i in range(start + 1, end + 1):
        batch = next(it, None)
        if batch is None:
          raise TrainError(f"the batch iterator ended before step {i} of {rc.steps}")
        state, stats = step(state, batch, i - 1)  # checks the batch first
        done += amount(batch)
        work += flops(batch) if flops is not None else 0.0
        stop = False
        if _is_log_step(rc, i, has_eval):
          stats = distributed.fetch(stats)
          stats.pop("n", None)
          record = {"step": i, **{k: float(v) for k, v in stats.items()}}
          elapsed = max(time.perf_counter() - t0, 1e-9)
          record[rate_name] = done / elapsed
          if peak:
            record["mfu"] = work / elapsed / peak
          if _is_eval_step(rc, i, has_eval):
            record.update(evaluate(state))
            if tracking:
              value = record[best_metric]
              if best is None or value < best["value"]:
                best = {"step": i, "metric": best_metric, "value": value, "evals_since": 0}
                if rc.keep_best:
                  best_manager.save(i, args=ocp.args.StandardSave(state), force=True)
              else:
                best["evals_since"] += 1
              if main:
                _write_best(rc.out_dir, best)
              stop = bool(rc.patience) and best["evals_since"] >= rc.patience
              record["best_" + best_metric] = best["value"]
              if stop:
                record["stopped_early"] = 1.0
          records.append(record)
          if main:
            metrics.append(rc.out_dir, record)
          bar.set_postfix(postfix(record) | ({"mfu": f"{record['mfu']:.0%}"} if peak else {}))
          t0, done, work = time.perf_counter(), 0.0, 0.0  # the rates exclude evaluation
        bar.update(1)
        if (rc.save_every and i % rc.save_every == 0) or i == rc.steps or stop:
          manager.save(i, args=ocp.args.StandardSave(state), force=True)
          if main:
            metrics.plot(rc.out_dir, **label)
          t0, done, work = time.perf_counter(), 0.0, 0.0  # and checkpoint writes
        if stop:
          break
    except KeyboardInterrupt:
      bar.close()
      manager.wait_until_finished()
      kept = manager.latest_step()
      where = (
        f"the latest checkpoint is step {kept} in {os.path.join(rc.out_dir, CHECKPOINTS)}"
        if kept is not None
        else "no checkpoint was written yet"
      )
      done_steps = int(state["step"])  # the last step whose update completed
      raise TrainInterrupted(
        f"interrupted after step {done_steps} of {rc.steps}; {where}; run "
        "the same command to resume from it"
      ) from None
    bar.close()
    manager.wait_until_finished()
    best_manager.wait_until_finished()
  if distributed.is_main():
    metrics.plot(rc.out_dir, **label)
  return state, records, start


def read_best(out_dir: str) -> dict[str, Any] | None:
  """OUT/best/best.json: {step, metric, value, evals_since} of the best evaluation, or None."""
  path = os.path.join(out_dir, BEST, "best.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_best(out_dir: str, best: dict[str, Any]) -> None:
  os.makedirs(os.path.join(out_dir, BEST), exist_ok=True)
  with open(os.path.join(out_dir, BEST, "best.json"), "w") as f:
    json.dump(best, f)


_PEAK: list[float] = []


def matmul_peak(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of the default device on a float32 [n, n] x [n, n] matmul, best of `repeats`
  (measured once per process): the peak MFU is reported against."""
  if not _PEAK:
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
      t0 = time.perf_counter()
      f(x).block_until_ready()
      best = min(best, time.perf_counter() - t0)
    _PEAK.append(2 * n**3 / best)
  return _PEAK[0]


def restore_step(rc: RunConfig, state, step: int | str):
  """The state of checkpoint `step` (an int kept in OUT/checkpoints, or "best": OUT/best) of
  run rc, restored with state's structure; TrainError naming what is there otherwise."""
  where = BEST if step == "best" else CHECKPOINTS
  with _manager(rc, where, None, check="latest" if step == "best" else step) as manager:
    steps = sorted(manager.all_steps())
    want = steps[-1] if step == "best" and steps else step
    if want not in steps:
      kept = f"kept steps: {steps}" if steps else "none kept"
      raise TrainError(f"{os.path.join(rc.out_dir, where)} has no checkpoint {step} ({kept})")
    return _restore(manager, state, want), want


def _is_eval_step(tc: RunConfig, step: int, has_eval: bool) -> bool:
  return has_eval and ((tc.eval_every > 0 and step % tc.eval_every == 0) or step == tc.steps)


def _is_log_step(tc: RunConfig, step: int, has_eval: bool) -> bool:
  """Log steps: every log_every, every eval step and the last step."""
  return (
    (tc.log_every > 0 and step % tc.log_every == 0)
    or step == tc.steps
    or _is_eval_step(tc, step, has_eval)
  )


def _progress(enabled: bool, start: int, total: int):
  return tqdm(
    total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, disable=not enabled
  )


STEPS: dict[Any, tuple] = {}  # compiled steps, shared by every run of one structure and config


def compiled(
  structure: tuple, rc: RunConfig, build: Callable[[optax.GradientTransformation], tuple]
) -> tuple:
  """(opt_init, *build(optimizer(rc))), built once per process for `structure` (the graphdefs
  and configs of the models the steps close over) and rc's compute_key, so that repeated runs
  (tests, resumes) reuse the compiled programs."""
  key = (*structure, rc.compute_key())
  if key not in STEPS:
    opt = optimizer(rc)
    STEPS[key] = (jax.jit(opt.init), *build(opt))
  return STEPS[key]
