"""Training of cache coprocessors (`kvjax.coprocessor`) for a frozen base model, on the
one-pass augmentation traces of `kvjax.coprocessor.traces` (whose module docstring says what a
trace is).

    base = lm.load("shakespeare")
    cop = coprocessor.init(base, n_latents=16)
    ac = AugmentConfig(steps=1000, batch_size=8, seq_len=256, ahead=16, points=16, out_dir="run")
    result = train(base, cop, ac, batches=data.train_batches, eval_batches=data.eval_batches)
    coprocessor.save(result.coprocessor, "run/coprocessor")

Batches follow the LM trainer's contract (`kvjax.train.lm`): inputs, targets [B, T] int32,
mask [B, T] float32, optionally segment_ids, positions (packed documents). Each step draws M
augmentation points per row and trains on all their traces at once (`multi_trace`): only the
coprocessor's params and the soft tokens get gradients; the base's params are an argument
behind stop_gradient, never in the optimizer.

The train state is the pure pytree {"params": the coprocessor's trainable params, "opt_state",
"step"}, checkpointed with orbax in OUT/checkpoints; batch i and its points depend only on i
and the seed, so an interrupted and resumed run ends with the bit-identical params of an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kvjax.coprocessor import model as cop_model
from kvjax.coprocessor.traces import (
  accumulate,
  decoders,
  even_points,
  multi_trace,
  room_error,
  trace_stats,
  trace_step,
)
from kvjax.lm.attention import Training
from kvjax.lm.model import Model
from kvjax.train import checkpoints, loop
from kvjax.train.errors import TrainError
from kvjax.train.loop import AddOnConfig, compiled

Batch = dict[str, np.ndarray]
PLOT_LABEL = "ahead-token loss (nats)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AugmentConfig(AddOnConfig):
  """Hyperparameters and bookkeeping of one coprocessor-training run (AddOnConfig's fields,
  and:). Hashable.

  ahead: A teacher-forced tokens scored after each augmentation point. points: M
  augmentation points per sequence, drawn without replacement from [1, seq_len - ahead -
  delay] (all in one pass). delay: latents inserted this many tokens after their point."""

  ahead: int = 16
  points: int = 16
  delay: int = 0

  DOMAINS: ClassVar[dict[str, loop.Domain]] = {
    **AddOnConfig.DOMAINS,
    **dict.fromkeys(("ahead", "points"), loop.INT_POSITIVE),
    "delay": loop.INT_NONNEG,
  }

  def __post_init__(self):
    super().__post_init__()
    error = room_error(self.seq_len, self.ahead, self.points, self.delay)
    if error:
      raise TrainError(error)


@dataclasses.dataclass
class Result:
  """coprocessor: the trained coprocessor (params on the host, in the input's dtype);
  records: the metrics logged by this call; resumed_from: the checkpoint step it started at."""

  coprocessor: cop_model.Coprocessor
  records: list[dict[str, Any]]
  resumed_from: int


# --- the one-pass multi-trace forward ---------------------------------------------------------


def sample_points(
  seed: int, step: int, batch: int, seq_len: int, points: int, ahead: int, delay: int = 0
) -> np.ndarray:
  """[B, M] int32 sorted distinct points per row in [1, seq_len - ahead - delay]: a pure
  function of (seed, step)."""
  rng = np.random.default_rng((seed, step, 7))
  hi = seq_len - ahead - delay
  rows = [np.sort(rng.choice(np.arange(1, hi + 1), points, replace=False)) for _ in range(batch)]
  return np.stack(rows).astype(np.int32)


# --- steps ------------------------------------------------------------------------------------


def cached_steps(base: Model, cc: cop_model.CoprocessorConfig, ac: AugmentConfig):
  """(opt_init, train_step, eval_step) for a (base graphdef, coprocessor config) and ac
  (`loop.compiled`)."""
  return compiled((base.graphdef, base.cfg, cc), ac, lambda opt: make_steps(base, cc, ac, opt))


def make_steps(
  base: Model, cc: cop_model.CoprocessorConfig, ac: AugmentConfig, opt: optax.GradientTransformation
):
  """train_step(state, base_params, batch, points) -> (state, stats), donating state; stats:
  loss, base_loss, n, grad_norm (before clipping), lr. eval_step: `traces.trace_step`'s
  (params, base_params, batch, points, *, ahead, delay) -> `trace_stats`. The base's params
  are an argument, never differentiated."""
  schedule_lr = loop.optimizer_lr(ac)

  def loss_fn(params, base_params, batch, points):
    base_dec, cop_dec = decoders(base, base_params, cc, params)
    got = multi_trace(
      base_dec,
      cop_dec,
      params["soft"],
      batch,
      points,
      ahead=ac.ahead,
      delay=ac.delay,
      latent_offset=cc.latent_offset,
      training=Training(),
    )
    stats = trace_stats(got)
    return stats["loss"], stats

  def train_step(state, base_params, batch, points):
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["params"], base_params, batch, points
    )
    stats = {k: stats[k] for k in ("loss", "base_loss", "n")}
    return loop.apply_update(opt, schedule_lr, state, grads, stats)

  return jax.jit(train_step, donate_argnums=0), trace_step(base, cc)


# --- evaluation -------------------------------------------------------------------------------


def evaluate(
  eval_step, params, base_params, eval_batches: Iterable[Batch], n_batches: int, ac: AugmentConfig
) -> dict[str, float]:
  """eval_loss, eval_base_loss (means over the counted ahead targets of the first n_batches
  held-out batches, points spread evenly), eval_reduction_1 (relative ppl reduction at ahead
  position 1) and eval_reduction (over every ahead position)."""

  def stats():
    for batch in itertools.islice(eval_batches, n_batches):
      pts = even_points(ac.batch_size, ac.seq_len, ac.points, ac.ahead, ac.delay)
      batch = loop.to_device(batch, keys=loop.TOKEN_KEYS)
      yield eval_step(params, base_params, batch, jnp.asarray(pts), ahead=ac.ahead, delay=ac.delay)

  got = accumulate(stats())
  return {
    "eval_loss": got.loss_aug,
    "eval_base_loss": got.loss_base,
    "eval_reduction_1": float(got.relative_reduction[0]),
    "eval_reduction": 1.0 - math.exp(got.loss_aug - got.loss_base),
  }


# --- training ---------------------------------------------------------------------------------


def train(
  base: Model,
  cop: cop_model.Coprocessor,
  ac: AugmentConfig,
  batches: Callable[[int], Iterable[Batch]] | Iterable[Batch],
  eval_batches: Callable[[], Iterable[Batch]] | None = None,
  *,
  progress: bool = True,
) -> Result:
  """Trains `cop`'s params (coprocessor and soft tokens, float32) against the frozen `base`
  for ac.steps steps, resuming from ac.out_dir's latest checkpoint when there is one. Writes
  metrics.jsonl, loss.png, checkpoints/ and run.json under ac.out_dir. batches: as for
  `kvjax.train.lm.train`; eval_batches: () -> held-out batches (the first ac.eval_batches)."""
  cop_model.check(cop.cc, base.cfg)
  need = ac.seq_len + cop.n_latents + ac.ahead
  if base.cfg.max_position < need:
    raise TrainError(
      f"seq_len {ac.seq_len} + {cop.n_latents} latents + ahead {ac.ahead} "
      f"exceeds the base's max_position {base.cfg.max_position}"
    )
  checkpoints.start_run(ac, cop.cc.to_json(), ignore=("base_name", "base_fingerprint"))
  dtype = cop.soft.dtype
  f32 = lambda t: jax.tree.map(lambda a: jnp.array(a, jnp.float32), t)  # copies
  work = dataclasses.replace(base, state=f32(base.state), compiled={})
  opt_init, train_step, eval_step = cached_steps(work, cop.cc, ac)
  base_params = work.params()
  state = loop.train_state(f32(cop.params), opt_init)

  def step(state, batch, i):
    loop.check_batch(batch, ac, base.cfg.vocab_size, i, keys=loop.TOKEN_KEYS)
    pts = sample_points(ac.seed, i, ac.batch_size, ac.seq_len, ac.points, ac.ahead, ac.delay)
    return train_step(
      state, base_params, loop.to_device(batch, keys=loop.TOKEN_KEYS), jnp.asarray(pts)
    )

  def evaluate_(state):
    return evaluate(eval_step, state["params"], base_params, eval_batches(), ac.eval_batches, ac)

  def postfix(record):
    post = {"loss": f"{record['loss']:.4f}", "base": f"{record['base_loss']:.4f}"}
    if "eval_reduction_1" in record:
      post["val_red1"] = f"{100 * record['eval_reduction_1']:.2f}%"
    return post

  state, records, start = loop.run_loop(
    ac,
    state,
    batches,
    step,
    evaluate=evaluate_ if eval_batches is not None else None,
    amount=lambda batch: 1.0,
    rate_name="steps_per_s",
    postfix=postfix,
    plot_label=PLOT_LABEL,
    progress=progress,
    best_metric="eval_loss",
  )
  host = loop.host_params(state["params"], dtype)
  return Result(coprocessor=cop.with_params(host), records=records, resumed_from=start)
