"""Language-model training: AdamW + warmup/cosine, a jitted donated step, orbax checkpoints.

    model = lm.init(cfg, tokenizer=tok, eos_ids=(tok.eos_id,))
    result = train(model, TrainConfig(steps=1000, batch_size=16, seq_len=256, out_dir="run"),
                   batches=data.train_batches, eval_batches=data.eval_batches)
    lm.save(result.model, "run/model")

Batches are dicts of numpy arrays: inputs, targets [B, T] int32; mask, chars [B, T] float32
(mask 1 = a real target; chars = characters of text each target covers); optionally
segment_ids, positions [B, T] int32 (packed documents: attention stays inside each one). `batches` is either
a callable start_step -> iterator of the batches for steps start_step, start_step + 1, ...
(preferred: a resume asks for its own position), or an iterable, of which a resumed run skips
the batches already consumed. Either way batch i must depend only on i (and the seed), which
is what makes resume exact: an interrupted and resumed run ends with the bit-identical params
of an uninterrupted one.

The train state is a pure pytree {"params": dict, "opt_state": optax state, "step": int32 []};
params stay float32 (`bf16` casts a copy for the forward and backward only); the loss is the
masked mean cross-entropy in float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kvjax.lm import sharding, steps
from kvjax.lm.config import to_hf
from kvjax.lm.model import Model
from kvjax.train import metrics

Batch = dict[str, np.ndarray]
BATCH_KEYS = {"inputs": np.integer, "targets": np.integer, "mask": np.floating,
              "chars": np.floating}
# Optional int [B, T] arrays of packed batches: document index of each input inside its row
# and its position inside that document. When given, attention stays within a document.
OPTIONAL_KEYS = ("segment_ids", "positions")
CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"


class TrainError(ValueError):
  """A training setup that cannot run (bad hyperparameters, mismatched resume, bad batch)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """What every training run has (TrainConfig's and kvjax.train.eagle.EagleConfig's base).

  steps: optimizer steps in total (a resumed run continues up to it).
  warmup: linear warmup steps from 0 to lr, then cosine decay to lr * final_lr_ratio at `steps`.
  weight_decay, clip_norm (global norm), b1, b2: AdamW's.
  save_every / eval_every / log_every: in steps; 0 = only at the end (save, eval) or never (log).
  keep: how many checkpoints the manager keeps.
  """

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

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "keep"):
      _need(name, getattr(self, name), lambda v: v >= 1, "an int >= 1", int)
    for name in ("warmup", "save_every", "eval_every", "log_every", "seed"):
      _need(name, getattr(self, name), lambda v: v >= 0, "an int >= 0", int)
    if self.warmup >= self.steps:
      raise TrainError(f"warmup ({self.warmup}) must be smaller than steps ({self.steps})")
    _need("lr", self.lr, lambda v: 0 < v < math.inf, "a finite number > 0", float)
    _need("weight_decay", self.weight_decay, lambda v: 0 <= v < math.inf, "a number >= 0", float)
    _need("clip_norm", self.clip_norm, lambda v: 0 < v < math.inf, "a finite number > 0", float)
    _need("final_lr_ratio", self.final_lr_ratio, lambda v: 0 <= v <= 1, "a number in [0, 1]",
          float)
    for name in ("b1", "b2"):
      _need(name, getattr(self, name), lambda v: 0 <= v < 1, "a number in [0, 1)", float)
    if not isinstance(self.out_dir, str) or not self.out_dir:
      raise TrainError(f"out_dir must be a non-empty path; got {self.out_dir!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(RunConfig):
  """Hyperparameters and bookkeeping of one LM run (fields of RunConfig, and:). Hashable.

  bf16: bfloat16 compute, float32 params and optimizer state.
  data_parallel, model_parallel: mesh shape; data_parallel 0 = every device / model_parallel.
    A 1 x 1 mesh means no mesh (plain single-device arrays).
  """

  bf16: bool = False
  data_parallel: int = 0
  model_parallel: int = 1

  def __post_init__(self):
    super().__post_init__()
    _need("model_parallel", self.model_parallel, lambda v: v >= 1, "an int >= 1", int)
    _need("data_parallel", self.data_parallel, lambda v: v >= 0, "an int >= 0", int)

  def resume_key(self) -> dict[str, Any]:
    """The fields a resumed run must share with the run it continues."""
    skip = {"out_dir", "save_every", "keep", "eval_every", "log_every", "data_parallel",
            "model_parallel"}
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def _need(name, value, ok, expected, kind):
  numeric = (int,) if kind is int else (int, float)
  if isinstance(value, bool) or not isinstance(value, numeric) or not ok(value):
    raise TrainError(f"{name} must be {expected}; got {value!r}")


@dataclasses.dataclass
class Result:
  """model: the trained model (params on the host, float32, unsharded); records: the metrics
  logged by this call; resumed_from: the checkpoint step it started at (0 = fresh)."""

  model: Model
  records: list[dict[str, Any]]
  resumed_from: int


def optimizer(tc: RunConfig) -> optax.GradientTransformation:
  """clip_by_global_norm(clip_norm), then AdamW under warmup + cosine decay."""
  return optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                     optax.adamw(optimizer_lr(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay))


def _forward_nll(model: Model, params, batch, bf16: bool) -> jax.Array:
  """params (pure dict, float32) -> nll [B, T] float32 of each target (unmasked)."""
  if bf16:
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  segments, positions, mask = batch.get("segment_ids"), batch.get("positions"), None
  if segments is not None:  # packed documents: attend only within a row's own document
    T = segments.shape[1]
    mask = (segments[:, :, None] == segments[:, None, :]) & jnp.tril(jnp.ones((T, T), bool))
  out, _ = model.with_params(params).decoder(batch["inputs"], positions=positions, mask=mask)
  return steps.token_nll(out.logits, batch["targets"])


def masked_loss(nll: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of nll [B, T] over mask [B, T] (0 when the mask is empty)."""
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


_STEPS: dict[Any, tuple] = {}  # compiled steps shared by runs of one model structure


def compute_key(tc: TrainConfig) -> tuple:
  """The TrainConfig fields that change the compiled steps."""
  return (tc.steps, tc.lr, tc.warmup, tc.final_lr_ratio, tc.weight_decay, tc.clip_norm, tc.b1,
          tc.b2, tc.bf16)


def cached_steps(model: Model, tc: TrainConfig):
  """(opt_init, train_step, eval_step) for model's graphdef (which includes its mesh layout)
  and tc's compute fields, built once per process so repeated runs (tests, resumes) reuse the
  compiled programs. The steps close over `model` only for its state's structure: every leaf
  is replaced by the params passed in."""
  key = (model.graphdef, model.cfg, compute_key(tc))
  if key not in _STEPS:
    opt = optimizer(tc)
    _STEPS[key] = (jax.jit(opt.init), *make_steps(model, tc, opt))
  return _STEPS[key]


def make_steps(model: Model, tc: TrainConfig, opt: optax.GradientTransformation):
  """(train_step(state, batch) -> (state, stats), eval_step(params, batch) -> sums).

  train_step donates `state`; stats: loss, grad_norm (before clipping), lr (of this step).
  eval_step returns (sum of masked nll, mask sum, sum of masked chars)."""
  schedule_lr = optimizer_lr(tc)

  def loss_fn(params, batch):
    nll = _forward_nll(model, params, batch, tc.bf16)
    return masked_loss(nll, batch["mask"])

  def train_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
    updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    stats = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "lr": schedule_lr(state["step"])}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, stats

  return jax.jit(train_step, donate_argnums=0), make_eval_step(model, tc.bf16)


def make_eval_step(model: Model, bf16: bool = False):
  """eval_step(params, batch) -> (sum of masked nll, mask sum, sum of masked chars), jitted."""

  @jax.jit
  def eval_step(params, batch):
    nll = _forward_nll(model, params, batch, bf16)
    m = batch["mask"]
    return jnp.sum(nll * m), jnp.sum(m), jnp.sum(batch["chars"] * m)

  return eval_step


def optimizer_lr(tc: RunConfig) -> Callable[[jax.Array], jax.Array]:
  """The learning rate used at a step (the same schedule `optimizer` builds)."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup, decay_steps=tc.steps,
      end_value=tc.lr * tc.final_lr_ratio)


def make_mesh(tc: TrainConfig):
  """The (data, model) mesh of tc, or None for a single device."""
  n = len(jax.devices())
  data = tc.data_parallel or max(1, n // tc.model_parallel)
  if data * tc.model_parallel > n:
    raise TrainError(f"data_parallel={data} x model_parallel={tc.model_parallel} needs "
                     f"{data * tc.model_parallel} devices; {n} available")
  if data * tc.model_parallel == 1:
    return None
  return sharding.make_mesh(data=data, model=tc.model_parallel,
                            devices=jax.devices()[:data * tc.model_parallel])


def _batch_sharding(mesh, batch_size: int):
  """Batch rows on "data" (replicated when "data" does not divide B)."""
  from jax.sharding import NamedSharding, PartitionSpec
  spec = PartitionSpec("data") if batch_size % mesh.shape["data"] == 0 else PartitionSpec()
  return NamedSharding(mesh, spec)


def check_batch(batch: Batch, tc: RunConfig, vocab_size: int, step: int,
                keys: dict = BATCH_KEYS) -> None:
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
      raise TrainError(f"batch {step}: {key} must be a {kind.__name__} array of shape "
                       f"[B, T] = {list(want)}; got {np.asarray(a).dtype}{list(np.shape(a))}")
  for key in ("inputs", "targets"):
    a = np.asarray(batch[key])
    if a.min() < 0 or a.max() >= vocab_size:
      raise TrainError(f"batch {step}: {key} has token ids outside [0, {vocab_size}) "
                       f"(min {a.min()}, max {a.max()}): the data and the model's vocabulary "
                       "disagree")


def _to_device(batch: Batch, sharding_=None, keys: dict = BATCH_KEYS) -> dict[str, jax.Array]:
  """The `keys` arrays (int32 / float32 by kind; plus segment_ids, positions [B, T] int32 when
  present) on device."""
  out = {k: np.asarray(batch[k], np.int32 if kind is np.integer else np.float32)
         for k, kind in keys.items()}
  for key in OPTIONAL_KEYS:
    if key in batch:
      out[key] = np.asarray(batch[key], np.int32)
  return jax.device_put(out, sharding_) if sharding_ is not None else jax.device_put(out)


def _batch_iter(batches, start: int) -> Iterator[Batch]:
  """The batches for steps start, start + 1, ... from a callable or an iterable."""
  if callable(batches):
    return iter(batches(start))
  it = iter(batches)
  for _ in range(start):
    next(it)
  return it


def evaluate(eval_step, params, eval_batches, batch_sharding) -> dict[str, float]:
  """eval_loss (nats per target token) and eval_bpc (bits per character) over every batch."""
  nll = n = chars = 0.0
  for batch in eval_batches():
    s = eval_step(params, _to_device(batch, batch_sharding))
    nll, n, chars = nll + float(s[0]), n + float(s[1]), chars + float(s[2])
  if n == 0:
    raise TrainError("eval batches hold no target with mask 1")
  return {"eval_loss": nll / n, "eval_bpc": nll / math.log(2) / chars if chars else math.nan,
          "eval_tokens": int(n)}


def evaluate_model(model: Model, eval_batches: Iterable[Batch]) -> dict[str, float]:
  """`evaluate` for a model as it is (its params and dtype, one device): eval_loss,
  eval_bpc, eval_tokens over every batch of `eval_batches`."""
  return evaluate(make_eval_step(model), model.params(), lambda: eval_batches, None)


def _check_resume(out_dir: str, run: dict[str, Any]) -> None:
  """Writes out_dir/run.json, or checks that a run already there is the same run."""
  path = os.path.join(out_dir, RUN_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for part in ("model", "train"):
      if old.get(part) != run[part]:
        diff = sorted(k for k in set(old.get(part, {})) | set(run[part])
                      if old.get(part, {}).get(k) != run[part].get(k))
        raise TrainError(f"{out_dir} holds checkpoints of a different run ({part} settings "
                         f"differ: {', '.join(diff)}); resume with the same settings or pass a "
                         "new out dir")
  with open(path, "w") as f:
    json.dump(run, f, indent=2)


def _manager(tc: TrainConfig):
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=tc.keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(tc.out_dir, CHECKPOINTS)),
                               options=options)


def _restore(manager, state):
  """The latest checkpoint restored with state's structure, shapes, dtypes and shardings."""
  import orbax.checkpoint as ocp
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))


def train(model: Model, tc: TrainConfig, batches: Callable[[int], Iterable[Batch]] | Iterable[Batch],
          eval_batches: Callable[[], Iterable[Batch]] | None = None, *,
          progress: bool = True) -> Result:
  """Trains model's params for tc.steps steps (resuming from tc.out_dir's latest checkpoint when
  there is one). Writes metrics.jsonl, loss.png, checkpoints/ and run.json under tc.out_dir."""
  if model.cfg.max_position < tc.seq_len:
    raise TrainError(f"seq_len {tc.seq_len} exceeds the model's max_position "
                     f"{model.cfg.max_position}")
  os.makedirs(tc.out_dir, exist_ok=True)
  _check_resume(tc.out_dir, {"model": to_hf(model.cfg), "train": tc.resume_key()})
  base = dataclasses.replace(model, state=jax.tree.map(lambda a: a.astype(jnp.float32),
                                                       model.state), compiled={})
  mesh = make_mesh(tc)
  work = sharding.shard(base, mesh) if mesh is not None else base
  batch_sharding = _batch_sharding(mesh, tc.batch_size) if mesh is not None else None
  opt_init, train_step, eval_step = cached_steps(work, tc)
  params = work.params()
  state = {"params": params, "opt_state": opt_init(params), "step": jnp.zeros((), jnp.int32)}

  def step(state, batch, i):
    check_batch(batch, tc, model.cfg.vocab_size, i)
    return train_step(state, _to_device(batch, batch_sharding))

  def evaluate_(state):
    return evaluate(eval_step, state["params"], eval_batches, batch_sharding)

  state, records, start = run_loop(
      tc, state, batches, step, evaluate=evaluate_ if eval_batches is not None else None,
      amount=lambda batch: float(np.sum(batch["mask"])), rate_name="tokens_per_s",
      postfix=lambda r: {"loss": f"{r['loss']:.4f}", "tok_s": f"{r['tokens_per_s']:.0f}"},
      progress=progress)
  host = jax.tree.map(np.asarray, jax.device_get(state["params"]))
  return Result(model=base.with_params(host), records=records, resumed_from=start)


def run_loop(rc: RunConfig, state, batches, step: Callable, *,
             evaluate: Callable[[Any], dict[str, float]] | None,
             amount: Callable[[Batch], float], rate_name: str,
             postfix: Callable[[dict[str, Any]], dict[str, str]],
             plot_label: str | None = None, progress: bool = True):
  """The loop every trainer shares: resume from rc.out_dir's latest checkpoint, then for steps
  start + 1 .. rc.steps take the next batch and run `step(state, batch, i) -> (state, stats)`
  (i = the 0-based step index); on log steps record the stats (without "n"), the rate
  (`amount` of the batches per second, excluding evaluation and checkpoint writes, as
  `rate_name`) and, on eval steps, `evaluate(state)`; checkpoint every rc.save_every steps
  and at the end; metrics.jsonl and loss.png. Returns (state, records, start step)."""
  import orbax.checkpoint as ocp
  label = {} if plot_label is None else {"ylabel": plot_label}
  records: list[dict[str, Any]] = []
  has_eval = evaluate is not None
  with _manager(rc) as manager:
    start = 0
    if manager.latest_step() is not None:
      state = _restore(manager, state)
      start = int(state["step"])
    metrics.truncate(rc.out_dir, start)
    it = _batch_iter(batches, start)
    bar = _progress(progress, start, rc.steps)
    t0, done = time.perf_counter(), 0.0
    for i in range(start + 1, rc.steps + 1):
      batch = next(it, None)
      if batch is None:
        raise TrainError(f"the batch iterator ended before step {i} of {rc.steps}")
      state, stats = step(state, batch, i - 1)  # checks the batch first
      done += amount(batch)
      if _is_log_step(rc, i, has_eval):
        stats = jax.device_get(stats)
        stats.pop("n", None)
        record = {"step": i, **{k: float(v) for k, v in stats.items()}}
        record[rate_name] = done / max(time.perf_counter() - t0, 1e-9)
        if _is_eval_step(rc, i, has_eval):
          record.update(evaluate(state))
        records.append(record)
        metrics.append(rc.out_dir, record)
        bar.set_postfix(postfix(record))
        t0, done = time.perf_counter(), 0.0  # the rate excludes evaluation
      bar.update(1)
      if (rc.save_every and i % rc.save_every == 0) or i == rc.steps:
        manager.save(i, args=ocp.args.StandardSave(state))
        metrics.plot(rc.out_dir, **label)
        t0, done = time.perf_counter(), 0.0  # and checkpoint writes
    bar.close()
    manager.wait_until_finished()
  metrics.plot(rc.out_dir, **label)
  return state, records, start


def _is_eval_step(tc: TrainConfig, step: int, has_eval: bool) -> bool:
  return has_eval and ((tc.eval_every > 0 and step % tc.eval_every == 0) or step == tc.steps)


def _is_log_step(tc: TrainConfig, step: int, has_eval: bool) -> bool:
  """Log steps: every log_every, every eval step and the last step."""
  return ((tc.log_every > 0 and step % tc.log_every == 0) or step == tc.steps
          or _is_eval_step(tc, step, has_eval))


def _progress(enabled: bool, start: int, total: int):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
              disable=not enabled)
