"""The trainer core every task shares (lm, eagle, coprocessor): the run config, AdamW under
warmup + cosine decay, the cache of compiled steps, batch checks and transfer, and the run loop
(resume from the latest checkpoint, metrics, evaluation, early stopping, progress). The run's
files (run.json, the orbax checkpoints, the best state) are `kvjax.train.checkpoints`'.

A task supplies its loss (compiled into train / eval steps by `compiled`), its batches and its
validation; `run_loop` does the rest:

    opt_init, train_step, eval_step = compiled((model.graphdef, model.cfg), rc, build)
    state, records, start = run_loop(rc, state, batches, step, evaluate=..., ...)
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from kvjax.lm import distributed
from kvjax.train import checkpoints, metrics
from kvjax.train.errors import TrainError, TrainInterrupted

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
# The arrays of a task that counts tokens, not characters (EAGLE heads, coprocessors).
TOKEN_KEYS = {k: v for k, v in BATCH_KEYS.items() if k != "chars"}


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class AddOnConfig(RunConfig):
  """A run that trains a small module (an EAGLE head, a cache coprocessor) against a frozen
  model: RunConfig's fields with lr 1e-3 and no weight decay by default, and eval_batches,
  the held-out batches per evaluation (bookkeeping: no compiled step reads it)."""

  lr: float = 1e-3
  weight_decay: float = 0.0
  eval_batches: int = 8

  DOMAINS: ClassVar[dict[str, Domain]] = {**RunConfig.DOMAINS, "eval_batches": INT_POSITIVE}
  BOOKKEEPING = RunConfig.BOOKKEEPING | {"eval_batches"}
  NOT_RESUMED = RunConfig.NOT_RESUMED | {"eval_batches"}


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


def train_state(params, opt_init: Callable) -> dict[str, Any]:
  """The train state at step 0: {"params", "opt_state": opt_init(params), "step": int32 []}.
  With params on a mesh, the leaves that are not (the step counters) are placed on it
  replicated, as the train step returns them: its first call compiles the program that every
  later call runs (not one for step 1 and another for the rest)."""
  state = {"params": params, "opt_state": opt_init(params), "step": jnp.zeros((), jnp.int32)}
  placed = lambda a: isinstance(getattr(a, "sharding", None), NamedSharding)
  meshes = {a.sharding.mesh for a in jax.tree.leaves(params) if placed(a)}
  if not meshes:
    return state
  (mesh,) = meshes
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(
    lambda a: a if placed(a) else jax.device_put(np.asarray(a), replicated), state
  )


def apply_update(
  opt: optax.GradientTransformation,
  schedule_lr: Callable[[jax.Array], jax.Array],
  state: dict[str, Any],
  grads,
  stats: dict[str, jax.Array],
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One optimizer step of the train state on `grads` -> (the next state, stats with grad_norm
  (before clipping) and lr (this step's, from `optimizer_lr`) added)."""
  updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  stats = {**stats, "grad_norm": optax.tree.norm(grads), "lr": schedule_lr(state["step"])}
  return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, stats


def restore_params(run_dir: str, config: type[RunConfig], settings: dict[str, Any], params, step):
  """The trained params of checkpoint `step` (a kept int, or "best") of the run in run_dir,
  in `params`' structure, float32 on the host: the run's optimizer (`config` built from its
  recorded `settings`) gives the train state's structure to restore into."""
  fields = {f.name for f in dataclasses.fields(config)}
  rc = config(**{k: v for k, v in settings.items() if k in fields}, out_dir=run_dir)
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  state, _ = checkpoints.restore_step(run_dir, train_state(params, optimizer(rc).init), step)
  return jax.tree.map(np.asarray, jax.device_get(state["params"]))


def host_params(params, dtype) -> Any:
  """Trained params (on device, float32) as numpy arrays of `dtype` on the host."""
  return jax.tree.map(lambda a: np.asarray(a).astype(dtype), jax.device_get(params))


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Task:
  """What a task hands the loop (see `run_loop`), and what follows from it for the run."""

  step: Callable
  evaluate: Callable[[Any], dict[str, float]] | None
  amount: Callable[[Batch], float]
  rate_name: str
  postfix: Callable[[dict[str, Any]], dict[str, str]]
  flops: Callable[[Batch], float] | None
  best_metric: str | None
  tracking: bool  # keep_best or patience, over evaluations of best_metric
  peak: float | None  # the device's measured matmul FLOP/s, when flops is given
  main: bool  # the one process that writes files and shows progress


@dataclasses.dataclass
class _Rates:
  """What the steps since the last log record or checkpoint write did; the rates exclude
  evaluation and checkpoint writes, so each of those restarts it."""

  t0: float = dataclasses.field(default_factory=time.perf_counter)
  amount: float = 0.0  # the batches' `amount` (e.g. characters)
  flops: float = 0.0

  def restart(self) -> None:
    self.t0, self.amount, self.flops = time.perf_counter(), 0.0, 0.0

  def per_second(self) -> tuple[float, float]:
    """(amount, FLOPs) per second since the restart."""
    elapsed = max(time.perf_counter() - self.t0, 1e-9)
    return self.amount / elapsed, self.flops / elapsed


@dataclasses.dataclass(kw_only=True)
class _LoopState:
  """The run loop's state between steps."""

  state: Any  # the train state pytree: {"params", "opt_state", "step"}
  records: list[dict[str, Any]]  # this run's log records
  best: dict[str, Any] | None  # best.json: {step, metric, value, evals_since}
  rates: _Rates
  stop: bool = False  # the last evaluation ran out of patience: stop early


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
  task = _Task(
    step=step,
    evaluate=evaluate,
    amount=amount,
    rate_name=rate_name,
    postfix=postfix,
    flops=flops,
    best_metric=best_metric,
    tracking=_tracking(rc, evaluate, best_metric),
    peak=matmul_peak() if flops is not None else None,
    main=distributed.is_main(),
  )
  with (
    checkpoints.open_manager(rc.out_dir, rc.keep, check="latest") as manager,
    checkpoints.open_manager(rc.out_dir, 1, checkpoints.BEST) as best_manager,
  ):
    loop, start = _resume(rc, task, manager, state)
    end = start if _stopped_early(rc, task, loop.best) else rc.steps
    it = batch_iter(batches, start)
    bar = _progress(progress and task.main, start, rc.steps)
    loop.rates.restart()
    try:
      for i in range(start + 1, end + 1):
        stats = _train_step(rc, task, loop, next(it, None), i)
        if _is_log_step(rc, i, evaluate is not None):
          _log(rc, task, loop, i, stats, best_manager, bar)
        bar.update(1)
        if (rc.save_every and i % rc.save_every == 0) or i == rc.steps or loop.stop:
          checkpoints.save(manager, i, loop.state)
          if task.main:
            metrics.plot(rc.out_dir, **label)
          loop.rates.restart()
        if loop.stop:
          break
    except KeyboardInterrupt:
      bar.close()
      raise _interrupted(rc, manager, loop.state) from None
    bar.close()
    manager.wait_until_finished()
    best_manager.wait_until_finished()
  if distributed.is_main():
    metrics.plot(rc.out_dir, **label)
  return loop.state, loop.records, start


def _tracking(rc: RunConfig, evaluate, best_metric: str | None) -> bool:
  """Whether the run follows its best evaluation (keep_best, patience); TrainError when it
  should but has nothing to evaluate."""
  tracking = best_metric is not None and evaluate is not None and (rc.keep_best or rc.patience)
  if (rc.keep_best or rc.patience) and not tracking:
    raise TrainError(
      "keep_best and patience need held-out evaluation batches (a validation metric to compare)"
    )
  return bool(tracking)


def _resume(rc: RunConfig, task: _Task, manager, state) -> tuple[_LoopState, int]:
  """The loop state at the latest checkpoint (or `state` at step 0) and its step; metrics.jsonl
  cut back to that step."""
  start = 0
  if manager.latest_step() is not None:
    state = checkpoints.restore(manager, state)
    start = int(state["step"])
  if task.main:
    metrics.truncate(rc.out_dir, start)
  best = checkpoints.read_best(rc.out_dir)
  return _LoopState(state=state, records=[], best=best, rates=_Rates()), start


def _stopped_early(rc: RunConfig, task: _Task, best: dict[str, Any] | None) -> bool:
  """Whether the run being resumed already stopped early: nothing more to train."""
  return bool(task.tracking and rc.patience and best and best["evals_since"] >= rc.patience)


def _train_step(rc: RunConfig, task: _Task, loop: _LoopState, batch: Batch | None, i: int):
  """Step i on its batch (the task's step checks it first): updates loop.state and the rates;
  returns the step's stats."""
  if batch is None:
    raise TrainError(f"the batch iterator ended before step {i} of {rc.steps}")
  loop.state, stats = task.step(loop.state, batch, i - 1)
  loop.rates.amount += task.amount(batch)
  loop.rates.flops += task.flops(batch) if task.flops is not None else 0.0
  loop.stop = False
  return stats


def _log(rc: RunConfig, task: _Task, loop: _LoopState, i: int, stats, best_manager, bar) -> None:
  """Log step i's record: the stats (without "n"), the rate, mfu and, on eval steps, the
  evaluation and the best so far; into loop.records, metrics.jsonl and the progress bar."""
  stats = distributed.fetch(stats)
  stats.pop("n", None)
  record = {"step": i, **{k: float(v) for k, v in stats.items()}}
  rate, flops_rate = loop.rates.per_second()
  record[task.rate_name] = rate
  if task.peak:
    record["mfu"] = flops_rate / task.peak
  if _is_eval_step(rc, i, task.evaluate is not None):
    record.update(task.evaluate(loop.state))
    if task.tracking:
      _track_best(rc, task, loop, record, best_manager)
  loop.records.append(record)
  if task.main:
    metrics.append(rc.out_dir, record)
  bar.set_postfix(task.postfix(record) | ({"mfu": f"{record['mfu']:.0%}"} if task.peak else {}))
  loop.rates.restart()  # the rates exclude evaluation


def _track_best(
  rc: RunConfig, task: _Task, loop: _LoopState, record: dict[str, Any], best_manager
) -> None:
  """Compares the evaluation in `record` with the best so far: a new best is kept (keep_best)
  and resets the patience count; best.json is rewritten; the record gets best_<metric> (and
  stopped_early when patience ran out, which sets loop.stop)."""
  i, value = record["step"], record[task.best_metric]
  if loop.best is None or value < loop.best["value"]:
    loop.best = {"step": i, "metric": task.best_metric, "value": value, "evals_since": 0}
    if rc.keep_best:
      checkpoints.save(best_manager, i, loop.state)
  else:
    loop.best["evals_since"] += 1
  if task.main:
    checkpoints.write_best(rc.out_dir, loop.best)
  loop.stop = bool(rc.patience) and loop.best["evals_since"] >= rc.patience
  record["best_" + task.best_metric] = loop.best["value"]
  if loop.stop:
    record["stopped_early"] = 1.0


def _interrupted(rc: RunConfig, manager, state) -> TrainInterrupted:
  """The error for Ctrl-C: the last step whose update completed, the latest checkpoint."""
  manager.wait_until_finished()
  kept = manager.latest_step()
  where = (
    f"the latest checkpoint is step {kept} in {os.path.join(rc.out_dir, checkpoints.CHECKPOINTS)}"
    if kept is not None
    else "no checkpoint was written yet"
  )
  done_steps = int(state["step"])  # the last step whose update completed
  return TrainInterrupted(
    f"interrupted after step {done_steps} of {rc.steps}; {where}; run "
    "the same command to resume from it"
  )


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
