"""Language-model training: AdamW + warmup/cosine, a jitted donated step, orbax checkpoints.

    model = lm.init(cfg, tokenizer=tok, eos_ids=(tok.eos_id,))
    result = train(model, TrainConfig(steps=1000, batch_size=16, seq_len=256, out_dir="run"),
                   batches=data.train_batches, eval_batches=data.eval_batches)
    lm.save(result.model, "run/model")

Batches are dicts of numpy arrays: inputs, targets [B, T] int32; mask, chars [B, T] float32
(mask 1 = a real target; chars = characters of text each target covers); optionally
segment_ids, positions [B, T] int32 (packed documents: attention stays inside each one).
`batches` is either a callable start_step -> iterator of the batches for steps start_step,
start_step + 1, ... (preferred: a resume asks for its own position), or an iterable, of which
a resumed run skips the batches already consumed. Either way batch i must depend only on i
(and the seed), which is what makes resume exact: an interrupted and resumed run ends with the
bit-identical params of an uninterrupted one.

The train state is a pure pytree {"params": dict, "opt_state": optax state, "step": int32 []};
params stay float32 (`bf16` casts a copy for the forward and backward only); the loss is the
masked mean cross-entropy in float32.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kvjax.lm import distributed, sharding, steps
from kvjax.lm.attention import Training
from kvjax.lm.hf_config import to_hf
from kvjax.lm.lora import Adapter
from kvjax.lm.lora import write as write_adapter
from kvjax.lm.model import Model, load, save
from kvjax.train import lora
from kvjax.train.checkpoints import RUN_FILE, read_run, start_run
from kvjax.train.errors import TrainError
from kvjax.train.loop import (
  INT_NONNEG,
  INT_POSITIVE,
  POSITIVE,
  UNIT_OPEN,
  Batch,
  Domain,
  RunConfig,
  apply_update,
  check_batch,
  compiled,
  optimizer_lr,
  restore_params,
  run_loop,
  to_device,
  train_state,
)

SPEC = "spec"  # OUT/spec: the run's config.json and tokenizer, without weights


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(RunConfig):
  """Hyperparameters and bookkeeping of one LM run (fields of RunConfig, and:). Hashable.

  bf16: bfloat16 compute, float32 params and optimizer state.
  dropout, attn_dropout: residual and attention-probability dropout rates of the training
    forward (evaluation and every inference path run without them).
  data_parallel, model_parallel: mesh shape; data_parallel 0 = every device / model_parallel.
    A 1 x 1 mesh means no mesh (plain single-device arrays).
  lora_rank: 0 trains every param; R > 0 trains rank-R LoRA factors of the Linears named in
    lora_targets (`kvjax.train.lora`) over the frozen model, scaled by lora_alpha / R.
  base: the name or path of the model fine-tuned (recorded in a LoRA adapter's config).
  """

  bf16: bool = False
  dropout: float = 0.0
  attn_dropout: float = 0.0
  data_parallel: int = 0
  model_parallel: int = 1
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = lora.TARGETS
  base: str = ""

  DOMAINS: ClassVar[dict[str, Domain]] = {
    **RunConfig.DOMAINS,
    "model_parallel": INT_POSITIVE,
    "data_parallel": INT_NONNEG,
    "dropout": UNIT_OPEN,
    "attn_dropout": UNIT_OPEN,
    "lora_rank": INT_NONNEG,
    "lora_alpha": POSITIVE,
  }
  # the mesh shape is in the model's graphdef, which keys the steps too
  BOOKKEEPING = RunConfig.BOOKKEEPING | {"data_parallel", "model_parallel", "base"}
  NOT_RESUMED = RunConfig.NOT_RESUMED | {"data_parallel", "model_parallel"}

  def __post_init__(self):
    super().__post_init__()
    targets = self.lora_targets
    if isinstance(targets, str) or not all(isinstance(t, str) and t for t in targets):
      raise TrainError(
        f"lora_targets must be Linear names like ('q_proj', 'v_proj'); got {targets!r}"
      )
    object.__setattr__(self, "lora_targets", tuple(targets))  # a list read back from run.json


@dataclasses.dataclass
class Result:
  """model: the trained model (params on the host, float32, unsharded; a LoRA run's merged);
  records: the metrics logged by this call; resumed_from: the checkpoint step it started at
  (0 = fresh); adapter: a LoRA run's trained adapter (None otherwise)."""

  model: Model
  records: list[dict[str, Any]]
  resumed_from: int
  adapter: Adapter | None = None


def forward_nll(
  model: Model, params, batch, bf16: bool, training: Training | None = None
) -> jax.Array:
  """params (pure dict, float32) -> nll [B, T] float32 of each target (unmasked). training:
  the training step's forward (differentiable attention at any length, dropout); None for
  evaluation."""
  if bf16:
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  segments, positions, mask = batch.get("segment_ids"), batch.get("positions"), None
  if segments is not None:  # packed documents: attend only within a row's own document
    T = segments.shape[1]
    mask = (segments[:, :, None] == segments[:, None, :]) & jnp.tril(jnp.ones((T, T), bool))
  out, _ = model.with_params(params).decoder(
    batch["inputs"], positions=positions, mask=mask, training=training
  )
  return steps.token_nll(out.logits, batch["targets"])


def masked_loss(nll: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of nll [B, T] over mask [B, T] (0 when the mask is empty)."""
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def cached_steps(model: Model, tc: TrainConfig):
  """(opt_init, train_step, eval_step) for model's graphdef (which includes its mesh layout)
  and tc (`loop.compiled`). The steps close over `model` only for its state's structure:
  every leaf is replaced by the params passed in."""
  return compiled((model.graphdef, model.cfg), tc, lambda opt: make_steps(model, tc, opt))


def make_steps(model: Model, tc: TrainConfig, opt: optax.GradientTransformation):
  """(train_step(state, batch, key) -> (state, stats), eval_step(params, batch) -> sums).

  train_step donates `state`; key: the run's PRNG key (dropout, folded with the step); stats:
  loss, grad_norm (before clipping), lr (of this step). eval_step returns (sum of masked nll,
  mask sum, sum of masked chars)."""
  schedule_lr = optimizer_lr(tc)

  def loss_fn(params, batch, training):
    nll = forward_nll(model, params, batch, tc.bf16, training)
    return masked_loss(nll, batch["mask"])

  def train_step(state, batch, key):
    training = Training(tc.dropout, tc.attn_dropout, jax.random.fold_in(key, state["step"]))
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, training)
    return apply_update(opt, schedule_lr, state, grads, {"loss": loss})

  return jax.jit(train_step, donate_argnums=0), make_eval_step(model, tc.bf16)


def cached_lora_steps(model: Model, tc: TrainConfig, places: list[lora.Place]):
  """(opt_init, train_step(state, base, batch, key), eval_step(factors, base, batch)) of a LoRA
  run: the state's params are the factors; `base` (the frozen params) is an argument, never
  a constant of the program."""
  scale = tc.lora_alpha / tc.lora_rank

  def build(opt):
    schedule_lr = optimizer_lr(tc)

    def loss_fn(factors, base, batch, training):
      params = lora.merged(base, places, factors, scale)
      return masked_loss(forward_nll(model, params, batch, tc.bf16, training), batch["mask"])

    def train_step(state, base, batch, key):
      training = Training(tc.dropout, tc.attn_dropout, jax.random.fold_in(key, state["step"]))
      loss, grads = jax.value_and_grad(loss_fn)(state["params"], base, batch, training)
      return apply_update(opt, schedule_lr, state, grads, {"loss": loss})

    full_eval = make_eval_step(model, tc.bf16)

    @jax.jit
    def eval_step(factors, base, batch):
      return full_eval(lora.merged(base, places, factors, scale), batch)

    return jax.jit(train_step, donate_argnums=0), eval_step

  return compiled((model.graphdef, model.cfg, "lora"), tc, build)


def make_eval_step(model: Model, bf16: bool = False):
  """eval_step(params, batch) -> (sum of masked nll, mask sum, sum of masked chars), jitted."""

  @jax.jit
  def eval_step(params, batch):
    nll = forward_nll(model, params, batch, bf16)
    m = batch["mask"]
    return jnp.sum(nll * m), jnp.sum(m), jnp.sum(batch["chars"] * m)

  return eval_step


def make_mesh(tc: TrainConfig):
  """The (data, model) mesh of tc, or None for a single device."""
  n = len(jax.devices())
  data = tc.data_parallel or max(1, n // tc.model_parallel)
  if data * tc.model_parallel > n:
    raise TrainError(
      f"data_parallel={data} x model_parallel={tc.model_parallel} needs "
      f"{data * tc.model_parallel} devices; {n} available"
    )
  if data * tc.model_parallel == 1:
    return None
  return sharding.make_mesh(
    data=data, model=tc.model_parallel, devices=jax.devices()[: data * tc.model_parallel]
  )


def _batch_sharding(mesh, batch_size: int):
  """Batch rows on "data" (replicated when "data" does not divide B)."""
  from jax.sharding import NamedSharding, PartitionSpec

  spec = PartitionSpec("data") if batch_size % mesh.shape["data"] == 0 else PartitionSpec()
  return NamedSharding(mesh, spec)


def evaluate(eval_step, params, eval_batches, batch_sharding) -> dict[str, float]:
  """eval_loss (nats per target token) and eval_bpc (bits per character) over every batch."""
  nll = n = chars = 0.0
  for batch in eval_batches():
    s = eval_step(params, to_device(batch, batch_sharding))
    nll, n, chars = nll + float(s[0]), n + float(s[1]), chars + float(s[2])
  if n == 0:
    raise TrainError("eval batches hold no target with mask 1")
  return {
    "eval_loss": nll / n,
    "eval_bpc": nll / math.log(2) / chars if chars else math.nan,
    "eval_tokens": int(n),
  }


def evaluate_model(model: Model, eval_batches: Iterable[Batch]) -> dict[str, float]:
  """`evaluate` for a model as it is (its params and dtype, one device): eval_loss,
  eval_bpc, eval_tokens over every batch of `eval_batches`."""
  return evaluate(make_eval_step(model), model.params(), lambda: eval_batches, None)


def train(
  model: Model,
  tc: TrainConfig,
  batches: Callable[[int], Iterable[Batch]] | Iterable[Batch],
  eval_batches: Callable[[], Iterable[Batch]] | None = None,
  *,
  progress: bool = True,
) -> Result:
  """Trains model's params for tc.steps steps (resuming from tc.out_dir's latest checkpoint when
  there is one). Writes metrics.jsonl, loss.png, checkpoints/ and run.json under tc.out_dir."""
  if model.cfg.max_position < tc.seq_len:
    raise TrainError(
      f"seq_len {tc.seq_len} exceeds the model's max_position {model.cfg.max_position}"
    )
  start_run(tc, to_hf(model.cfg))
  base = dataclasses.replace(
    model, state=jax.tree.map(lambda a: a.astype(jnp.float32), model.state), compiled={}
  )
  if distributed.is_main():
    save(base, os.path.join(tc.out_dir, SPEC), weights=False)  # what `export` builds upon
  mesh = make_mesh(tc)
  work = sharding.shard(base, mesh) if mesh is not None else base
  batch_sharding = _batch_sharding(mesh, tc.batch_size) if mesh is not None else None
  places = lora.targets(model.cfg, tc.lora_targets) if tc.lora_rank else []
  if tc.lora_rank:  # train the factors; the model's params are an argument of every step
    base_params = work.params()
    opt_init, lora_step, lora_eval = cached_lora_steps(work, tc, places)
    state = train_state(lora.init(places, tc.lora_rank, tc.seed), opt_init)
    train_step = lambda state, batch, key: lora_step(state, base_params, batch, key)
    eval_step = lambda factors, batch: lora_eval(factors, base_params, batch)
  else:
    opt_init, train_step, eval_step = cached_steps(work, tc)
    state = train_state(work.params(), opt_init)
  key = jax.random.key(tc.seed)

  def step(state, batch, i):
    check_batch(batch, tc, model.cfg.vocab_size, i)
    return train_step(state, to_device(batch, batch_sharding), key)

  def evaluate_(state):
    return evaluate(eval_step, state["params"], eval_batches, batch_sharding)

  state, records, start = run_loop(
    tc,
    state,
    batches,
    step,
    evaluate=evaluate_ if eval_batches is not None else None,
    amount=lambda batch: float(np.sum(batch["mask"])),
    rate_name="tokens_per_s",
    postfix=lambda r: {"loss": f"{r['loss']:.4f}", "tok_s": f"{r['tokens_per_s']:.0f}"},
    progress=progress,
    flops=lambda batch: step_flops(model.cfg, *np.shape(batch["inputs"])),
    best_metric="eval_bpc",
  )
  host = distributed.fetch(state["params"])  # gathered from every process
  if not tc.lora_rank:
    return Result(model=base.with_params(host), records=records, resumed_from=start)
  adapter = lora.to_adapter(
    places, host, rank=tc.lora_rank, alpha=tc.lora_alpha, base=tc.base or None
  )
  merged = base.with_params(
    jax.tree.map(np.asarray, lora.merged(base.params(), places, host, tc.lora_alpha / tc.lora_rank))
  )
  return Result(model=merged, records=records, resumed_from=start, adapter=adapter)


def step_flops(cfg, batch: int, seq_len: int) -> float:
  """Training FLOPs of one step on [batch, seq_len] tokens: 3x the forward (backward = 2x),
  the forward 2 FLOPs per multiply-add of every projection and the LM head per token, plus
  causal attention's scores and values (T / 2 keys per query on average)."""
  D, F, N, K, H, V, L = (
    cfg.d_model,
    cfg.ffn_dim,
    cfg.n_heads,
    cfg.n_kv_heads,
    cfg.head_dim,
    cfg.vocab_size,
    cfg.n_layers,
  )
  per_token = 2 * (L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + D * V)
  per_token += L * 2 * 2 * N * H * (seq_len + 1) / 2
  return 3.0 * per_token * batch * seq_len


def export(run_dir: str, step: int | str, out: str) -> Model | Adapter:
  """Writes checkpoint `step` (an int among the kept ones, or "best") of the LM run in run_dir
  at out: a Hugging Face directory (float32, with the run's tokenizer), or for a LoRA run its
  PEFT adapter (`lm.load(base, adapter=out)` loads it); returns the model, or the adapter."""
  spec = os.path.join(run_dir, SPEC)
  run = read_run(run_dir)
  if run is None or not os.path.isdir(spec):
    raise TrainError(f"{run_dir} is not an LM training run (no {RUN_FILE} and {SPEC}/ there)")
  model = load(spec, weights=False)
  settings = run["train"]
  if settings.get("lora_rank"):
    tc = TrainConfig(**{k: v for k, v in settings.items() if k != "out_dir"}, out_dir=run_dir)
    places = lora.targets(model.cfg, tc.lora_targets)
    like = lora.init(places, tc.lora_rank)
    factors = restore_params(run_dir, TrainConfig, settings, like, step)
    adapter = lora.to_adapter(
      places, factors, rank=tc.lora_rank, alpha=tc.lora_alpha, base=tc.base or None
    )
    write_adapter(out, adapter)
    return adapter
  trained = model.with_params(restore_params(run_dir, TrainConfig, settings, model.params(), step))
  save(trained, out)
  return trained
