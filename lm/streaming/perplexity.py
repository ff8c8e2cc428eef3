"""Streaming perplexity: a text scored token by token through a bounded cache, as the
StreamingLLM paper evaluates.

    streaming.perplexity(model, ids, cache="sink", n_sink=4, window=252)

Cache modes (the paper's Table 2 baselines):
  dense      every token kept (refused when the text exceeds the model's context);
  window     a rolling window of `window` tokens, no sinks (positions re-assigned in the cache);
  sink       `n_sink` attention sinks + a rolling window of `window` tokens (StreamingLLM);
  recompute  for every token, the previous `window` tokens recomputed from scratch at
             positions 0..window-1 (the quality baseline; O(window) work per token).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from kvjax.cache.dense import KVCache
from kvjax.cache.sink import SinkCache
from kvjax.lm import steps
from kvjax.lm.engine import check_finite
from kvjax.lm.model import Model

MODES = ("dense", "window", "sink", "recompute")


@dataclasses.dataclass
class Perplexity:
  """ppl = exp(mean nll) over `tokens` predicted tokens (every token but the first, unless a
  recompute run scored every k-th); nll [tokens] float32 per predicted token; positions
  [tokens] int: the index in ids of each predicted token; peak_cache_tokens: most tokens held
  at once; ms_per_token: wall time per predicted token, compilation excluded."""

  ppl: float
  tokens: int
  peak_cache_tokens: int
  ms_per_token: float
  nll: np.ndarray
  positions: np.ndarray


def _check(model: Model, ids: Sequence[int], cache: str, n_sink: int, window: int | None):
  if cache not in MODES:
    raise ValueError(f"cache must be one of {', '.join(MODES)}; got {cache!r}")
  ids = np.asarray(ids)
  if ids.ndim != 1 or len(ids) < 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"expected a 1-D sequence of at least 2 token ids; got shape {ids.shape}")
  if ids.min() < 0 or ids.max() >= model.cfg.vocab_size:
    raise ValueError(f"token ids outside [0, {model.cfg.vocab_size})")
  if not isinstance(n_sink, int) or n_sink < 0:
    raise ValueError(f"n_sink must be an int >= 0; got {n_sink!r}")
  if cache == "dense":
    if len(ids) > model.cfg.max_position:
      raise ValueError(
        f"the text has {len(ids)} tokens, more than the model's context of "
        f"{model.cfg.max_position}: a dense cache cannot hold it (use "
        "--cache sink, window or recompute)"
      )
    return ids.astype(np.int32)
  if not isinstance(window, int) or window < 1:
    raise ValueError(f"cache={cache!r} needs window >= 1; got {window!r}")
  if cache != "sink" and n_sink:
    raise ValueError(f"cache={cache!r} keeps no sinks; n_sink={n_sink} applies to cache='sink'")
  if n_sink + window > model.cfg.max_position:
    raise ValueError(
      f"sinks + window = {n_sink + window} exceeds the model's context of "
      f"{model.cfg.max_position} positions"
    )
  return ids.astype(np.int32)


def perplexity(
  model: Model,
  ids: Sequence[int],
  *,
  cache: str = "sink",
  n_sink: int | None = None,
  window: int | None = None,
  chunk: int = 256,
  every: int = 1,
  progress: bool = False,
) -> Perplexity:
  """Perplexity of ids [N] under `cache` (see the module docstring); n_sink defaults to 4 for
  cache="sink" (other modes keep none).

  dense, window and sink feed `chunk` tokens per forward: their caches evict per token inside
  a chunk, so the result equals feeding one token at a time (chunk=1, one decode step each).
  recompute scores the first min(window, N - 1) tokens in one causal pass and after that every
  `every`-th token (each needs its own forward over its window); `Perplexity.positions` says
  which tokens were scored."""
  if n_sink is None:
    n_sink = 4 if cache == "sink" else 0
  ids = _check(model, ids, cache, n_sink, window)
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"chunk must be an int >= 1; got {chunk!r}")
  if not isinstance(every, int) or every < 1:
    raise ValueError(f"every must be an int >= 1; got {every!r}")
  if every > 1 and cache != "recompute":
    raise ValueError(
      f"every={every} applies to cache='recompute' only: {cache!r} scores every token at no "
      "extra cost"
    )
  if cache == "recompute":
    return _recompute(model, ids, window, every, progress)
  cfg = model.cfg
  if cache == "dense":
    kv = KVCache.init(**cfg.cache_dims, batch=1, size=steps.bucket(len(ids)), dtype=model.dtype)
  else:
    kv = SinkCache.init(**cfg.cache_dims, batch=1, n_sink=n_sink, window=window, dtype=model.dtype)
  inputs, targets = ids[:-1], ids[1:]
  n = len(inputs)
  chunk = min(chunk, n)
  pad = -n % chunk
  inputs, targets = np.pad(inputs, (0, pad)), np.pad(targets, (0, pad))
  nll, seconds = [], 0.0
  bar = _bar(progress, n, cache)
  for lo in range(0, n + pad, chunk):
    (part, kv), part_s, _ = steps.timed(
      model,
      steps.nll_chunk,
      kv,
      jnp.asarray(inputs[None, lo : lo + chunk]),
      jnp.asarray(targets[None, lo : lo + chunk]),
      jnp.asarray([min(chunk, n - lo)], jnp.int32),
    )
    seconds += part_s
    nll.append(np.asarray(part[0]))
    bar.update(min(chunk, n - lo))
  bar.close()
  nll = np.concatenate(nll)[:n]
  check_finite(model, [not np.isfinite(nll).all()], f"perplexity with the {cache} cache")
  peak = n if cache == "dense" else min(n, kv.size)
  return Perplexity(
    ppl=float(np.exp(nll.mean())),
    tokens=n,
    peak_cache_tokens=int(peak),
    ms_per_token=1e3 * seconds / n,
    nll=nll,
    positions=np.arange(1, n + 1),
  )


def _recompute(
  model: Model, ids: np.ndarray, window: int, every: int, progress: bool, batch: int = 16
) -> Perplexity:
  """Token i is predicted from ids[max(0, i - window): i] recomputed at positions from 0."""
  n = len(ids) - 1
  W = min(window, n)
  head, seconds, _ = steps.timed(
    model, steps.nll, jnp.asarray(ids[None, :W]), jnp.asarray(ids[None, 1 : W + 1])
  )
  nll = [np.asarray(head[0])]  # tokens 1..W from one causal pass
  starts = np.arange(1, n - W + 1, every)  # window [s, s + W) predicts token s + W
  bar = _bar(progress, W + len(starts), "recompute")
  bar.update(W)
  for lo in range(0, len(starts), batch):
    s = starts[lo : lo + batch]
    pad = batch - len(s)
    rows = np.stack([ids[a : a + W] for a in s] + [ids[:W]] * pad)
    targets = np.concatenate([ids[s + W], np.zeros(pad, np.int32)])
    part, part_s, _ = steps.timed(
      model, steps.nll, jnp.asarray(rows), jnp.asarray(targets), last=True
    )
    nll.append(np.asarray(part)[: len(s)])
    seconds += part_s
    bar.update(len(s))
  bar.close()
  nll = np.concatenate(nll)
  check_finite(model, [not np.isfinite(nll).all()], "perplexity with recompute")
  return Perplexity(
    ppl=float(np.exp(nll.mean())),
    tokens=len(nll),
    peak_cache_tokens=W,
    ms_per_token=1e3 * seconds / len(nll),
    nll=nll,
    positions=np.concatenate([np.arange(1, W + 1), starts + W]),
  )


def _bar(enabled: bool, total: int, mode: str):
  from tqdm import tqdm

  return tqdm(
    total=total, desc=f"ppl ({mode})", unit="tok", disable=not enabled, dynamic_ncols=True
  )
