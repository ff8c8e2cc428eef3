"""StreamingLLM cache: attention sinks plus a rolling window, keys stored before RoPE.

Layout, per layer and row: slots [0, n_sink) hold the stream's first n_sink tokens for good;
slots [n_sink, n_sink + W) are a ring in which stream token i >= n_sink lives at slot
n_sink + (i - n_sink) % W. `count` tokens have been written; the window keeps stream tokens
[start, count) (n_sink <= start, count - start <= W). Shapes never change: a write scatters into
the ring and never reallocates.

Positions are assigned inside the cache at read time, not taken from the text: the sinks are
0..n_sink-1, the kept window follows in order, so a cache holding tokens [0,1,2,3,6,7,8] decodes
token 9 at position 7. Keys are rotated when read, so a token's key gets a new position every
time the window moves.

Eviction: a token written when the window is full replaces the oldest one (per-token policy:
every token sees the sinks and the W - 1 tokens before it, as in the paper's streaming
perplexity; a chunk of new tokens evicts as it goes, so chunked prefill equals feeding the
tokens one by one). `make_room(n)` evicts up front so the next n tokens fit without eviction
(per-turn policy, the paper's chat demo: room for a prompt and its reply budget at once).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.cache.dense import LAYOUT, StackedSlots, scatter_slots
from kvjax.cache.view import NEW, Keys, View
from kvjax.pallas_kernels import sink_attention as kernel

WINDOW_FRAME, SINK_FRAME = 0, 1


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["k", "v", "count", "start"], meta_fields=["n_sink"]
)
@dataclasses.dataclass
class SinkCache(StackedSlots):
  """k, v: [L, B, K, n_sink + W, H] keys before RoPE, values; count, start: [B] int32."""

  AXES: ClassVar[dict[str, tuple[str, ...]]] = {
    "k": LAYOUT,
    "v": LAYOUT,
    "count": ("batch",),
    "start": ("batch",),
  }

  k: jax.Array
  v: jax.Array
  count: jax.Array
  start: jax.Array
  n_sink: int

  @classmethod
  def init(
    cls,
    *,
    n_layers: int,
    batch: int,
    n_sink: int,
    window: int,
    n_kv_heads: int,
    head_dim: int,
    dtype=jnp.float32,
  ) -> SinkCache:
    """An empty cache: n_sink >= 0 sink slots and a window of W >= 1 slots."""
    if not isinstance(n_sink, int) or n_sink < 0:
      raise ValueError(f"n_sink must be an int >= 0; got {n_sink!r}")
    if not isinstance(window, int) or window < 1:
      raise ValueError(f"window must be an int >= 1; got {window!r}")
    shape = (n_layers, batch, n_kv_heads, n_sink + window, head_dim)
    return cls(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      count=jnp.zeros((batch,), jnp.int32),
      start=jnp.full((batch,), n_sink, jnp.int32),
      n_sink=n_sink,
    )

  @property
  def window(self) -> int:
    return self.size - self.n_sink

  @property
  def length(self) -> jax.Array:
    """[B] tokens held (kept sinks + kept window)."""
    return jnp.minimum(self.count, self.n_sink) + jnp.maximum(self.count - self.start, 0)

  def make_room(self, n) -> SinkCache:
    """Evicts the oldest window tokens so that n more tokens (int or [B], at most W) fit
    without evicting: the per-turn policy. Sinks stay."""
    if isinstance(n, int) and not 0 <= n <= self.window:
      raise ValueError(f"make_room({n}): a turn must fit the window of {self.window} tokens")
    n = jnp.clip(jnp.asarray(n, jnp.int32), 0, self.window)
    return dataclasses.replace(self, start=jnp.maximum(self.start, self.count + n - self.window))

  def view(self, T: int, positions: jax.Array | None = None, mask: jax.Array | None = None) -> View:
    """How T new tokens attend under the per-token policy (see the module docstring).

    Query j (stream index i = count + j) sees the kept sinks, the window tokens in
    [max(start, i - W + 1), i) and the new tokens before it; its in-cache position is p = i
    for a sink, else n_sink + i - max(start, i - W + 1). The cache's slots are read by
    `kvjax.pallas_kernels.sink_attention` (keys rotated at read). The new tokens are blocks in
    two query frames: window tokens in stream offsets i - base (base is one per row; they equal
    in-cache positions when T == 1), new sinks in in-cache positions p."""
    if positions is not None or mask is not None:
      raise ValueError(
        "a SinkCache assigns positions inside the cache itself; call without `positions` and `mask`"
      )
    j = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (self.batch, T))
    return self._view(j, None)

  def tree_view(self, offsets: jax.Array, tree: jax.Array) -> View:
    """How the T nodes of a draft tree attend (EAGLE verification over a sink cache): node t
    of row b is stream token count + offsets[b, t] (its depth under a root at offset 0) and
    reads the cache as that token would under the per-token policy (the same sinks and
    window, at the same in-cache position), and among the nodes only those tree[b, t]
    marks (its ancestors and itself). offsets: [B, T] int32; tree: [B, T, T] bool. Nothing
    is written: the accepted path is stored afterwards with `write`, in stream order."""
    B, T = offsets.shape
    if tree.shape != (B, T, T) or tree.dtype != jnp.bool_:
      raise ValueError(
        f"tree must be bool [B, T, T] = {(B, T, T)} for offsets {(B, T)}; got "
        f"{tree.dtype} {tuple(tree.shape)}"
      )
    return self._view(jnp.asarray(offsets, jnp.int32), tree)

  def _view(self, j: jax.Array, tree: jax.Array | None) -> View:
    """The view of new tokens at stream offsets j [B, T] from count, seeing each other
    causally (tree None) or as tree [B, T, T] says."""
    n_s, W = self.n_sink, self.window
    # [B, T] stream index, oldest window token seen, in-cache position, window-frame position
    i, first, p, win_pos, _ = kernel.query_positions(
      j, self.count[:, None], self.start[:, None], n_s, W
    )
    key_i = i[:, None, :]  # [B, 1, T] stream index of each key
    ones = jnp.ones((1, j.shape[1]), bool)
    seen = (key_i >= n_s) & (key_i >= first[:, :, None])
    blocks = [
      Keys(
        NEW,
        WINDOW_FRAME,
        ones,
        i,
        i,
        causal=tree is None,
        mask=seen if tree is None else seen & tree,
      )
    ]
    if n_s:  # new tokens that become sinks; only while count < n_sink, when base == 0
      blocks.append(Keys(NEW, SINK_FRAME, i < n_s, p, i, causal=tree is None, mask=tree))
    read = functools.partial(
      kernel.sink_attention, count=self.count, start=self.start, n_sink=n_s, offsets=j
    )
    return View(
      q_pos=(win_pos, p),
      new_pos=win_pos,
      blocks=tuple(blocks),
      rotated=False,
      cache_read=read,
      key_pos=kernel.key_positions(self.count, self.start, n_s, self.size),
    )

  def write(
    self,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    n_new: jax.Array,
    layers: tuple[int, int] | None = None,
    advance: bool = True,
  ) -> SinkCache:
    """Stores the first n_new[b] of T new tokens per row (keys before RoPE; `positions` is
    ignored: positions are assigned at read time), evicting per token.

    k, v: [L', B, K, T, H] for the layers `layers` = [start, stop) (all when None). Of a chunk
    longer than the window only its last W window tokens are stored (the rest would be
    evicted within the chunk). With advance=False count and start stay, so a write for other
    layers of the same tokens lands in the same slots."""
    lo, hi = layers or (0, self.k.shape[0])
    T = k.shape[3]
    n_s, W = self.n_sink, self.window
    i = self.count[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    end = (self.count + n_new)[:, None]
    keep = (i < end) & ((i < n_s) | (i >= end - W))
    slots = jnp.where(i < n_s, i, n_s + jnp.mod(i - n_s, W))
    slots = jnp.where(keep, slots, self.size)  # out of range: dropped
    new_k = scatter_slots(self.k, k, slots, lo, hi)
    new_v = scatter_slots(self.v, v, slots, lo, hi)
    if not advance:
      return dataclasses.replace(self, k=new_k, v=new_v)
    count = self.count + n_new
    return SinkCache(
      k=new_k, v=new_v, count=count, start=jnp.maximum(self.start, count - W), n_sink=n_s
    )
