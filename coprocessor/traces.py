"""The augmentation traces of a batch in one pass, and perplexity by position after the latents:
what training optimises (`kvjax.train.coprocessor`) and what `kvjax ppl --coprocessor` reports.

With the tokens x_0 .. x_T of a row (inputs = x_0 .. x_{T-1}, targets = x_1 .. x_T), an
augmentation point p (1 <= p, p + A <= T) splits the row into the prefix x_<p, whose cache the
coprocessor reads, and what follows. Its trace is what generation does after augmenting there:
the coprocessor reads the prefix with its soft tokens at positions p .. p + N - 1, the N latents
go into the base's next slots at position p + CoprocessorConfig.latent_offset (default p - 33),
and the A ahead tokens x_p .. x_{p+A-1} follow at their own positions p .., teacher-forced; the
loss is the nll of their next tokens x_{p+1} .. x_{p+A} (ahead position a = 1 .. A). With delay
k the latents are still read from x_<p but inserted after x_<p+k (the asynchronous setting):
the trace starts at p + k.

All M traces of a row run in one pass (`multi_trace`): the frozen base runs once over the
row and keeps every layer's K/V; the coprocessor runs the M copies of the soft tokens over
that cache with a block-sparse mask (trace j's soft tokens see the slots before p_j of its
document and, causally, each other); the base then runs all M (latents, ahead) blocks over the
same cache, trace j seeing the slots before its insertion point and causally its own block.
The base's params sit behind stop_gradient. The unaugmented nll of the same targets comes free
from the first pass. Packed documents stay apart: a trace sees only its own document, and an
ahead target of another document does not count.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from kvjax.cache.dense import KVCache
from kvjax.coprocessor.model import (
  LATENT_POSITION,
  Coprocessor,
  CoprocessorConfig,
  CoprocessorError,
  check,
  decoder,
  latents_of,
)
from kvjax.lm.attention import Training
from kvjax.lm.model import Model
from kvjax.lm.steps import token_nll


def room_error(
  seq_len: int, ahead: int, points: int, delay: int, *, flags: bool = False
) -> str | None:
  """Why `points` augmentation points with `ahead` tokens (`delay` late) do not fit in a
  sequence of seq_len inputs, or None. flags: name the settings as command-line flags."""
  name = (lambda f: "--" + f.replace("_", "-")) if flags else (lambda f: f)
  if ahead >= seq_len:
    return (
      f"{name('ahead')} ({ahead}) must be smaller than {name('seq_len')} ({seq_len}): "
      "each point needs a prefix and its ahead tokens inside the sequence"
    )
  room = seq_len - ahead - delay
  if room < points:
    return (
      f"{points} points need {points} distinct positions in [1, {name('seq_len')} - "
      f"{name('ahead')} - {name('delay')}] = [1, {room}]"
    )
  return None


def even_points(batch: int, seq_len: int, points: int, ahead: int, delay: int = 0) -> np.ndarray:
  """[B, M] int32: M points spread evenly over [1, seq_len - ahead - delay], the same in every
  row (evaluation)."""
  error = room_error(seq_len, ahead, points, delay)
  if error:
    raise CoprocessorError(error)
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


def multi_trace(
  base_dec,
  cop_dec,
  soft: jax.Array,
  batch: dict[str, jax.Array],
  points: jax.Array,
  *,
  ahead: int,
  delay: int = 0,
  latent_offset: int = LATENT_POSITION,
  training: Training | None = None,
) -> dict[str, jax.Array]:
  """Every augmentation trace of a batch in one pass (see the module docstring).

  base_dec: the frozen base's Decoder; cop_dec: the coprocessor's (None = pause tokens);
  soft [N, D]; batch: inputs, targets, mask [B, T] (+ segment_ids, positions); points [B, M]
  int32 with 1 <= p and p + delay < T; latent_offset: where the base sees the latents (the
  coprocessor's CoprocessorConfig.latent_offset). Returns nll_aug, nll_base, valid: [B, M, A]
  float32, the augmented and unaugmented nll of the target at ahead position a + 1 of trace
  j, and 1 where that target counts (inside the row, a real target of the point's document).
  The first pass (the base over the row) is behind stop_gradient."""
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
  nll_main = token_nll(main.logits, targets)  # [B, T]
  cache = KVCache(k=main.k, v=main.v, pos=pos, length=jnp.full((B,), T, jnp.int32))
  latents = latents_of(
    cop_dec,
    soft,
    cache,
    positions=_block_positions(pos, points, N),
    mask=_block_mask(seg, points, N),
    copies=M,
    training=training,
  )  # [B, M N, D]
  at = points + delay  # insertion points
  idx, valid = _ahead_targets(batch["mask"], seg, points, at, A)
  x = jnp.concatenate(
    [
      latents.reshape(B, M, N, -1).astype(base_dec.dtype),
      base_dec.embed_tokens(_take(inputs, idx)),
    ],
    axis=2,
  )
  offsets = jnp.concatenate(
    [jnp.full((N,), latent_offset, jnp.int32), jnp.arange(A, dtype=jnp.int32)]
  )  # latents, ahead
  base_pos = (_take(pos, at)[..., None] + offsets).reshape(B, M * (N + A))
  out, _ = base_dec(
    embeds=x.reshape(B, M * (N + A), -1),
    cache=cache,
    positions=base_pos,
    training=training,
    mask=_block_mask(seg, at, N + A),
    logits=False,
  )
  hidden = out.hidden.reshape(B, M, N + A, -1)[:, :, N:]  # the ahead tokens
  nll_aug = token_nll(base_dec.logits(hidden), _take(targets, idx))
  return {"nll_aug": nll_aug, "nll_base": _take(nll_main, idx), "valid": valid}


def _block_mask(seg: jax.Array, at: jax.Array, n: int) -> jax.Array:
  """seg [B, T] segment ids, at [B, M] insertion points -> [B, M n, T + M n] bool: the mask of
  M blocks of n items inserted at `at`, block j seeing the slots of at_j's document before
  at_j and, causally, its own items."""
  B, T = seg.shape
  M = at.shape[1]
  prefix = (jnp.arange(T) < at[..., None]) & (seg[:, None, :] == _take(seg, at)[..., None])
  prefix = jnp.broadcast_to(prefix[:, :, None], (B, M, n, T)).reshape(B, M * n, T)
  own = jnp.broadcast_to(jnp.asarray(_block_causal(M, n)), (B, M * n, M * n))
  return jnp.concatenate([prefix, own], axis=-1)


def _block_positions(pos: jax.Array, at: jax.Array, n: int) -> jax.Array:
  """pos [B, T], at [B, M] -> [B, M n]: block j's items at positions pos[at_j] + 0 .. n - 1."""
  B, M = at.shape
  return (_take(pos, at)[..., None] + jnp.arange(n, dtype=jnp.int32)).reshape(B, M * n)


def _ahead_targets(mask, seg, points, at, A: int) -> tuple[jax.Array, jax.Array]:
  """(idx [B, M, A] the input slots of each trace's ahead tokens (clamped to T - 1), valid
  [B, M, A] float32: 1 where the target counts: inside the row, a real target (mask [B, T])
  of the point's document, the insertion point at [B, M] in that document too)."""
  T = seg.shape[1]
  idx = at[..., None] + jnp.arange(A)  # [B, M, A]
  inside = idx < T
  idx = jnp.minimum(idx, T - 1)
  same_doc = (_take(seg, idx) == _take(seg, points)[..., None]) & (
    _take(seg, at) == _take(seg, points)
  )[..., None]
  return idx, (inside & same_doc & (_take(mask, idx) > 0)).astype(jnp.float32)


def decoders(base: Model, base_params, cc, params):
  """(base Decoder, coprocessor Decoder or None) from pure params; the base's behind
  stop_gradient."""
  frozen = base.with_params(jax.lax.stop_gradient(base_params))
  return frozen.decoder, decoder(frozen.graphdef, frozen.state, cc, params)


def trace_stats(got: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """loss (mean augmented nll over the counted targets), base_loss, n, and per ahead position
  a: sum_aug [A], sum_base [A], count [A] (sums over the counted targets)."""
  v = got["valid"]
  n = jnp.sum(v)
  loss = jnp.sum(got["nll_aug"] * v) / jnp.maximum(n, 1.0)
  base_loss = jnp.sum(got["nll_base"] * v) / jnp.maximum(n, 1.0)
  return {
    "loss": loss,
    "base_loss": base_loss,
    "n": n,
    "sum_aug": jnp.sum(got["nll_aug"] * v, (0, 1)),
    "sum_base": jnp.sum(got["nll_base"] * v, (0, 1)),
    "count": jnp.sum(v, (0, 1)),
  }


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
    return {
      "ppl_base_by_position": self.ppl_base.tolist(),
      "ppl_aug_by_position": self.ppl_aug.tolist(),
      "relative_reduction_by_position": self.relative_reduction.tolist(),
      "loss_base": self.loss_base,
      "loss_aug": self.loss_aug,
      "relative_reduction_all": 1.0 - math.exp(self.loss_aug - self.loss_base),
      "targets_by_position": self.targets.astype(int).tolist(),
      "points": self.points,
    }


def accumulate(stats: Iterable[dict[str, Any]]) -> ByPosition:
  """Sums `trace_stats` of several batches into a ByPosition."""
  aug = base = count = 0.0
  points = 0
  for s in stats:
    s = jax.device_get(s)
    aug, base = (
      aug + np.asarray(s["sum_aug"], np.float64),
      base + np.asarray(s["sum_base"], np.float64),
    )
    count = count + np.asarray(s["count"], np.float64)
    points += int(s.get("points", 0))
  count = np.asarray(count)
  if not np.all(count > 0):
    raise CoprocessorError("the evaluation text holds no target to score at some ahead position")
  return ByPosition(
    ppl_base=np.exp(base / count),
    ppl_aug=np.exp(aug / count),
    loss_base=float(np.sum(base) / np.sum(count)),
    loss_aug=float(np.sum(aug) / np.sum(count)),
    targets=count,
    points=points,
  )


def by_position(
  base: Model,
  cop: Coprocessor,
  windows: np.ndarray,
  *,
  ahead: int = 32,
  points: int = 16,
  delay: int = 0,
  batch_size: int = 8,
  progress: bool = False,
) -> ByPosition:
  """Perplexity by ahead position over held-out token windows [R, T + 1] (-1 = no token; one
  document per window), with M points per window spread evenly over [1, T - ahead - delay],
  every trace run in the one-pass forward (equal, as tested, to augmenting trace by trace)."""
  check(cop.cc, base.cfg)
  windows = np.asarray(windows)
  if windows.ndim != 2 or windows.shape[1] < 3 or not len(windows):
    raise CoprocessorError(
      f"windows must be [R, T + 1] with R >= 1, T >= 2; got {list(windows.shape)}"
    )
  T = windows.shape[1] - 1
  if ahead >= T:
    raise CoprocessorError(f"ahead ({ahead}) must be smaller than the window's {T} inputs")
  if T + cop.n_latents + ahead > base.cfg.max_position:
    raise CoprocessorError(
      f"windows of {T} tokens + {cop.n_latents} latents + {ahead} ahead exceed "
      f"the model's context of {base.cfg.max_position}"
    )
  eval_step = trace_step(base, cop.cc)
  pad = (-len(windows)) % batch_size
  rows = np.concatenate([windows, np.full((pad, T + 1), -1, windows.dtype)])
  bar = tqdm(
    total=len(rows) // batch_size,
    desc="augmented ppl",
    unit="batch",
    dynamic_ncols=True,
    disable=not progress,
  )
  pts = jnp.asarray(even_points(batch_size, T, points, ahead, delay))
  base_params = base.params()

  def stats():
    for s in range(0, len(rows), batch_size):
      w = rows[s : s + batch_size]
      real = (w[:, :-1] >= 0) & (w[:, 1:] >= 0)
      batch = {
        "inputs": np.maximum(w[:, :-1], 0),
        "targets": np.maximum(w[:, 1:], 0),
        "mask": real.astype(np.float32),
      }
      got = dict(
        eval_step(cop.params, base_params, jax.device_put(batch), pts, ahead=ahead, delay=delay)
      )
      got["points"] = int(np.sum(real[:, np.asarray(pts[0])]))
      bar.update(1)
      yield got

  out = accumulate(stats())
  bar.close()
  return out


def trace_step(base: Model, cc: CoprocessorConfig) -> Callable:
  """step(params, base_params, batch, points, *, ahead, delay) -> `trace_stats`, jitted (one
  per base structure and coprocessor config, kept): every trace of a batch in one pass."""
  key = (base.graphdef, base.cfg, cc)
  if key not in _TRACE_STEPS:

    @functools.partial(jax.jit, static_argnames=("ahead", "delay"))
    def step(params, base_params, batch, points, *, ahead, delay):
      base_dec, cop_dec = decoders(base, base_params, cc, params)
      return trace_stats(
        multi_trace(
          base_dec,
          cop_dec,
          params["soft"],
          batch,
          points,
          ahead=ahead,
          delay=delay,
          latent_offset=cc.latent_offset,
        )
      )

    _TRACE_STEPS[key] = step
  return _TRACE_STEPS[key]


_TRACE_STEPS: dict = {}
