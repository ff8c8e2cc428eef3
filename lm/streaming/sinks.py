"""Attention-sink diagnostic: how much attention each layer and head puts on a text's first
tokens (StreamingLLM's sinks: a model that forms them gives the first few positions far more
mass than their share, and a rolling window without them collapses).

    from kvjax.lm.streaming import sinks
    report = sinks.attention_mass(model, ids, sink_tokens=4)   # report.mass [L, N]

For every layer l and query head n, mass[l, n] is the attention probability that queries at
positions t >= sink_tokens put on keys 0 .. sink_tokens - 1, averaged over those queries, under
the model's own causal attention over the whole text (its sliding windows and soft-caps
included). `uniform[l]` is what attention spread evenly over the visible keys would give (the
mean of sink_tokens / visible keys), the baseline a sink stands out against.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.lm import rope
from kvjax.lm.decoder import layer_block
from kvjax.lm.model import Model

QUERY_CHUNK = 512  # queries scored at once: scores [N, QUERY_CHUNK, T] per layer


@dataclasses.dataclass
class SinkReport:
  """mass [L, N]: the mean attention mass on the first sink_tokens keys of queries at positions
  >= sink_tokens; uniform [L]: the same under evenly spread attention; tokens: text length."""

  mass: np.ndarray
  uniform: np.ndarray
  tokens: int
  sink_tokens: int

  def to_json(self) -> dict:
    return {
      "tokens": self.tokens,
      "sink_tokens": self.sink_tokens,
      "mass": self.mass.tolist(),
      "mean_by_layer": self.mass.mean(1).tolist(),
      "uniform_by_layer": self.uniform.tolist(),
      "ratio_by_layer": (self.mass.mean(1) / self.uniform).tolist(),
    }


def attention_mass(model: Model, ids: Sequence[int], *, sink_tokens: int = 4) -> SinkReport:
  """The diagnostic over one text of token ids (more than sink_tokens of them, within the
  model's context)."""
  ids = np.asarray(ids)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"ids must be a flat sequence of token ids; got {ids.dtype}{list(ids.shape)}")
  if not isinstance(sink_tokens, int) or isinstance(sink_tokens, bool) or sink_tokens < 1:
    raise ValueError(f"sink_tokens must be an int >= 1; got {sink_tokens!r}")
  T = len(ids)
  if sink_tokens >= T:
    raise ValueError(f"the text has {T} tokens: it needs more than sink_tokens={sink_tokens}")
  if model.cfg.max_position < T:
    raise ValueError(
      f"the text has {T} tokens, more than the model's context of "
      f"{model.cfg.max_position} positions"
    )
  bad = ids[(ids < 0) | (ids >= model.cfg.vocab_size)]
  if bad.size:
    raise ValueError(f"token ids {bad[:5].tolist()} outside [0, {model.cfg.vocab_size})")
  mass = np.asarray(
    _mass(model.graphdef, model.state, jnp.asarray(ids[None], jnp.int32), sink_tokens=sink_tokens)
  )
  visible = np.arange(sink_tokens, T) + 1.0  # keys a query at t sees
  uniform = []
  for window in model.cfg.windows:
    seen = np.minimum(visible, window) if window else visible
    on_sinks = np.clip(sink_tokens - (visible - seen), 0, sink_tokens)
    uniform.append(float(np.mean(on_sinks / seen)))
  return SinkReport(mass=mass, uniform=np.asarray(uniform), tokens=T, sink_tokens=sink_tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "sink_tokens"))
def _mass(graphdef, state, tokens, *, sink_tokens: int):
  """[L, N] float32 (see attention_mass); tokens [1, T]."""
  dec = nnx.merge(graphdef, state)
  cfg = dec.cfg
  out, _ = dec(tokens, logits=False, return_layer_inputs=True)
  T = tokens.shape[1]
  positions = jnp.arange(T, dtype=jnp.int32)[None]
  freqs = jnp.asarray(rope.layer_freqs(cfg))  # [L, H/2]
  G = cfg.n_heads // cfg.n_kv_heads
  t_all = jnp.arange(T)

  def layer(l):
    blk = layer_block(dec.blocks, cfg, l)
    q, k, _ = blk.attn.qkv(blk.attn_norm(out.layer_inputs[l]))
    q = rope.apply(q, positions, freqs[l])[0].astype(jnp.float32)  # [T, N, H]
    k = jnp.repeat(rope.apply(k, positions, freqs[l])[0].astype(jnp.float32), G, axis=1)
    window = jnp.asarray(cfg.windows, jnp.int32)[l]
    total = jnp.zeros((cfg.n_heads,), jnp.float32)
    for t0 in range(sink_tokens, T, QUERY_CHUNK):
      t = t_all[t0 : t0 + QUERY_CHUNK]
      s = jnp.einsum("tnh,snh->nts", q[t0 : t0 + QUERY_CHUNK], k) * cfg.query_scale
      if cfg.attn_softcap is not None:
        s = jnp.tanh(s / cfg.attn_softcap) * cfg.attn_softcap
      sees = (t_all[None] <= t[:, None]) & ((window == 0) | (t[:, None] - t_all[None] < window))
      p = jax.nn.softmax(jnp.where(sees[None], s, -jnp.inf), axis=-1)  # [N, tq, T]
      total = total + p[:, :, :sink_tokens].sum((1, 2))
    return total / (T - sink_tokens)

  return jnp.stack([layer(l) for l in range(cfg.n_layers)])


def heatmap(report: SinkReport, path: str, *, title: str = "") -> None:
  """Writes the [L, N] mass as a PNG heatmap (layers down, heads across)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  L, N = report.mass.shape
  fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.5 * N), 1.2 + 0.35 * L))
  im = ax.imshow(report.mass, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
  ax.set_xlabel("head")
  ax.set_ylabel("layer")
  ax.set_xticks(range(N))
  ax.set_yticks(range(L))
  ax.set_title(
    title or f"attention mass on the first {report.sink_tokens} tokens ({report.tokens} tokens)",
    fontsize=9,
  )
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
