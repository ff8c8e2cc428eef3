"""The sink-aware rolling attention kernel against its XLA reference, in interpret mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from kvjax.cache.sink import SinkCache
from kvjax.lm import steps, tiny
from kvjax.pallas_kernels import rope, splits
from kvjax.pallas_kernels import sink_attention as kernel
from kvjax.pallas_kernels.sink_attention import reference, sink_attention
from kvjax.pallas_kernels.splits import NEG

MODES = {"interpret": True, "tpu-interpret": pltpu.InterpretParams()}


def states(n_sink, W, B, rng):
  """B rows at different fills: empty, partly filled sinks, odd fills, many wraps, and a
  per-turn make_room that left free slots (start beyond count - W)."""
  counts = [
    0,
    max(n_sink - 1, 0),
    n_sink + 3,
    n_sink + W - 1,
    n_sink + 5 * W + 3,
    n_sink + 7 * W + W // 2,
  ][:B]
  counts += list(rng.integers(0, n_sink + 9 * W, B - len(counts)))
  starts = []
  for c in counts:
    lo = max(n_sink, c - W)
    starts.append(int(rng.integers(lo, max(lo, c) + 1)))  # make_room may move start up to count
  return jnp.asarray(counts, jnp.int32), jnp.asarray(starts, jnp.int32)


def inputs(B, T, N, K, H, n_sink, W, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, T, N, H))
  k = rng.standard_normal((B, K, n_sink + W, H))
  v = rng.standard_normal((B, K, n_sink + W, H))
  count, start = states(n_sink, W, B, rng)
  cast = lambda x: jnp.asarray(x, dtype)
  return cast(q), cast(k), cast(v), count, start


CASES = [  # B, T, N, K, H, n_sink, W, window, softcap
  (6, 1, 4, 4, 16, 4, 20, 0, None),  # decode, MHA
  (6, 1, 8, 2, 16, 4, 21, 0, None),  # GQA 4:1, odd window
  (6, 3, 4, 1, 32, 2, 13, 0, None),  # a chunk of 3 (evicts within it), MQA
  (6, 1, 4, 2, 16, 0, 24, 0, None),  # no sinks
  (6, 2, 4, 2, 16, 4, 20, 7, 50.0),  # sliding-window layer, softcap
  (2, 1, 2, 1, 16, 12, 9, 0, None),  # more sinks than a key block
]


def run(q, k, v, count, start, **kw):
  """sink_attention under jit (the interpreter then compiles once rather than op by op)."""
  return jax.jit(functools.partial(sink_attention, **kw))(q, k, v, count, start)


@functools.cache
def case_data(case):
  """The inputs, keyword arguments and reference result of a case (shared by both modes)."""
  B, T, N, K, H, n_sink, W, window, softcap = case
  args = inputs(B, T, N, K, H, n_sink, W, jnp.float32)
  kw = dict(
    n_sink=n_sink, freq=jnp.asarray(rope_freq(H)), scale=H**-0.5, window=window, softcap=softcap
  )
  return args, kw, run(*args, impl="xla", **kw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}N{}K{}H{}s{}W{}w{}c{}".format(*c))
def test_kernel_equals_reference(case, mode):
  args, kw, (want_o, want_lse) = case_data(case)
  got_o, got_lse = run(*args, impl="pallas", interpret=MODES[mode], block=8, **kw)
  np.testing.assert_allclose(got_o, want_o, atol=2e-5)
  np.testing.assert_allclose(got_lse, want_lse, atol=2e-5, rtol=1e-6)
  empty = np.asarray(args[3]) == 0
  assert (np.asarray(want_lse)[empty] == np.float32(NEG)).all()  # an empty row sees nothing
  assert (np.asarray(want_lse)[~empty] > NEG).any()


@pytest.mark.parametrize("mode", MODES)
def test_long_cache(mode):
  """A long, odd-sized cache (4 sinks + a ring of 8201: S = 8205 > 8192, H = 128, GQA 2:1)
  with the default blocks: 17 key splits per (row, kv head), the last one past S."""
  B, T, N, K, H, n_sink, W = 2, 1, 4, 2, 128, 4, 8201
  q, k, v, count, start = inputs(B, T, N, K, H, n_sink, W, jnp.float32, seed=4)
  kw = dict(n_sink=n_sink, freq=jnp.asarray(rope_freq(H)), scale=H**-0.5)
  want_o, want_lse = run(q, k, v, count, start, impl="xla", **kw)
  got_o, got_lse = run(q, k, v, count, start, impl="pallas", interpret=MODES[mode], **kw)
  np.testing.assert_allclose(got_o, want_o, atol=2e-5)
  np.testing.assert_allclose(got_lse, want_lse, atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16(mode):
  q, k, v, count, start = inputs(6, 1, 8, 2, 32, 4, 20, jnp.bfloat16, seed=1)
  kw = dict(n_sink=4, freq=jnp.asarray(rope_freq(32)), scale=32**-0.5)
  want_o, want_lse = jax.jit(functools.partial(reference, **kw))(q, k, v, count, start)
  got_o, got_lse = run(q, k, v, count, start, impl="pallas", interpret=MODES[mode], block=8, **kw)
  assert got_o.dtype == jnp.float32
  np.testing.assert_allclose(got_o, want_o, atol=3e-2)
  np.testing.assert_allclose(got_lse, want_lse, atol=3e-2)


def test_reference_equals_attention_over_the_repositioned_cache():
  """The reference against a direct construction: gather the kept tokens in stream order,
  rotate at positions 0..n-1 and attend with the last query at position n (decode)."""
  n_sink, W, H = 3, 7, 16
  q, k, v, count, start = inputs(4, 1, 2, 1, H, n_sink, W, jnp.float32, seed=2)
  freq = jnp.asarray(rope_freq(H))
  o, lse = jax.jit(functools.partial(reference, n_sink=n_sink, scale=0.25))(
    q, k, v, count, start, freq=freq
  )
  q, k, v, freq = (np.asarray(x, np.float64) for x in (q, k, v, freq))
  for b in range(1, 4):
    c, s = int(count[b]), int(start[b])
    toks = list(range(min(c, n_sink))) + list(range(max(s, c - W + 1), c))
    slots = [t if t < n_sink else n_sink + (t - n_sink) % W for t in toks]
    kk = np_rope(k[b, 0, slots], np.arange(len(slots)), freq)  # [n, H]
    qq = np_rope(q[b, :, 0], np.array([len(slots)]), freq)[0]  # [H]
    sc = kk @ qq * 0.25
    np.testing.assert_allclose(lse[b, 0, 0], np.log(np.exp(sc).sum()), atol=1e-5)
    np.testing.assert_allclose(
      o[b, 0, 0], np.exp(sc) @ v[b, 0, slots] / np.exp(sc).sum(), atol=1e-5
    )


def np_rope(x, pos, freq):
  """x [n, H] rotated by pos [n] (rotate-half layout), in numpy."""
  a = pos[:, None] * freq[None]
  x1, x2 = np.split(x, 2, axis=-1)
  return np.concatenate([x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)], -1)


def test_model_decodes_through_the_kernel(monkeypatch):
  """The decoder reaches the kernel through the dispatch: the same logits through eviction."""
  model = tiny.model(n_layers=2)
  cfg = model.cfg
  toks = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 14)), jnp.int32)

  def run():  # traced afresh, so it picks up the patched dispatch
    step = jax.jit(lambda state, cache, t: steps.decode_step(model.graphdef, state, cache, t))
    cache = SinkCache.init(
      n_layers=cfg.n_layers,
      batch=2,
      n_sink=2,
      window=5,
      n_kv_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim,
    )
    out = []
    for t in range(toks.shape[1]):
      logits, cache = step(model.state, cache, toks[:, t])
      out.append(logits)
    return np.stack(out)

  want = run()
  monkeypatch.setattr(
    kernel, "sink_attention", functools.partial(sink_attention, impl="pallas", interpret=True)
  )
  np.testing.assert_allclose(run(), want, atol=2e-5)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("shape", [(2, 1, 8, 2, 64, 4, 252), (1, 3, 32, 8, 128, 4, 1020)])
def test_kernel_lowers_for_the_device(platform, shape):
  """The kernel lowers to Mosaic TPU and to Triton from this CPU machine (jax.export; the
  device compiler itself runs only on the device)."""
  B, T, N, K, H, n_sink, W = shape
  q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((B, K, n_sink + W, H), jnp.bfloat16)
  rows = jax.ShapeDtypeStruct((B,), jnp.int32)
  fn = functools.partial(
    kernel._pallas,
    n_sink=n_sink,
    freq=jnp.ones(H // 2),
    scale=0.1,
    window=jnp.int32(0),
    softcap=None,
    launch=splits.Launch(tpu=platform == "tpu", interpret=False, block=128, steps=kernel.STEPS),
  )
  triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  offsets = jax.ShapeDtypeStruct((B, T), jnp.int32)
  exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=[triton])(
    q, k, k, rows, rows, offsets
  )
  assert ("tpu_custom_call" if platform == "tpu" else "xla.gpu.triton") in exported.mlir_module()


def test_errors():
  q, k, v, count, start = inputs(2, 1, 4, 2, 16, 2, 6, jnp.float32)
  kw = dict(n_sink=2, freq=jnp.asarray(rope_freq(16)), scale=0.25)
  with pytest.raises(ValueError, match="multiple of K"):
    sink_attention(q[:, :, :3], k, v, count, start, **kw)
  with pytest.raises(ValueError, match=r"n_sink must be an int in \[0, S=8\)"):
    sink_attention(q, k, v, count, start, **{**kw, "n_sink": 8})
  with pytest.raises(ValueError, match=r"count must be an int array of shape \(2,\)"):
    sink_attention(q, k, v, count[:1], start, **kw)
  with pytest.raises(ValueError, match="impl must be one of"):
    sink_attention(q, k, v, count, start, impl="triton", **kw)
  with pytest.raises(ValueError, match=r"freq must be \[H/2\]"):
    sink_attention(q, k, v, count, start, **{**kw, "freq": jnp.ones(16)})
  with pytest.raises(ValueError, match=r"offsets must be an int array of shape \(2, 1\)"):
    sink_attention(q, k, v, count, start, **kw, offsets=jnp.zeros((2, 2), jnp.int32))


def rope_freq(H):
  return 1.0 / (10000.0 ** (np.arange(0, H, 2, dtype=np.float32) / H))


@pytest.mark.parametrize("case", CASES[:3] + CASES[4:])
def test_reference_with_precomputed_tables(case):
  """The decoder computes the keys' RoPE tables once per forward at `key_positions` and
  hands them to every layer: the reference with them equals the reference computing its own."""
  B, T, N, K, H, n_sink, W, window, softcap = case
  q, k, v, count, start = inputs(B, T, N, K, H, n_sink, W, jnp.float32, seed=5)
  kw = dict(n_sink=n_sink, freq=rope_freq(H), scale=H**-0.5, window=window, softcap=softcap)
  rotation = rope.tables(kernel.key_positions(count, start, n_sink, n_sink + W), rope_freq(H))
  want = reference(q, k, v, count, start, **kw)
  got = sink_attention(q, k, v, count, start, **kw, rotation=rotation)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)


TREE = [0, 1, 1, 2, 2, 2, 3]  # a draft tree's node depths: several queries share a stream offset


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4], CASES[5]])
def test_query_offsets_read_as_the_queries_at_those_stream_indices(case):
  """Queries at stream offsets t (a draft tree's depths) read the cache exactly as the query
  at offset t of a plain chunk does: the reference with offsets, column by column, equals the
  reference over a chunk of max(t) + 1 queries at the matching columns."""
  B, _, N, K, H, n_sink, W, window, softcap = case
  offsets = jnp.asarray([TREE[::-1] if b % 2 else TREE for b in range(B)], jnp.int32)
  T = offsets.shape[1]
  q, k, v, count, start = inputs(B, T, N, K, H, n_sink, W, jnp.float32, seed=6)
  kw = dict(n_sink=n_sink, freq=rope_freq(H), scale=H**-0.5, window=window, softcap=softcap)
  got_o, got_lse = reference(q, k, v, count, start, **kw, offsets=offsets)
  rows = jnp.arange(B)[:, None]
  for t in range(T):
    # a chunk whose query at offset offsets[b, t] is q[b, t]
    chunk = jnp.zeros((B, max(TREE) + 1, N, H)).at[rows[:, 0], offsets[:, t]].set(q[:, t])
    o, lse = reference(chunk, k, v, count, start, **kw)
    np.testing.assert_allclose(got_o[:, t], o[rows[:, 0], offsets[:, t]], atol=1e-6)
    np.testing.assert_allclose(got_lse[:, t], lse[rows[:, 0], offsets[:, t]], atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[5]])
def test_kernel_with_offsets_equals_reference(case, mode):
  B, _, N, K, H, n_sink, W, window, softcap = case
  offsets = jnp.asarray([TREE[::-1] if b % 2 else TREE for b in range(B)], jnp.int32)
  q, k, v, count, start = inputs(B, offsets.shape[1], N, K, H, n_sink, W, jnp.float32, seed=7)
  kw = dict(
    n_sink=n_sink, freq=jnp.asarray(rope_freq(H)), scale=H**-0.5, window=window, softcap=softcap
  )
  want_o, want_lse = reference(q, k, v, count, start, **kw, offsets=offsets)
  f = jax.jit(
    functools.partial(sink_attention, impl="pallas", interpret=MODES[mode], block=8, **kw)
  )
  got_o, got_lse = f(q, k, v, count, start, offsets=offsets)
  np.testing.assert_allclose(got_o, want_o, atol=2e-5)
  np.testing.assert_allclose(got_lse, want_lse, atol=2e-5, rtol=1e-6)
