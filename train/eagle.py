"""Training of EAGLE draft heads (`kvjax.speculative.head`) against a frozen target model.

    model = lm.load("shakespeare")
    head = speculative.init_head(model, "eagle1")
    ec = EagleConfig(kind="eagle1", steps=1000, batch_size=16, seq_len=256, out_dir="run")
    result = train(model, head, ec, batches=data.train_batches, eval_batches=data.eval_batches,
                   prompts=held_out_prompts)
    speculative.save_head(result.head, "run/head")

Batches follow the LM trainer's contract (`kvjax.train.lm`): inputs, targets [B, T] int32
(targets = the next tokens), mask [B, T] float32 (1 = a real target of the input's document),
optionally segment_ids, positions [B, T] int32 (packed documents). With the T + 1 tokens
t_0 .. t_T of a row, the frozen target runs once over t_0 .. t_{T-1} (no gradient reaches it;
its params are never in the optimizer) and gives features f_i and logits L_i (the target's
distribution of t_{i+1}). Head position i holds the pair (f_i, t_{i+1}); its output h_i
predicts t_{i+2}, whose target distribution is softmax(L_{i+1}), and (eagle1) regresses f_{i+1}.
A position counts when t_i .. t_{i+2} are real tokens of one document.
A batch may instead carry that view precomputed (CACHED_KEYS, `kvjax.train.eagle_features`:
the feature inputs and the top k of L_i), and the target does not run; the losses read either
label through `next_label` and `label_ce`.

  eagle1: loss = SmoothL1(h_i, f_{i+1}) (mean over D) + ce_weight * CE(softmax(L_{i+1}),
    head logits_i), masked means; the input features get uniform noise U(-a, a).
  eagle3: training-time test. Step 0 runs the pairs (fuse(layer inputs)_i, t_{i+1}); step
    j >= 1 runs at position i the pair (h^{j-1}_{i-1}, t_{i+1}): the previous step's outputs
    shifted right by one, the tokens teacher-forced. That is what drafting does: a draft
    node of depth j under a context of pairs 0 .. n - 1 runs at position i = n + j - 1 with
    its parent's output as feature. Its attention (`ttt_masks`): step-0 pairs <= i - j, the
    step-s pair at position i - j + s for 1 <= s < j (its draft ancestors), and itself. Every
    step at position i predicts t_{i+2} (target softmax(L_{i+1})); step j counts where its
    chain t_{i-j} .. t_{i+2} is real and in one document. loss = sum_j decay^j CE_j / sum_j
    decay^j; no feature loss.

The train state is the pure pytree {"params": head params, "opt_state", "step"}, checkpointed
with orbax in OUT/checkpoints; batch i (and the noise of step i) depend only on i and the seed,
so an interrupted and resumed run ends with the bit-identical params of an uninterrupted one.
Validation: loss and top-1 agreement on held-out batches, and val_accept_len, the mean tokens
per target forward of greedy `kvjax.speculative.generate` on held-out prompts.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kvjax.lm.attention import Training
from kvjax.lm.model import Model
from kvjax.speculative import head as heads
from kvjax.speculative.generate import generate as speculative_generate
from kvjax.speculative.tree import TreeSpec
from kvjax.train import checkpoints, loop
from kvjax.train.errors import TrainError
from kvjax.train.loop import AddOnConfig, compiled

Batch = dict[str, np.ndarray]
DISTILL_PROMPTS = ("corpus", "instructions")  # where self-distillation's prompts come from
PLOT_LABEL = "head loss"  # eagle1: SmoothL1 + 0.1 CE; eagle3: step-weighted CE


@dataclasses.dataclass(frozen=True, kw_only=True)
class EagleConfig(AddOnConfig):
  """Hyperparameters and bookkeeping of one head-training run (AddOnConfig's fields, and:).
  Hashable.

  kind: "eagle1" or "eagle3" (must match the head). ttt_steps: eagle3's unrolled steps K
  (clipped to seq_len - 1). feature_noise: half-width of the uniform noise on step-0 input
  features (default 0.1 for eagle1, 0 for eagle3). ce_weight: eagle1's weight of the token
  loss. step_decay: eagle3's weight ratio between consecutive steps. self_distill,
  distill_temperature, distill_prompts: recorded so a resume uses the same data (the
  sequences are made by `kvjax.train.eagle_data.self_distill` after prompts cut from the
  corpus, "corpus", or after `kvjax.train.instructions` in the target's chat template,
  "instructions"). cache_features: the run trains on the self-distilled sequences' target
  view computed once (`kvjax.train.eagle_features`: bfloat16 features, top-32 labels)
  instead of a target forward per step. eval_prompts, prompt_len, new_tokens, tree_*:
  val_accept_len's greedy generation (prompts of prompt_len tokens, new_tokens each,
  TreeSpec(top_k, depth, tokens), by default TreeSpec's).
  """

  kind: str = "eagle1"
  ttt_steps: int = 7
  feature_noise: float | None = None
  ce_weight: float = 0.1
  step_decay: float = 0.8
  self_distill: int = 0
  distill_temperature: float = 1.0
  distill_prompts: str = "corpus"
  cache_features: bool = False
  eval_prompts: int = 4
  prompt_len: int = 64
  new_tokens: int = 48
  tree_top_k: int = TreeSpec.top_k
  tree_depth: int = TreeSpec.depth
  tree_tokens: int = TreeSpec.total_tokens

  DOMAINS: ClassVar[dict[str, loop.Domain]] = {
    **AddOnConfig.DOMAINS,
    **dict.fromkeys(("ttt_steps", "prompt_len", "new_tokens"), loop.INT_POSITIVE),
    **dict.fromkeys(("self_distill", "eval_prompts"), loop.INT_NONNEG),
    **dict.fromkeys(("ce_weight", "distill_temperature", "feature_noise"), loop.NONNEG),
    "step_decay": loop.UNIT,
  }

  def __post_init__(self):
    if self.kind not in heads.KINDS:
      raise TrainError(f"kind must be one of {heads.KINDS}; got {self.kind!r}")
    if self.distill_prompts not in DISTILL_PROMPTS:
      raise TrainError(
        f"distill_prompts must be one of {', '.join(DISTILL_PROMPTS)}; got {self.distill_prompts!r}"
      )
    if not isinstance(self.cache_features, bool):
      raise TrainError(f"cache_features must be a bool; got {self.cache_features!r}")
    if self.cache_features and not self.self_distill:
      raise TrainError("cache_features needs self_distill (fixed sequences to compute once)")
    if self.feature_noise is None:
      object.__setattr__(self, "feature_noise", 0.1 if self.kind == "eagle1" else 0.0)
    super().__post_init__()
    if self.seq_len < 3:
      raise TrainError(f"seq_len must be >= 3 (a pair and the token after); got {self.seq_len}")
    self.tree  # noqa: B018 (validates the tree settings)

  @property
  def ttt(self) -> int:
    """eagle3's unrolled steps: ttt_steps, clipped so step K - 1 has a position to train
    (j <= i <= T - 2); 1 for eagle1."""
    return min(self.ttt_steps, self.seq_len - 1) if self.kind == "eagle3" else 1

  @property
  def tree(self):
    try:
      return TreeSpec(top_k=self.tree_top_k, depth=self.tree_depth, total_tokens=self.tree_tokens)
    except ValueError as err:
      raise TrainError(str(err)) from None

  VALIDATION: ClassVar[frozenset[str]] = frozenset(
    {
      "eval_batches",
      "eval_prompts",
      "prompt_len",
      "new_tokens",
      "tree_top_k",
      "tree_depth",
      "tree_tokens",
    }
  )
  # the self-distillation settings make the data (outside the steps) and must resume
  BOOKKEEPING = (
    AddOnConfig.BOOKKEEPING
    | VALIDATION
    | {"self_distill", "distill_temperature", "distill_prompts"}
  )
  NOT_RESUMED = AddOnConfig.NOT_RESUMED | VALIDATION

  def resume_key(self) -> dict[str, Any]:
    """The fields a resumed run must share with the run it continues (ttt_steps as clipped)."""
    return {**super().resume_key(), "ttt_steps": self.ttt}


# the head config's fields run.json leaves out: where the target came from, not what it is
RUN_IGNORES = ("target_name", "target_fingerprint")


@dataclasses.dataclass
class Result:
  """head: the trained head (params on the host); records: the metrics logged by this call;
  resumed_from: the checkpoint step it started at (0 = fresh)."""

  head: heads.LoadedHead
  records: list[dict[str, Any]]
  resumed_from: int


# --- losses -----------------------------------------------------------------------------------


def target_forward(dec, batch: dict[str, jax.Array], layer_inputs: bool) -> dict[str, jax.Array]:
  """The frozen target over the batch's inputs, [B, T] (packed documents kept apart) -> hidden
  [B, T, D] (final-normed), logits [B, T, V] float32 and, on request, layer_inputs
  [L, B, T, D]; all behind stop_gradient."""
  mask = None
  if "segment_ids" in batch:
    mask = _causal_segments(batch["segment_ids"])
  out, _ = dec(
    batch["inputs"], positions=batch.get("positions"), mask=mask, return_layer_inputs=layer_inputs
  )
  got = {"hidden": out.hidden, "logits": out.logits}
  if layer_inputs:
    got["layer_inputs"] = out.layer_inputs
  return jax.lax.stop_gradient(got)


CACHED_KEYS = {  # a batch's cached target view (`kvjax.train.eagle_features`): trailing shape
  "features": "[B, T, F]",
  "label_ids": "[B, T, k]",
  "label_logits": "[B, T, k]",
  "best": "[B, T]",
}


def target_view(head: heads.Head, dec, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """What the losses read of the frozen target at the batch's positions: "inputs" [B, T, F]
  (`head.feature_inputs`), and its next-token distribution, either "logits" [B, T, V] of a
  live forward or, when the batch carries CACHED_KEYS (precomputed, no forward here), the top
  k "label_ids" / "label_logits" [B, T, k] and the argmax "best" [B, T]."""
  if "features" in batch:
    return {
      "inputs": batch["features"].astype(dec.dtype),
      **{k: batch[k] for k in ("label_ids", "label_logits", "best")},
    }
  out = target_forward(dec, batch, head.hc.kind == "eagle3")
  return {
    "inputs": head.feature_inputs(out["hidden"], out.get("layer_inputs")),
    "logits": out["logits"],
  }


def _causal_segments(segments: jax.Array) -> jax.Array:
  """segments [B, T] -> [B, T, T] bool: causal within one document."""
  T = segments.shape[1]
  return (segments[:, :, None] == segments[:, None, :]) & jnp.tril(jnp.ones((T, T), bool))


def _positions(batch) -> jax.Array:
  B, T = batch["inputs"].shape
  pos = batch.get("positions")
  return pos if pos is not None else jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def smooth_l1(x: jax.Array) -> jax.Array:
  """Elementwise SmoothL1 (Huber, beta 1): 0.5 x^2 where |x| < 1, else |x| - 0.5."""
  a = jnp.abs(x)
  return jnp.where(a < 1.0, 0.5 * x * x, a - 0.5)


def _next(a: jax.Array, fill=0) -> jax.Array:
  """a [B, T, ...] -> a[:, i + 1] at position i, `fill` at T - 1."""
  pad = [(0, 0), (0, 1)] + [(0, 0)] * (a.ndim - 2)
  return jnp.pad(a[:, 1:], pad, constant_values=fill)


def next_label(
  tgt: dict[str, jax.Array], classes: jax.Array | None, vocab: int
) -> dict[str, jax.Array]:
  """The label of head position i: the target's distribution at position i + 1 (of t_{i+2};
  nothing at T - 1), renormalised over the M classes of the head's logits (`classes` [M]:
  their ids in the target's vocabulary of `vocab` tokens; None: the whole vocabulary), made
  once per batch for every unrolled step. From a live forward (its logits, [B, T, V]): {"p"
  [B, T, M]}; from cached features (`kvjax.train.eagle_features`, the top k of each
  position): {"p" [B, T, k], "ids" [B, T, k] class indices}, entries outside the classes at
  p 0 (the rest of the mass is unknown). Both add "best" [B, T], the target's argmax."""
  if "label_ids" not in tgt:
    logits = _next(tgt["logits"]).astype(jnp.float32)
    kept = logits if classes is None else logits[..., classes]
    return {"p": jax.nn.softmax(kept, -1), "best": jnp.argmax(logits, -1)}
  ids = _next(tgt["label_ids"], -1)
  if classes is not None:
    to_class = jnp.full((vocab,), -1, jnp.int32).at[classes].set(jnp.arange(len(classes)))
    ids = jnp.where((ids >= 0) & (ids < vocab), to_class[jnp.clip(ids, 0, vocab - 1)], -1)
  keep = ids >= 0
  logits = jnp.where(keep, _next(tgt["label_logits"]).astype(jnp.float32), -1e30)
  return {
    "p": jax.nn.softmax(logits, -1) * keep,
    "ids": jnp.maximum(ids, 0),
    "best": _next(tgt["best"], -1),
  }


def label_ce(label: dict[str, jax.Array], q: jax.Array) -> jax.Array:
  """[B, T]: cross-entropy of a `next_label` label against logits q [B, T, M]."""
  logq = jax.nn.log_softmax(q.astype(jnp.float32), -1)
  if "ids" in label:
    logq = jnp.take_along_axis(logq, label["ids"], -1)
  return -jnp.sum(label["p"] * logq, -1)


def _mean(x: jax.Array, m: jax.Array) -> jax.Array:
  return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def _shift(x: jax.Array, j: int) -> jax.Array:
  """x [B, T, ...] -> y with y[:, i] = x[:, i - j] (zeros for i < j)."""
  if j == 0:
    return x
  return jnp.pad(x, [(0, 0), (j, 0)] + [(0, 0)] * (x.ndim - 2))[:, : x.shape[1]]


def valid_masks(mask: jax.Array, K: int) -> jax.Array:
  """mask [B, T] (1 = targets[:, i] = t_{i+1} is real and of t_i's document) -> [K, B, T]:
  step j at position i counts iff mask[k] for every k in [i - j, i + 1] (k < T): the chain
  t_{i-j} .. t_{i+2} is real and in one document."""
  nxt = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))  # mask[i + 1], 0 past the end
  out, m = [], mask * nxt
  for j in range(K):
    m = m * _shift(mask, j) if j else m
    out.append(m)
  return jnp.stack(out)


def ttt_masks(K: int, T: int, segments: jax.Array | None = None) -> jax.Array:
  """The attention masks of eagle3's K unrolled steps over a head cache of S = (K - 1) T
  slots, step s < K - 1 written at slots [s T, s T + T) (its positions 0 .. T - 1).

  Returns [K, T, K T] bool (or [K, B, T, K T] given segments [B, T], which keep documents
  apart), each step's [T, S + T] mask over (cache slots, its own T pairs): step 0 attends
  causally among its own pairs; step j >= 1 at position i attends to the step-0 pairs at
  positions <= i - j, to the step-s pair at position i - j + s (1 <= s < j) and to itself."""
  i = np.arange(T)[:, None]
  c = np.arange(T)[None, :]
  none = np.zeros((T, T), bool)
  steps = []
  for j in range(K):
    blocks = []
    for s in range(K - 1):
      if j >= 1 and s == 0:
        blocks.append(c <= i - j)
      elif 1 <= s < j:
        blocks.append(c == i - j + s)
      else:
        blocks.append(none)
    blocks.append(c <= i if j == 0 else c == i)
    steps.append(np.concatenate(blocks, axis=1))
  masks = jnp.asarray(np.stack(steps))
  if segments is None:
    return masks
  same = segments[:, :, None] == segments[:, None, :]  # [B, T, T]
  return masks[:, None] & jnp.tile(same, (1, 1, K))[None]


def eagle1_loss(head: heads.Head, dec, tgt, batch, key, ec: EagleConfig):
  """(loss, stats) of an eagle1 head on one batch; `tgt` from `target_view`."""
  f = tgt["inputs"]
  x = f
  if ec.feature_noise > 0:
    x = f + jax.random.uniform(key, f.shape, f.dtype, -ec.feature_noise, ec.feature_noise)
  mask = None if "segment_ids" not in batch else _causal_segments(batch["segment_ids"])
  h, _ = head(
    x,
    dec.embed_tokens(batch["targets"]),
    cache=None,
    positions=_positions(batch),
    training=Training(),
    mask=mask,
  )
  valid = valid_masks(batch["mask"], 1)[0]  # [B, T]: 0 at T - 1
  feature_loss = _mean(jnp.mean(smooth_l1(h[:, :-1] - f[:, 1:]), -1), valid[:, :-1])
  label = next_label(tgt, None, head.hc.target.vocab_size)
  q = head.logits(h, dec)
  ce = _mean(label_ce(label, q), valid)
  top1 = _mean(jnp.argmax(q, -1) == label["best"], valid)
  loss = feature_loss + ec.ce_weight * ce
  return loss, {
    "loss": loss,
    "feature_loss": feature_loss,
    "ce": ce,
    "top1": top1,
    "n": jnp.sum(valid),
  }


def ttt_forward(
  head: heads.Head,
  features: jax.Array,
  embeds: jax.Array,
  positions: jax.Array,
  K: int,
  segments: jax.Array | None = None,
) -> list[jax.Array]:
  """eagle3's K unrolled steps over T pairs -> [h^0, ..., h^{K-1}], each [B, T, D]: step 0
  runs the pairs (features_i, embeds_i), step j >= 1 the pairs (h^{j-1}_{i-1}, embeds_i)
  (zeros at i = 0), attending as `ttt_masks` says. features, embeds [B, T, D]; positions,
  segments [B, T]."""
  B, T, _ = features.shape
  masks = ttt_masks(K, T, segments)
  if masks.ndim == 3:
    masks = jnp.broadcast_to(masks[:, None], (K, B) + masks.shape[1:])
  # a barrier keeps XLA from constant-folding attention over the all-constant first steps
  masks = jax.lax.optimization_barrier(masks)
  S = (K - 1) * T
  cache = heads.new_cache(head.hc, B, 0, features.dtype)
  x, hs = features, []
  for j in range(K):
    # the cache grows by one block per step (slots [0, jT) filled, [jT, jT + T) for this
    # step's write), so step j attends over (j + 1) T slots, not S, in `ttt_masks`' layout
    size = min(j + 1, K - 1) * T
    cache = _grow(cache, size)
    mask = jnp.concatenate([masks[j][..., :size], masks[j][..., S:]], axis=-1)
    h, cache = head(x, embeds, cache=cache, positions=positions, mask=mask, training=Training())
    hs.append(h)
    x = _shift(h, 1)
  return hs


def eagle3_loss(head: heads.Head, dec, tgt, batch, key, ec: EagleConfig):
  """(loss, stats) of an eagle3 head on one batch with ec.ttt unrolled steps; `tgt` from
  `target_view`."""
  K = ec.ttt
  f = head.project(tgt["inputs"])
  if ec.feature_noise > 0:
    f = f + jax.random.uniform(key, f.shape, f.dtype, -ec.feature_noise, ec.feature_noise)
  hs = ttt_forward(
    head, f, dec.embed_tokens(batch["targets"]), _positions(batch), K, batch.get("segment_ids")
  )
  d2t = jnp.asarray(head.hc.draft_vocab, jnp.int32)
  # a reduced draft vocabulary (EAGLE-3): the target's distribution renormalised over the N
  # draft tokens is the label, at positions whose target argmax is one of them
  label = next_label(tgt, d2t if head.hc.draft_vocab else None, head.hc.target.vocab_size)
  best = label["best"]
  valid = valid_masks(batch["mask"], K)  # [K, B, T]
  if head.hc.draft_vocab:
    valid = valid * jnp.isin(best, d2t)[None]
  weights = [ec.step_decay**j for j in range(K)]
  total, stats = 0.0, {}
  for j, h in enumerate(hs):
    q = head.draft_logits(h, dec) if head.hc.draft_vocab else head.logits(h, dec)
    ce = _mean(label_ce(label, q), valid[j])
    total = total + weights[j] * ce
    drafted = d2t[jnp.argmax(q, -1)] if head.hc.draft_vocab else jnp.argmax(q, -1)
    if j == 0:
      stats["ce"] = ce
      stats["top1"] = _mean(drafted == best, valid[0])
    if j == K - 1 and K > 1:
      stats["top1_last"] = _mean(drafted == best, valid[j])
  loss = total / sum(weights)
  return loss, {"loss": loss, **stats, "n": jnp.sum(valid[0])}


def _grow(cache, size: int):
  """cache with its slot axis padded (free slots) to `size`."""
  n = size - cache.size
  if n <= 0:
    return cache
  pad = lambda a: jnp.pad(a, [(0, 0), (0, 0), (0, 0), (0, n), (0, 0)])
  pos = jnp.pad(cache.pos, ((0, 0), (0, n)), constant_values=-1)
  return dataclasses.replace(cache, k=pad(cache.k), v=pad(cache.v), pos=pos)


def loss_fn(head: heads.LoadedHead, params, dec, tgt, batch, key, ec: EagleConfig):
  """(loss, stats) of `head`'s structure with `params` (a pure dict) on one batch."""
  module = head.with_params(params).module
  fn = eagle1_loss if ec.kind == "eagle1" else eagle3_loss
  return fn(module, dec, tgt, batch, key, ec)


# --- steps ------------------------------------------------------------------------------------


def cached_steps(model: Model, head: heads.LoadedHead, ec: EagleConfig):
  """(opt_init, train_step, eval_step) for a (target graphdef, head graphdef) and ec
  (`loop.compiled`), so repeated runs (tests, resumes) reuse the compiled programs."""
  return compiled(
    (model.graphdef, model.cfg, head.graphdef), ec, lambda opt: make_steps(model, head, ec, opt)
  )


def make_steps(
  model: Model, head: heads.LoadedHead, ec: EagleConfig, opt: optax.GradientTransformation
):
  """train_step(state, target_params, batch, key) -> (state, stats), donating state; stats:
  loss, ce, top1, feature_loss (eagle1), top1_last (eagle3, K > 1), n (counted positions),
  grad_norm (before clipping), lr. eval_step(params, target_params, batch) -> stats, no
  noise. The target's params are an argument, never differentiated (stop_gradient)."""
  schedule_lr = loop.optimizer_lr(ec)
  clean = dataclasses.replace(ec, feature_noise=0.0)

  def target(target_params, batch):
    dec = model.with_params(jax.lax.stop_gradient(target_params)).decoder
    return dec, target_view(head.module, dec, batch)

  def train_step(state, target_params, batch, key):
    dec, tgt = target(target_params, batch)
    key = jax.random.fold_in(key, state["step"])
    grad_fn = jax.value_and_grad(lambda p: loss_fn(head, p, dec, tgt, batch, key, ec), has_aux=True)
    (_, stats), grads = grad_fn(state["params"])
    return loop.apply_update(opt, schedule_lr, state, grads, stats)

  @jax.jit
  def eval_step(params, target_params, batch):
    dec, tgt = target(target_params, batch)
    return loss_fn(head, params, dec, tgt, batch, jax.random.key(0), clean)[1]

  return jax.jit(train_step, donate_argnums=0), eval_step


# --- training ---------------------------------------------------------------------------------


def _checked_view(batch: Batch, head: heads.LoadedHead, i: int) -> Batch:
  """The batch's CACHED_KEYS, checked against the run's shapes (TrainError otherwise)."""
  B, T = batch["inputs"].shape
  F = head.hc.feature_width
  missing = sorted(set(CACHED_KEYS) - set(batch))
  if missing:
    raise TrainError(f"batch {i}: cached target features lack {', '.join(missing)}")
  k = np.shape(batch["label_ids"])[-1:]
  want = {
    "features": (B, T, F),
    "label_ids": (B, T, *k),
    "label_logits": (B, T, *k),
    "best": (B, T),
  }
  for key, shape in want.items():
    if tuple(np.shape(batch[key])) != shape:
      raise TrainError(
        f"batch {i}: {key} must be {CACHED_KEYS[key]} = {list(shape)} for this head and "
        f"batch; got {list(np.shape(batch[key]))}"
      )
  return {key: batch[key] for key in CACHED_KEYS}


def evaluate(
  eval_step, params, target_params, eval_batches: Iterable[Batch], n_batches: int
) -> dict[str, float]:
  """eval_<stat> for every stat of eval_step: means over the counted positions of the first
  n_batches held-out batches (eval_n: the positions counted)."""
  sums: dict[str, float] = {}
  total = 0.0
  for batch in itertools.islice(eval_batches, n_batches):
    stats = jax.device_get(
      eval_step(params, target_params, loop.to_device(batch, keys=loop.TOKEN_KEYS))
    )
    n = float(stats.pop("n"))
    total += n
    for k, v in stats.items():
      sums[k] = sums.get(k, 0.0) + float(v) * n
  if total == 0:
    raise TrainError("eval batches hold no position to score (mask 1 on three tokens in a row)")
  return {**{f"eval_{k}": v / total for k, v in sums.items()}, "eval_n": int(total)}


def validate(
  model: Model, head: heads.LoadedHead, prompts: Sequence[Sequence[int]], ec: EagleConfig
) -> float:
  """Mean accepted tokens per target forward (the bonus token included) of greedy
  speculative generation of ec.new_tokens tokens after each prompt, in one batch."""
  out = speculative_generate(
    model, head, [list(map(int, p)) for p in prompts], max_new_tokens=ec.new_tokens, tree=ec.tree
  )
  return float(out.stats["mean_accept_len"])


def train(
  model: Model,
  head: heads.LoadedHead,
  ec: EagleConfig,
  batches: Callable[[int], Iterable[Batch]] | Iterable[Batch],
  eval_batches: Callable[[], Iterable[Batch]] | None = None,
  prompts: Sequence[Sequence[int]] | None = None,
  *,
  progress: bool = True,
) -> Result:
  """Trains `head`'s params against the frozen `model` for ec.steps steps (resuming from
  ec.out_dir's latest checkpoint when there is one). Writes metrics.jsonl, loss.png,
  checkpoints/ and run.json under ec.out_dir. batches: as for `kvjax.train.lm.train`.
  eval_batches: () -> held-out batches (the first ec.eval_batches are scored). prompts: token
  ids of held-out prompts for val_accept_len (the first ec.eval_prompts are used)."""
  if head.hc.kind != ec.kind:
    raise TrainError(f"the head is {head.hc.kind} but the run trains {ec.kind}")
  heads.check(head.hc, model.cfg)
  if model.cfg.max_position < ec.seq_len:
    raise TrainError(
      f"seq_len {ec.seq_len} exceeds the target's max_position {model.cfg.max_position}"
    )
  prompts = list(prompts or [])[: ec.eval_prompts]
  if prompts:
    longest = max(map(len, prompts))
    if longest + ec.new_tokens > model.cfg.max_position:
      raise TrainError(
        f"validation prompts of {longest} tokens + {ec.new_tokens} new tokens "
        f"exceed the target's max_position {model.cfg.max_position}"
      )
  checkpoints.start_run(ec, head.hc.to_json(), ignore=RUN_IGNORES)
  dtype = jax.tree.leaves(head.state)[0].dtype
  work = head.with_params(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), head.params()))
  opt_init, train_step, eval_step = cached_steps(model, work, ec)
  target_params = model.params()
  base_key = jax.random.key(ec.seed)
  has_eval = eval_batches is not None or bool(prompts)
  state = loop.train_state(work.params(), opt_init)

  def step(state, batch, i):
    loop.check_batch(batch, ec, model.cfg.vocab_size, i, keys=loop.TOKEN_KEYS)
    device_batch = loop.to_device(batch, keys=loop.TOKEN_KEYS)
    if "features" in batch:
      device_batch.update(jax.device_put(_checked_view(batch, head, i)))
    return train_step(state, target_params, device_batch, base_key)

  def evaluate_(state):
    record = {}
    if eval_batches is not None:
      record.update(
        evaluate(eval_step, state["params"], target_params, eval_batches(), ec.eval_batches)
      )
    if prompts:
      record["val_accept_len"] = validate(model, work.with_params(state["params"]), prompts, ec)
    return record

  def postfix(record):
    post = {"loss": f"{record['loss']:.4f}", "top1": f"{record['top1']:.3f}"}
    if "val_accept_len" in record:
      post["accept"] = f"{record['val_accept_len']:.2f}"
    return post

  state, records, start = loop.run_loop(
    ec,
    state,
    batches,
    step,
    evaluate=evaluate_ if has_eval else None,
    amount=lambda batch: float(np.sum(batch["mask"])),
    rate_name="tokens_per_s",
    postfix=postfix,
    plot_label=PLOT_LABEL,
    progress=progress,
    best_metric="eval_loss" if eval_batches is not None else None,
  )
  host = loop.host_params(state["params"], dtype)
  return Result(head=head.with_params(host), records=records, resumed_from=start)


def export(run_dir: str, step: int | str, target: Model) -> heads.LoadedHead:
  """The head at checkpoint `step` (an int among the kept ones, or "best") of the EAGLE run
  in run_dir, for `target`: the model it trains against, whose config must be the run's
  (run.json records the head's config, the target's included). A run cut short is exported
  as it stood; the head's params take the target's dtype, as `train` returns them."""
  run = checkpoints.read_run(run_dir)
  if run is None:
    raise TrainError(f"{run_dir} is not a training run (no {checkpoints.RUN_FILE} there)")
  saved = run.get("model", {})
  if saved.get("kind") not in ("eagle1", "eagle3") or "train" not in run:
    raise TrainError(f"{run_dir} is not an EAGLE head's training run")
  head = heads.init(
    target,
    saved["kind"],
    fuse_layers=tuple(saved.get("fuse_layers", ())),
    draft_vocab=tuple(saved.get("draft_vocab", ())),
    published=bool(saved.get("published", False)),
  )
  made = json.loads(json.dumps(head.hc.to_json()))
  differ = [k for k in checkpoints.differing(made, saved) if k not in RUN_IGNORES]
  if differ:
    raise TrainError(
      f"{run_dir} trained a head whose {', '.join(differ)} differ from one for this target: "
      "export it against the model it was trained for"
    )
  params = loop.restore_params(run_dir, EagleConfig, run["train"], head.params(), step)
  dtype = jax.tree.leaves(head.state)[0].dtype
  return head.with_params(jax.tree.map(lambda a: a.astype(dtype), params))
