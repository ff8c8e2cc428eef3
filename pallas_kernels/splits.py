"""Flash decoding's pieces shared by the kernels and by `kvjax.lm.attention`: the
online-softmax step a program runs per key block, its finish, and the merge of the key splits'
partial softmaxes; and what the kernels' dispatches share: the choice of path (`launch`), the
grid call with its layout, and the references' one softmax.

A kernel whose grid splits a row's keys into C chunks (so one long cache feeds many programs)
leaves per chunk a normalized output and its log-sum-exp; the merge is a few XLA ops over
[..., C, R] values, nothing of the size of the cache.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from kvjax.pallas_kernels.precision import einsum_f32

NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked query gives no NaN
IMPLS = ("pallas", "xla")


@dataclasses.dataclass(frozen=True)
class Launch:
  """How a split kernel runs. tpu: lower for Mosaic TPU (scalars in SMEM), else for Triton
  (Pallas' Mosaic GPU backend is not targeted). interpret: False on a device; off-device True
  (generic interpreter) or `pltpu.InterpretParams()` (TPU semantics). block: key slots per
  block (rounded down to a power of two <= S); steps: key blocks per program."""

  tpu: bool
  interpret: Any
  block: int
  steps: int


def launch(impl: str | None, interpret, block: int, steps: int) -> Launch | None:
  """A kernel dispatch's path: None for the plain-XLA reference, else how the Pallas kernel
  runs. impl: "pallas" or "xla"; None picks Pallas on GPU/TPU, else XLA."""
  if impl is None:
    impl = "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS} or None; got {impl!r}")
  if impl == "xla":
    return None
  tpu = jax.default_backend() == "tpu" or isinstance(interpret, pltpu.InterpretParams)
  return Launch(tpu=tpu, interpret=interpret, block=block, steps=steps)


def softmax(
  s: jax.Array, vis: jax.Array, *, scale: float, softcap: float | None
) -> tuple[jax.Array, jax.Array]:
  """A reference's whole softmax over the last axis: s [B, K, G, T, n] raw scores (scaled and
  soft-capped here), vis bool broadcastable to s -> (probabilities [B, K, G, T, n] float32, 0
  where not visible; lse [B, T, K G] float32, NEG for a query that sees no key)."""
  s = s * scale
  if softcap is not None:
    s = jnp.tanh(s / softcap) * softcap
  s = jnp.where(vis, s, NEG)
  m = s.max(-1, keepdims=True)
  e = jnp.where(vis, jnp.exp(s - m), 0.0)
  l = e.sum(-1, keepdims=True)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), NEG)[..., 0]  # [B, K, G, T]
  B, K, G, T = lse.shape
  return e / jnp.where(l > 0, l, 1.0), lse.transpose(0, 3, 1, 2).reshape(B, T, K * G)


def online_step(
  carry,
  s: jax.Array,
  vis: jax.Array | None,
  vals: jax.Array,
  *,
  scale: float,
  softcap: float | None,
  values: str | None = None,
  drop: tuple[float, jax.Array] | None = None,
):
  """One online-softmax step over a block of n keys: a kernel program's per key block, or one
  step of `kvjax.lm.attention`'s blocked XLA attention.

  carry: (m, l [..., R, 1], acc [..., R, H]) float32 (`start`); s: [..., R, n] raw scores
  (scaled and soft-capped here); vis: bool broadcastable to s, or None when every query sees
  every key. vals: with values=None (inside a kernel) [n, H], zeroed where not visible (free
  slots may hold any bits), and s [R, n]; else any operand of the einsum `values`
  (probabilities, vals) -> [..., R, H]. drop: (rate, key) drops each probability that weights
  the values (the kept ones scaled by 1 / (1 - rate); l sums the undropped ones), or None."""
  m, l, acc = carry
  s = s * scale
  if softcap is not None:
    s = jnp.tanh(s / softcap) * softcap
  if vis is not None:
    s = jnp.where(vis, s, NEG)
  m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
  e = jnp.exp(s - m_new)
  if vis is not None:
    e = jnp.where(vis, e, 0.0)
  alpha = jnp.exp(m - m_new)
  acc = alpha * acc
  p = e
  if drop is not None:
    rate, key = drop
    p = jnp.where(jax.random.bernoulli(key, 1.0 - rate, e.shape), e / (1.0 - rate), 0.0)
  if values is None:
    acc = acc + jnp.dot(p.astype(vals.dtype), vals, preferred_element_type=jnp.float32)
  else:
    acc = acc + einsum_f32(values, p.astype(vals.dtype), vals)
  return m_new, alpha * l + e.sum(axis=-1, keepdims=True), acc


def start(rows: int | tuple[int, ...], H: int):
  """The carry of query rows (R, or a shape [..., R]) that have seen no key yet."""
  rows = (rows,) if isinstance(rows, int) else tuple(rows)
  f32 = jnp.float32
  return jnp.full((*rows, 1), NEG, f32), jnp.zeros((*rows, 1), f32), jnp.zeros((*rows, H), f32)


def finish(carry) -> tuple[jax.Array, jax.Array]:
  """(o [..., R, H], lse [..., R, 1]) of a carry: 0 and NEG for a row that saw no key."""
  m, l, acc = carry
  has = l > 0
  safe = jnp.where(has, l, 1.0)
  return acc / safe, jnp.where(has, m + jnp.log(safe), NEG)


def combine(carry):
  """The carry of the union of C disjoint key sets from their carries stacked on axis -3:
  (m, l [..., C, R, 1], acc [..., C, R, H]) -> (m, l [..., R, 1], acc [..., R, H])."""
  m, l, acc = carry
  m_all = m.max(axis=-3)
  w = jnp.exp(m - jnp.expand_dims(m_all, -3))  # [..., C, R, 1]
  return m_all, (w * l).sum(axis=-3), (w * acc).sum(axis=-3)


def merge(o: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """o [..., C, R, H] float32 (each split's softmax-weighted values, 0 when it saw no key),
  lse [..., C, R, 1] (NEG when it saw none) -> (o [..., R, H], lse [..., R, 1]) of the union."""
  return finish(combine(carry_of(o, lse)))


def carry_of(o: jax.Array, lse: jax.Array):
  """The carry (m, l, acc) of a finished softmax o [..., R, H], lse [..., R, 1] (NEG for a row
  that saw no key), with m = lse: l is 1, or 0 (and acc 0) for a row that saw none."""
  seen = (lse > NEG / 2).astype(jnp.float32)
  return lse, seen, o * seen


class Layout(NamedTuple):
  """The layout of a split kernel for q [B, T, N, H] over k [B, K, S, H]. Each kv head's G =
  N / K query heads x T queries make R = G Tp query rows, Tp a power of two >= 16 (Triton's
  dot needs >= 16 rows, TPU tiles 8); keys come in blocks of bs slots, chunks of `steps`
  blocks per program, n_split programs per (row, kv head) (`split_sizes`)."""

  B: int
  T: int
  N: int
  H: int
  K: int
  S: int
  G: int
  Tp: int
  R: int
  bs: int
  chunk: int
  n_split: int


def sizes(q: jax.Array, k: jax.Array, block: int, steps: int) -> Layout:
  """The `Layout` of a split kernel for q over k, key blocks of at most `block` slots."""
  B, T, N, H = q.shape
  K, S = k.shape[1], k.shape[2]
  G = N // K
  Tp = max(16, pl.next_power_of_2(T))
  return Layout(B, T, N, H, K, S, G, Tp, G * Tp, *split_sizes(S, block, steps))


def pack_queries(q: jax.Array, K: int, Tp: int) -> jax.Array:
  """q [B, T, N, H] -> [B, K, G Tp, H]: each kv head's query rows, T padded to Tp (the
  inverse of `unpack`)."""
  B, T, N, H = q.shape
  qr = q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  return jnp.pad(qr, ((0, 0), (0, 0), (0, 0), (0, Tp - T), (0, 0))).reshape(B, K, -1, H)


def split_sizes(S: int, block: int, steps: int) -> tuple[int, int, int]:
  """(bs, chunk, n_split) for S keys: key blocks of bs slots (a power of two <= min(block, S)),
  `steps` of them per program (fewer when S is short), n_split programs per (row, kv head)."""
  bs = 1 << (min(block, S).bit_length() - 1)
  chunk = bs * max(1, min(steps, -(-S // bs)))
  return bs, chunk, -(-S // chunk)


def cdiv_pow2(x, d: int):
  """ceil(x / d) for a power of two d, as shifts (traced ints; negative x gives <= 0)."""
  return (x + d - 1) >> (d.bit_length() - 1)


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [m, H] . b [n, H] -> [m, n] float32 (a kernel's scores: b not transposed in memory)."""
  return jax.lax.dot_general(
    a, b, dimension_numbers=(((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
  )


def kv_spec(layout: Layout) -> pl.BlockSpec:
  """The block of a [B, K, S, H] cache operand that program (b, h, c) reads: its chunk of
  `layout.chunk` slots of row b, kv head h, in place."""
  return pl.BlockSpec((None, None, layout.chunk, layout.H), lambda b, h, c: (b, h, c, 0))


def call(
  kernel: Callable,
  operands: Sequence[jax.Array],
  in_specs: list,
  layout: Layout,
  launch: Launch,
  *,
  cost,
  name: str,
) -> tuple[jax.Array, jax.Array]:
  """Runs a split kernel over the grid (B, K, n_split) (row, kv head, key split; all parallel)
  and merges its splits. operands[0] is the per-row scalar table [B, C] int32 (in SMEM on TPU;
  its spec is added here), in_specs are the other operands'. Each program writes the
  normalized o [R, H] and lse [R, 1] of its chunk. Returns o [B, T, N, H], lse [B, T, N]
  float32 over every key (`unpack`)."""
  B, K, C, R, H = layout.B, layout.K, layout.n_split, layout.R, layout.H
  meta = operands[0]
  meta_spec = (
    pl.BlockSpec(memory_space=pltpu.SMEM)
    if launch.tpu
    else pl.BlockSpec(meta.shape, lambda b, h, c: (0, 0))
  )

  def out_spec(n):
    return pl.BlockSpec((None, None, None, R, n), lambda b, h, c: (b, h, c, 0, 0))

  o, lse = pl.pallas_call(
    kernel,
    grid=(B, K, C),
    in_specs=[meta_spec, *in_specs],
    out_specs=[out_spec(H), out_spec(1)],
    out_shape=[
      jax.ShapeDtypeStruct((B, K, C, R, H), jnp.float32),
      jax.ShapeDtypeStruct((B, K, C, R, 1), jnp.float32),
    ],
    interpret=launch.interpret,
    compiler_params=(
      pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)
      if launch.tpu
      else pltriton.CompilerParams(num_warps=4, num_stages=2)
    ),
    cost_estimate=cost,
    name=name,
  )(*operands)
  return unpack(*merge(o, lse), layout.G, layout.T)


def unpack(o: jax.Array, lse: jax.Array, G: int, T: int) -> tuple[jax.Array, jax.Array]:
  """o [B, K, G Tp, H], lse [B, K, G Tp, 1] (each kv head's G query heads x T queries padded
  to Tp, as the kernels lay out their rows) -> o [B, T, N, H], lse [B, T, N] (N = K G)."""
  B, K, R, H = o.shape
  Tp = R // G
  o = o.reshape(B, K, G, Tp, H)[:, :, :, :T].transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, H)
  lse = lse.reshape(B, K, G, Tp)[..., :T].transpose(0, 3, 1, 2).reshape(B, T, K * G)
  return o, lse
