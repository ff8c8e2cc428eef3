"""Training of cache coprocessors (`kvjax.coprocessor`) for a frozen base model, and the
per-position perplexity evaluation.

    base = lm.load("shakespeare")
    cop = coprocessor.init(base, n_latents=16)
    ac = AugmentConfig(steps=1000, batch_size=8, seq_len=256, ahead=16, points=16, out_dir="run")
    result = train(base, cop, ac, batches=data.train_batches, eval_batches=data.eval_batches)
    coprocessor.save(result.coprocessor, "run/coprocessor")

Batches follow the LM trainer's contract (`kvjax.train.lm`): inputs, targets [B, T] int32,
mask [B, T] float32, optionally segment_ids, positions (packed documents). With the tokens
x_0 .. x_T of a row (inputs = x_0 .. x_{T-1}, targets = x_1 .. x_T), an augmentation point p
(1 <= p, p + A <= T) splits the row into the prefix x_<p, whose cache the coprocessor reads,
and what follows. Its trace is what generation does after augmenting there: the coprocessor
reads the prefix with its soft tokens at positions p .. p + N - 1, the N latents go into the
base's next slots at position p + CoprocessorConfig.latent_offset (default p - 33), and the A
ahead tokens x_p .. x_{p+A-1} follow at their own positions p .., teacher-forced; the loss
is the nll of their next tokens x_{p+1} .. x_{p+A} (ahead position a = 1 .. A). With delay k the latents are still read from x_<p but inserted after
x_<p+k (the asynchronous setting): the trace starts at p + k.

All M traces of a row run in one pass (`multi_trace`): the frozen base runs once over the
row and keeps every layer's K/V; the coprocessor runs the M copies of the soft tokens over
that cache with a block-sparse mask (trace j's soft tokens see the slots before p_j of its
document and, causally, each other); the base then runs all M (latents, ahead) blocks over the
same cache, trace j seeing the slots before its insertion point and causally its own block.
Only the coprocessor's params and the soft tokens get gradients; the base's params are an
argument behind stop_gradient, never in the optimizer. The unaugmented nll of the same
targets comes free from the first pass. Packed documents stay apart: a trace sees only its
own document, and an ahead target of another document does not count.

The train state is the pure pytree {"params": the coprocessor's trainable params, "opt_state",
"step"}, checkpointed with orbax in OUT/checkpoints; batch i and its points depend only on i
and the seed, so an interrupted and resumed run ends with the bit-identical params of an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kvjax.cache.dense import KVCache
from kvjax.coprocessor import model as cpm
from kvjax.lm.model import Model
from kvjax.lm.steps import token_nll
from kvjax.train import lm as lm_train
from kvjax.train.lm import TrainError, _need

Batch = dict[str, np.ndarray]
PLOT_LABEL = "ahead-token loss (nats)"
BATCH_KEYS = {k: v for k, v in lm_train.BATCH_KEYS.items() if k != "chars"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AugmentConfig(lm_train.RunConfig):
  """Hyperparameters and bookkeeping of one coprocessor-training run (RunConfig's fields, lr
  1e-3 and no weight decay by default, and:). Hashable.

  ahead: A teacher-forced tokens scored after each augmentation point. points: M
  augmentation points per sequence, drawn without replacement from [1, seq_len - ahead -
  delay] (all in one pass). delay: latents inserted this many tokens after their point.
  eval_batches: held-out batches per evaluation."""

  lr: float = 1e-3
  weight_decay: float = 0.0
  ahead: int = 16
  points: int = 16
  delay: int = 0
  eval_batches: int = 8

  def __post_init__(self):
    super().__post_init__()
    for name in ("ahead", "points", "eval_batches"):
      _need(name, getattr(self, name), lambda v: v >= 1, "an int >= 1", int)
    _need("delay", self.delay, lambda v: v >= 0, "an int >= 0", int)
    error = room_error(self.seq_len, self.ahead, self.points, self.delay)
    if error:
      raise TrainError(error)

  def resume_key(self) -> dict[str, Any]:
    """The fields a resumed run must share with the run it continues."""
    skip = {"out_dir", "save_every", "keep", "eval_every", "log_every", "eval_batches"}
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclasses.dataclass
class Result:
  """coprocessor: the trained coprocessor (params on the host, in the input's dtype);
  records: the metrics logged by this call; resumed_from: the checkpoint step it started at."""

  coprocessor: cpm.Coprocessor
  records: list[dict[str, Any]]
  resumed_from: int


# --- the one-pass multi-trace forward ---------------------------------------------------------

def room_error(seq_len: int, ahead: int, points: int, delay: int, *,
               flags: bool = False) -> str | None:
  """Why `points` augmentation points with `ahead` tokens (`delay` late) do not fit in a
  sequence of seq_len inputs, or None. flags: name the settings as command-line flags."""
  name = (lambda f: "--" + f.replace("_", "-")) if flags else (lambda f: f)  # noqa: E731
  if ahead >= seq_len:
    return (f"{name('ahead')} ({ahead}) must be smaller than {name('seq_len')} ({seq_len}): "
            "each point needs a prefix and its ahead tokens inside the sequence")
  room = seq_len - ahead - delay
  if room < points:
    return (f"{points} points need {points} distinct positions in [1, {name('seq_len')} - "
            f"{name('ahead')} - {name('delay')}] = [1, {room}]")
  return None


def sample_points(seed: int, step: int, batch: int, seq_len: int, points: int, ahead: int,
                  delay: int = 0) -> np.ndarray:
  """[B, M] int32 sorted distinct points per row in [1, seq_len - ahead - delay]: a pure
  function of (seed, step)."""
  rng = np.random.default_rng((seed, step, 7))
  hi = seq_len - ahead - delay
  rows = [np.sort(rng.choice(np.arange(1, hi + 1), points, replace=False)) for _ in range(batch)]
  return np.stack(rows).astype(np.int32)


def even_points(batch: int, seq_len: int, points: int, ahead: int, delay: int = 0) -> np.ndarray:
  """[B, M] int32: M points spread evenly over [1, seq_len - ahead - delay], the same in every
  row (evaluation)."""
  error = room_error(seq_len, ahead, points, delay)
  if error:
    raise TrainError(error)
  hi = seq_len - ahead - delay
  p = np.unique(np.linspace(1, hi, points).round().astype(np.int32))
  return np.broadcast_to(p, (batch, len(p))).copy()


def _block_causal(M: int, n: int) -> np.ndarray:
  """[M n, M n] bool: causal inside each of M blocks of n, nothing across blocks."""
  return np.kron(np.eye(M, dtype=bool), np.tril(np.ones((n, n), bool)))


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, T], idx [B, ...] -> x[b, idx[b, ...]]."""
  B = x.shape[0]
  return jnp.take_along_axis(x, idx.reshape(B, -1), axis=1).reshape(idx.shape)


def multi_trace(base_dec, cop_dec, soft: jax.Array, batch: dict[str, jax.Array],
                points: jax.Array, *, ahead: int, delay: int = 0,
                latent_offset: int = cpm.LATENT_POSITION) -> dict[str, jax.Array]:
  """Every augmentation trace of a batch in one pass (see the module docstring).

  base_dec: the frozen base's Decoder; cop_dec: the coprocessor's (None = pause tokens);
  soft [N, D]; batch: inputs, targets, mask [B, T] (+ segment_ids, positions); points [B, M]
  int32 with 1 <= p and p + delay < T; latent_offset: where the base sees the latents (the
  coprocessor's CoprocessorConfig.latent_offset). Returns nll_aug, nll_base, valid: [B, M, A] float32,
  the augmented and unaugmented nll of the target at ahead position a + 1 of trace j, and 1
  where that target counts (inside the row, a real target of the point's document). The
  first pass (the base over the row) is behind stop_gradient."""
  inputs, targets = batch["inputs"], batch["targets"]
  B, T = inputs.shape
  M, N, A = points.shape[1], soft.shape[0], ahead
  pos = batch.get("positions")
  pos = pos if pos is not None else jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  seg = batch.get("segment_ids")
  seg = seg if seg is not None else jnp.ones((B, T), jnp.int32)
  causal = (seg[:, :, None] == seg[:, None, :]) & jnp.tril(jnp.ones((T, T), bool))
  main, _ = base_dec(inputs, positions=pos, mask=causal, return_kv=True)
  main = jax.lax.stop_gradient(main)
  nll_main = token_nll(main.logits, targets)                            # [B, T]
  cache = KVCache(k=main.k, v=main.v, pos=pos, length=jnp.full((B,), T, jnp.int32))
  slots = jnp.arange(T)

  def sees(at):  # [B, M] -> [B, M, T]: the prefix slots of `at`'s document before `at`
    return (slots < at[..., None]) & (seg[:, None, :] == _take(seg, at)[..., None])

  def mask_of(at, n):  # the [B, M n, T + M n] mask of M blocks of n items inserted at `at`
    prefix = jnp.broadcast_to(sees(at)[:, :, None], (B, M, n, T)).reshape(B, M * n, T)
    own = jnp.broadcast_to(jnp.asarray(_block_causal(M, n)), (B, M * n, M * n))
    return jnp.concatenate([prefix, own], axis=-1)

  def positions_of(at, n):
    return (_take(pos, at)[..., None] + jnp.arange(n, dtype=jnp.int32)).reshape(B, M * n)

  latents = cpm.latents_of(cop_dec, soft, cache, positions=positions_of(points, N),
                           mask=mask_of(points, N), copies=M)            # [B, M N, D]
  at = points + delay                                                   # insertion points
  idx = at[..., None] + jnp.arange(A)                                   # [B, M, A]
  inside = idx < T
  idx = jnp.minimum(idx, T - 1)
  same_doc = (_take(seg, idx) == _take(seg, points)[..., None]) \
      & (_take(seg, at) == _take(seg, points))[..., None]
  valid = (inside & same_doc & (_take(batch["mask"], idx) > 0)).astype(jnp.float32)
  x = jnp.concatenate([latents.reshape(B, M, N, -1).astype(base_dec.dtype),
                       base_dec.embed_tokens(_take(inputs, idx))], axis=2)
  offsets = jnp.concatenate([jnp.full((N,), latent_offset, jnp.int32),
                             jnp.arange(A, dtype=jnp.int32)])               # latents, ahead
  base_pos = (_take(pos, at)[..., None] + offsets).reshape(B, M * (N + A))
  out, _ = base_dec(embeds=x.reshape(B, M * (N + A), -1), cache=cache, positions=base_pos,
                    mask=mask_of(at, N + A), logits=False)
  hidden = out.hidden.reshape(B, M, N + A, -1)[:, :, N:]                # the ahead tokens
  nll_aug = token_nll(base_dec.logits(hidden), _take(targets, idx))
  return {"nll_aug": nll_aug, "nll_base": _take(nll_main, idx), "valid": valid}


def _decoders(base: Model, base_params, cc, params):
  """(base Decoder, coprocessor Decoder or None) from pure params; the base's behind
  stop_gradient."""
  frozen = base.with_params(jax.lax.stop_gradient(base_params))
  return frozen.decoder, cpm.decoder(frozen.graphdef, frozen.state, cc, params)


def trace_stats(got: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """loss (mean augmented nll over the counted targets), base_loss, n, and per ahead position
  a: sum_aug [A], sum_base [A], count [A] (sums over the counted targets)."""
  v = got["valid"]
  n = jnp.sum(v)
  loss = jnp.sum(got["nll_aug"] * v) / jnp.maximum(n, 1.0)
  base_loss = jnp.sum(got["nll_base"] * v) / jnp.maximum(n, 1.0)
  return {"loss": loss, "base_loss": base_loss, "n": n,
          "sum_aug": jnp.sum(got["nll_aug"] * v, (0, 1)),
          "sum_base": jnp.sum(got["nll_base"] * v, (0, 1)), "count": jnp.sum(v, (0, 1))}


# --- steps ------------------------------------------------------------------------------------

_STEPS: dict[Any, tuple] = {}


def compute_key(ac: AugmentConfig) -> tuple:
  """The AugmentConfig fields that change the compiled steps."""
  return (ac.steps, ac.lr, ac.warmup, ac.final_lr_ratio, ac.weight_decay, ac.clip_norm, ac.b1,
          ac.b2, ac.ahead, ac.delay)


def cached_steps(base: Model, cc: cpm.CoprocessorConfig, ac: AugmentConfig):
  """(opt_init, train_step, eval_step), built once per process for a (base graphdef,
  coprocessor config, compute settings)."""
  key = (base.graphdef, base.cfg, cc, compute_key(ac))
  if key not in _STEPS:
    opt = lm_train.optimizer(ac)
    _STEPS[key] = (jax.jit(opt.init), *make_steps(base, cc, ac, opt))
  return _STEPS[key]


def make_steps(base: Model, cc: cpm.CoprocessorConfig, ac: AugmentConfig,
               opt: optax.GradientTransformation):
  """train_step(state, base_params, batch, points) -> (state, stats), donating state; stats:
  loss, base_loss, n, grad_norm (before clipping), lr. eval_step(params, base_params, batch,
  points) -> `trace_stats`. The base's params are an argument, never differentiated."""
  schedule_lr = lm_train.optimizer_lr(ac)

  def loss_fn(params, base_params, batch, points):
    base_dec, cop_dec = _decoders(base, base_params, cc, params)
    got = multi_trace(base_dec, cop_dec, params["soft"], batch, points, ahead=ac.ahead,
                      delay=ac.delay, latent_offset=cc.latent_offset)
    stats = trace_stats(got)
    return stats["loss"], stats

  def train_step(state, base_params, batch, points):
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], base_params,
                                                                  batch, points)
    updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    stats = {k: stats[k] for k in ("loss", "base_loss", "n")}
    stats |= {"grad_norm": optax.tree.norm(grads), "lr": schedule_lr(state["step"])}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, stats

  @functools.partial(jax.jit, static_argnames=("ahead", "delay"))
  def eval_step(params, base_params, batch, points, *, ahead=ac.ahead, delay=ac.delay):
    base_dec, cop_dec = _decoders(base, base_params, cc, params)
    return trace_stats(multi_trace(base_dec, cop_dec, params["soft"], batch, points,
                                   ahead=ahead, delay=delay, latent_offset=cc.latent_offset))

  return jax.jit(train_step, donate_argnums=0), eval_step


# --- evaluation -------------------------------------------------------------------------------

@dataclasses.dataclass
class ByPosition:
  """Perplexity of the 1st .. A-th token after the augmentation points, with (aug) and without
  (base) augmentation: ppl_* [A], relative_reduction [A] = 1 - ppl_aug / ppl_base; loss_*:
  mean nll over every counted target; targets: counted targets per position."""

  ppl_base: np.ndarray
  ppl_aug: np.ndarray
  loss_base: float
  loss_aug: float
  targets: np.ndarray
  points: int

  @property
  def relative_reduction(self) -> np.ndarray:
    return 1.0 - self.ppl_aug / self.ppl_base

  def to_json(self) -> dict[str, Any]:
    return {"ppl_base_by_position": self.ppl_base.tolist(),
            "ppl_aug_by_position": self.ppl_aug.tolist(),
            "relative_reduction_by_position": self.relative_reduction.tolist(),
            "loss_base": self.loss_base, "loss_aug": self.loss_aug,
            "relative_reduction_all": 1.0 - math.exp(self.loss_aug - self.loss_base),
            "targets_by_position": self.targets.astype(int).tolist(), "points": self.points}


def accumulate(stats: Iterable[dict[str, Any]]) -> ByPosition:
  """Sums `trace_stats` of several batches into a ByPosition."""
  aug = base = count = 0.0
  points = 0
  for s in stats:
    s = jax.device_get(s)
    aug, base = aug + np.asarray(s["sum_aug"], np.float64), base + np.asarray(s["sum_base"],
                                                                              np.float64)
    count = count + np.asarray(s["count"], np.float64)
    points += int(s.get("points", 0))
  count = np.asarray(count)
  if not np.all(count > 0):
    raise TrainError("the evaluation text holds no target to score at some ahead position")
  return ByPosition(ppl_base=np.exp(base / count), ppl_aug=np.exp(aug / count),
                    loss_base=float(np.sum(base) / np.sum(count)),
                    loss_aug=float(np.sum(aug) / np.sum(count)), targets=count, points=points)


def evaluate(eval_step, params, base_params, eval_batches: Iterable[Batch], n_batches: int,
             ac: AugmentConfig) -> dict[str, float]:
  """eval_loss, eval_base_loss (means over the counted ahead targets of the first n_batches
  held-out batches, points spread evenly), eval_reduction_1 (relative ppl reduction at ahead
  position 1) and eval_reduction (over every ahead position)."""
  def stats():
    for batch in itertools.islice(eval_batches, n_batches):
      pts = even_points(ac.batch_size, ac.seq_len, ac.points, ac.ahead, ac.delay)
      yield eval_step(params, base_params, _to_device(batch), jnp.asarray(pts))

  got = accumulate(stats())
  return {"eval_loss": got.loss_aug, "eval_base_loss": got.loss_base,
          "eval_reduction_1": float(got.relative_reduction[0]),
          "eval_reduction": 1.0 - math.exp(got.loss_aug - got.loss_base)}


def by_position(base: Model, cop: cpm.Coprocessor, windows: np.ndarray, *, ahead: int = 32,
                points: int = 16, delay: int = 0, batch_size: int = 8,
                progress: bool = False) -> ByPosition:
  """Perplexity by ahead position over held-out token windows [R, T + 1] (-1 = no token; one
  document per window), with M points per window spread evenly over [1, T - ahead - delay],
  every trace run in the one-pass forward (equal, as tested, to augmenting trace by trace)."""
  cpm.check(cop.cc, base.cfg)
  windows = np.asarray(windows)
  if windows.ndim != 2 or windows.shape[1] < 3 or not len(windows):
    raise TrainError(f"windows must be [R, T + 1] with R >= 1, T >= 2; got {list(windows.shape)}")
  T = windows.shape[1] - 1
  if ahead >= T:
    raise TrainError(f"ahead ({ahead}) must be smaller than the window's {T} inputs")
  if T + cop.n_latents + ahead > base.cfg.max_position:
    raise TrainError(f"windows of {T} tokens + {cop.n_latents} latents + {ahead} ahead exceed "
                     f"the model's context of {base.cfg.max_position}")
  ac = AugmentConfig(steps=1, batch_size=batch_size, seq_len=T, ahead=ahead, points=points,
                     delay=delay, out_dir="-")
  _, _, eval_step = cached_steps(base, cop.cc, ac)
  pad = (-len(windows)) % batch_size
  rows = np.concatenate([windows, np.full((pad, T + 1), -1, windows.dtype)])
  from tqdm import tqdm
  bar = tqdm(total=len(rows) // batch_size, desc="augmented ppl", unit="batch",
             dynamic_ncols=True, disable=not progress)
  pts = jnp.asarray(even_points(batch_size, T, points, ahead, delay))
  base_params = base.params()

  def stats():
    for s in range(0, len(rows), batch_size):
      w = rows[s:s + batch_size]
      real = (w[:, :-1] >= 0) & (w[:, 1:] >= 0)
      batch = {"inputs": np.maximum(w[:, :-1], 0), "targets": np.maximum(w[:, 1:], 0),
               "mask": real.astype(np.float32)}
      got = dict(eval_step(cop.params, base_params, _to_device(batch), pts))
      got["points"] = int(np.sum(real[:, np.asarray(pts[0])]))
      bar.update(1)
      yield got

  out = accumulate(stats())
  bar.close()
  return out


# --- training ---------------------------------------------------------------------------------

def check_batch(batch: Batch, ac: AugmentConfig, vocab_size: int, step: int) -> None:
  """Raises TrainError unless batch holds inputs, targets, mask [B, T] in the vocabulary."""
  lm_train.check_batch(batch, ac, vocab_size, step, keys=BATCH_KEYS)


def _to_device(batch: Batch) -> dict[str, jax.Array]:
  return lm_train._to_device(batch, keys=BATCH_KEYS)


def _json(x):
  import json
  return json.loads(json.dumps(x))


def train(base: Model, cop: cpm.Coprocessor, ac: AugmentConfig,
          batches: Callable[[int], Iterable[Batch]] | Iterable[Batch],
          eval_batches: Callable[[], Iterable[Batch]] | None = None, *,
          progress: bool = True) -> Result:
  """Trains `cop`'s params (coprocessor and soft tokens, float32) against the frozen `base`
  for ac.steps steps, resuming from ac.out_dir's latest checkpoint when there is one. Writes
  metrics.jsonl, loss.png, checkpoints/ and run.json under ac.out_dir. batches: as for
  `kvjax.train.lm.train`; eval_batches: () -> held-out batches (the first ac.eval_batches)."""
  cpm.check(cop.cc, base.cfg)
  need = ac.seq_len + cop.n_latents + ac.ahead
  if base.cfg.max_position < need:
    raise TrainError(f"seq_len {ac.seq_len} + {cop.n_latents} latents + ahead {ac.ahead} "
                     f"exceeds the base's max_position {base.cfg.max_position}")
  os.makedirs(ac.out_dir, exist_ok=True)
  cc = cop.cc.to_json()
  cc.pop("base_name")
  lm_train._check_resume(ac.out_dir, _json({"model": cc, "train": ac.resume_key()}))
  dtype = cop.soft.dtype
  f32 = lambda t: jax.tree.map(lambda a: jnp.array(a, jnp.float32), t)  # copies  # noqa: E731
  work = dataclasses.replace(base, state=f32(base.state), compiled={})
  opt_init, train_step, eval_step = cached_steps(work, cop.cc, ac)
  base_params = work.params()
  params = f32(cop.params)
  state = {"params": params, "opt_state": opt_init(params), "step": jnp.zeros((), jnp.int32)}

  def step(state, batch, i):
    check_batch(batch, ac, base.cfg.vocab_size, i)
    pts = sample_points(ac.seed, i, ac.batch_size, ac.seq_len, ac.points, ac.ahead, ac.delay)
    return train_step(state, base_params, _to_device(batch), jnp.asarray(pts))

  def evaluate_(state):
    return evaluate(eval_step, state["params"], base_params, eval_batches(), ac.eval_batches, ac)

  def postfix(record):
    post = {"loss": f"{record['loss']:.4f}", "base": f"{record['base_loss']:.4f}"}
    if "eval_reduction_1" in record:
      post["val_red1"] = f"{100 * record['eval_reduction_1']:.2f}%"
    return post

  state, records, start = lm_train.run_loop(
      ac, state, batches, step, evaluate=evaluate_ if eval_batches is not None else None,
      amount=lambda batch: 1.0, rate_name="steps_per_s", postfix=postfix,
      plot_label=PLOT_LABEL, progress=progress)
  host = jax.tree.map(lambda a: np.asarray(a).astype(dtype), jax.device_get(state["params"]))
  return Result(coprocessor=cop.with_params(host), records=records, resumed_from=start)
