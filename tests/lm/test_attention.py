"""Blocked attention (online softmax over key blocks, query blocks, skipped blocks) equals the
unblocked reference, for every kind of key block a cache hands the decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import lm
from kvjax.cache import KVCache
from kvjax.cache.view import CACHE, NEW, SHARED, Keys, new_keys
from kvjax.lm import attention, tiny
from kvjax.lm.attention import KeyBlock, attend, reference
from kvjax.pallas_kernels.splits import NEG

B, N, K, H = 2, 4, 2, 8


def _arrays(rng, T, S, shared=False, layers=None):
  lead = () if layers is None else (layers,)
  kv = lead + ((K, S, H) if shared else (B, K, S, H))
  return (
    jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32),
    jnp.asarray(rng.standard_normal(kv), jnp.float32),
    jnp.asarray(rng.standard_normal(kv), jnp.float32),
  )


def _run(blocks, **kw):
  """attend with tiny blocks (many loop iterations, overlapping last blocks) vs reference."""
  ref = jax.jit(lambda: reference(blocks, scale=0.3, **kw))()
  got = jax.jit(lambda: attend(blocks, scale=0.3, block_k=5, block_q=3, **kw))()
  return np.asarray(got), np.asarray(ref)


@pytest.mark.parametrize("window", [0, 4])
@pytest.mark.parametrize("T", [1, 7, 16])
def test_cache_block_with_free_slots(T, window):
  """A cache block of 23 slots whose rows hold 9 and 17 tokens (blocks past both are skipped),
  read in place at layer 1 of a stacked [L, B, K, S, H] array, then the new tokens causally."""
  rng = np.random.default_rng(T)
  S = 23
  q, k, v = _arrays(rng, T, S, layers=3)
  _, kn, vn = _arrays(rng, T, T)
  length = jnp.asarray([9, 17])
  pos = jnp.broadcast_to(jnp.arange(S), (B, S))
  positions = length[:, None] + jnp.arange(T)[None]
  cache = Keys(CACHE, 0, pos < length[:, None], positions, pos)
  blocks = [KeyBlock(q, k, v, cache, jnp.int32(1)), KeyBlock(q, kn, vn, new_keys(positions))]
  got, ref = _run(blocks, window=window, softcap=20.0)
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [0, 6])
def test_long_causal_prefill_skips_the_upper_triangle(window):
  """The cache-free prefill of 37 tokens (13 query blocks x 8 key blocks, most skipped)."""
  rng = np.random.default_rng(1)
  T = 37
  q, k, v = _arrays(rng, T, T)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  got, ref = _run([KeyBlock(q, k, v, new_keys(positions))], window=window)
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
  # and the reference is plain softmax attention
  s = jnp.einsum("btkgh,bskh->bkgts", q.reshape(B, T, K, 2, H), k.transpose(0, 2, 1, 3)) * 0.3
  d = positions[:, :, None] - positions[:, None, :]
  vis = (d >= 0) & ((window == 0) | (d < window))
  p = jax.nn.softmax(jnp.where(vis[:, None, None], s, -jnp.inf), -1)
  want = jnp.einsum("bkgts,bskh->btkgh", p, v.transpose(0, 2, 1, 3)).reshape(B, T, N, H)
  np.testing.assert_allclose(ref, want, atol=2e-5, rtol=1e-5)


def test_shared_prefix_explicit_mask_and_partial():
  """A shared prefix block (no batch axis), an explicit mask on the new tokens, and a partial
  softmax from elsewhere merged in; a query that sees nothing gets 0."""
  rng = np.random.default_rng(2)
  T, S0 = 6, 19
  q, k0, v0 = _arrays(rng, T, S0, shared=True, layers=2)
  _, kn, vn = _arrays(rng, T, T)
  positions = S0 + jnp.broadcast_to(jnp.arange(T), (B, T))
  valid = (jnp.arange(S0) < 15)[None]
  shared = Keys(SHARED, 0, valid, positions, jnp.arange(S0)[None])
  tree = jnp.asarray(rng.random((B, T, T)) < 0.5) | jnp.eye(T, dtype=bool)
  own = Keys(NEW, 0, jnp.ones((1, T), bool), positions, positions, mask=tree)
  o = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  lse = jnp.asarray(rng.standard_normal((B, T, N)), jnp.float32).at[0, 0].set(NEG)
  blocks = [KeyBlock(q, k0, v0, shared, jnp.int32(1)), KeyBlock(q, kn, vn, own)]
  got, ref = _run(blocks, partial=(o, lse))
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
  nothing = Keys(NEW, 0, jnp.zeros((1, T), bool), positions, positions)
  got, ref = _run([KeyBlock(q, kn, vn, nothing)])
  assert np.all(got == 0) and np.all(ref == 0)


def test_decoder_with_small_blocks_equals_score(monkeypatch):
  """End to end through the decoder: a 40-token prompt prefilled, then extended by 9 and
  decoded, with 8-slot key blocks and 4-query blocks, equals lm.score (full recompute)."""
  model = tiny.model("gemma2", windows=(6, 0))
  ids = np.random.default_rng(3).integers(2, 258, 52).tolist()
  want = np.asarray(lm.score(model, ids))
  monkeypatch.setattr(attention, "BLOCK_K", 8)
  monkeypatch.setattr(attention, "BLOCK_Q", 4)
  dec = model.decoder
  cache = KVCache.init(n_layers=2, batch=1, size=64, n_kv_heads=2, head_dim=16)
  prefill = jax.jit(lambda c, t: dec(t, cache=c))
  (out, cache) = prefill(cache, jnp.asarray([ids[:40]]))
  np.testing.assert_allclose(out.logits[0], want[:40], atol=1e-4, rtol=1e-4)
  out, cache = jax.jit(lambda c, t: dec(t, cache=c))(cache, jnp.asarray([ids[40:49]]))
  np.testing.assert_allclose(out.logits[0], want[40:49], atol=1e-4, rtol=1e-4)
  out, _ = jax.jit(lambda c, t: dec(t, cache=c))(cache, jnp.asarray([ids[49:50]]))
  np.testing.assert_allclose(out.logits[0, 0], want[49], atol=1e-4, rtol=1e-4)


def test_causal_dispatch_impls_agree():
  """attention.causal, the prefill dispatch: its XLA path and jax.nn.dot_product_attention (the
  cuDNN path on GPU; XLA's version here) equal the reference, GQA 2:1."""
  rng = np.random.default_rng(4)
  T = 21
  q, k, v = _arrays(rng, T, T)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  want = np.asarray(reference([KeyBlock(q, k, v, new_keys(positions))], scale=0.3))
  for impl in ("xla", "cudnn"):
    got = jax.jit(lambda q, k, v, impl=impl: attention.causal(q, k, v, scale=0.3, impl=impl))(
      q, k, v
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="impl must be one of"):
    attention.causal(q, k, v, scale=0.3, impl="triton")


def test_causal_dispatch_lowers_for_tpu():
  """The TPU path (jax.experimental.pallas.ops.tpu.flash_attention, kv heads repeated for its
  MHA kernel) lowers to Mosaic TPU from this CPU machine (jax.export)."""
  from jax import export

  q = jax.ShapeDtypeStruct((1, 256, 8, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 2, 256, 128), jnp.bfloat16)
  fn = jax.jit(lambda q, k, v: attention.causal(q, k, v, scale=0.1, impl="tpu_flash"))
  exported = export.export(fn, platforms=["tpu"])(q, kv, kv)
  assert "tpu_custom_call" in exported.mlir_module()


def test_attention_dropout_is_unbiased_and_keyed():
  """attend(dropout=(rate, key)) drops attention probabilities: a different output per key,
  the same for one key, equal to no dropout at rate 0, and on average (over keys) the
  undropped attention, with tiny blocks (the mask is drawn per query block x key block)."""
  rng = np.random.default_rng(3)
  T = 7
  q, k, v = _arrays(rng, T, T)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  blocks = [KeyBlock(q, k, v, new_keys(positions))]
  run = jax.jit(
    lambda key, rate: attend(blocks, scale=0.3, block_k=5, block_q=3, dropout=(rate, key))
  )
  plain = np.asarray(attend(blocks, scale=0.3, block_k=5, block_q=3))
  a, b = run(jax.random.key(0), 0.3), run(jax.random.key(1), 0.3)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-2
  np.testing.assert_array_equal(a, run(jax.random.key(0), 0.3))
  np.testing.assert_allclose(run(jax.random.key(0), 0.0), plain, atol=1e-6)
  draws = np.stack([np.asarray(run(jax.random.key(i), 0.3)) for i in range(400)])
  err = np.abs(draws.mean(0) - plain) / (draws.std(0) / np.sqrt(len(draws)) + 1e-6)
  assert err.max() < 5.0, err.max()  # within 5 standard errors everywhere: unbiased


def test_decoder_dropout_only_when_asked():
  """Residual + attention dropout change the training forward (per key) and nothing else: a
  forward without it (every inference path) is the plain one."""
  model = tiny.model()
  dec = model.decoder
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 9)))
  plain = np.asarray(dec(tokens)[0].logits)
  drop = lambda seed, r=0.2, a=0.1: np.asarray(
    dec(
      tokens,
      training=attention.Training(r, a, jax.random.key(seed)),
    )[0].logits
  )
  assert np.abs(drop(0) - plain).max() > 1e-3 and np.abs(drop(0) - drop(1)).max() > 1e-3
  np.testing.assert_array_equal(drop(0), drop(0))
  np.testing.assert_allclose(drop(0, 0.0, 0.0), plain, atol=1e-5)
  np.testing.assert_allclose(np.asarray(lm.score(model, np.asarray(tokens))), plain, atol=1e-4)


@pytest.mark.parametrize("one_step", [True, False])
def test_differentiable_attention_has_the_reference_gradient(monkeypatch, one_step):
  """attend(differentiable=True) (the training forward) runs reverse-mode at any length, in
  one step or in static loops over tiny blocks, with the unblocked reference's values and
  gradients; the inference path (dynamic trip counts) cannot be differentiated."""
  if not one_step:
    monkeypatch.setattr(attention, "TRAIN_ONE_STEP", 0)
  rng = np.random.default_rng(5)
  T = 19
  q, k, v = _arrays(rng, T, T)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  seg = jnp.asarray(np.repeat([[1] * 11 + [2] * 8], B, 0))
  mask = seg[:, :, None] == seg[:, None, :]

  def loss(fn, q, k, v, **kw):
    blocks = [KeyBlock(q, k, v, new_keys(positions, mask & jnp.tril(jnp.ones((T, T), bool))))]
    return jnp.sum(fn(blocks, scale=0.3, window=6, **kw) ** 2)

  want = jax.jit(jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2)))(q, k, v)
  got = jax.jit(
    jax.grad(
      lambda *a: loss(attend, *a, block_k=5, block_q=3, differentiable=True), argnums=(0, 1, 2)
    )
  )(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-4, rtol=2e-4)
  with pytest.raises(ValueError, match="Reverse-mode differentiation"):
    jax.grad(lambda q: loss(attend, q, k, v, block_k=5, block_q=3))(q)
