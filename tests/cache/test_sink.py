"""The StreamingLLM sink cache against `lm.score` on the re-positioned sequence.

After evictions, the logits of stream token i must equal the full-recompute logits of the
sequence the cache holds when i is written (sinks + the window ending at i), positions 0..n-1.
That holds exactly for ONE-layer models: deeper layers' cached keys and values were computed
while evicted tokens were still in context (which is StreamingLLM's design, and why the paper
compares it against the "recompute" baseline). Multi-layer models are checked for what must
hold exactly: equality with the dense cache before any eviction, chunked == token-by-token,
batched == unbatched.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvjax import lm
from kvjax.cache import KVCache, SinkCache
from kvjax.lm import tiny

ATOL = 2e-4


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _step(graphdef, state, cache, tokens, n_new):
  out, cache = nnx.merge(graphdef, state)(tokens, cache=cache, n_new=n_new)
  return out.logits, cache


def new_sink(model, batch, n_sink, window):
  cfg = model.cfg
  return SinkCache.init(
    n_layers=cfg.n_layers,
    batch=batch,
    n_sink=n_sink,
    window=window,
    n_kv_heads=cfg.n_kv_heads,
    head_dim=cfg.head_dim,
    dtype=model.dtype,
  )


def feed(model, cache, tokens, chunk):
  """Feeds tokens [B, N] in chunks -> (logits [B, N, V], cache)."""
  B, N = tokens.shape
  out = []
  for lo in range(0, N, chunk):
    part = tokens[:, lo : lo + chunk]
    logits, cache = _step(
      model.graphdef,
      model.state,
      cache,
      jnp.asarray(part),
      jnp.full((B,), part.shape[1], jnp.int32),
    )
    out.append(np.asarray(logits))
  return np.concatenate(out, axis=1), cache


def held(i, n_sink, window):
  """Stream indices in the cache right after token i is written (per-token policy)."""
  return list(range(min(n_sink, i + 1))) + list(range(max(n_sink, i - window + 1), i + 1))


def expected(model, tokens, n_sink, window):
  """[N, V]: lm.score of each token's re-positioned sequence, at its last position (the N
  sequences scored as one padded batch)."""
  rows = [[int(tokens[j]) for j in held(i, n_sink, window)] for i in range(len(tokens))]
  scored = lm.score(model, rows)
  return np.stack([scored[b][len(r) - 1] for b, r in enumerate(rows)])


def tokens_of(n, seed=0, batch=1):
  return np.random.default_rng(seed).integers(2, 258, (batch, n)).astype(np.int32)


@pytest.fixture(scope="module")
def model():
  return tiny.model(n_layers=1)


@pytest.fixture(scope="module")
def deep():
  return tiny.model(n_layers=3)


def test_equals_dense_cache_while_nothing_is_evicted(deep):
  model = deep
  toks = tokens_of(30)
  sink, _ = feed(model, new_sink(model, 1, 4, 40), toks, 1)
  cfg = model.cfg
  dense = KVCache.init(
    n_layers=cfg.n_layers, batch=1, size=64, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim
  )
  want, _ = feed(model, dense, toks, 1)
  np.testing.assert_allclose(sink, want, atol=ATOL)
  np.testing.assert_allclose(sink[0], lm.score(model, toks[0]), atol=ATOL)


@pytest.mark.parametrize("n_sink", [0, 1, 4])
def test_per_token_eviction_equals_score_of_the_repositioned_sequence(model, n_sink):
  toks = tokens_of(40, seed=n_sink)
  got, cache = feed(model, new_sink(model, 1, n_sink, 8), toks, 1)
  np.testing.assert_allclose(got[0], expected(model, toks[0], n_sink, 8), atol=ATOL)
  assert int(cache.length[0]) == n_sink + 8 and int(cache.count[0]) == 40


@pytest.mark.parametrize("chunk", [3, 8, 13])
def test_chunked_prefill_equals_token_by_token(model, deep, chunk):
  """Chunks shorter and longer than the window (8) evict as they go."""
  toks = tokens_of(37, seed=1)
  for m in (deep, model):
    one, _ = feed(m, new_sink(m, 1, 4, 8), toks, 1)
    got, cache = feed(m, new_sink(m, 1, 4, 8), toks, chunk)
    np.testing.assert_allclose(got, one, atol=ATOL)
  # the cache after the chunks serves the next token like the token-by-token cache
  nxt = tokens_of(1, seed=9)
  a, _ = feed(model, cache, nxt, 1)
  want = lm.score(model, [int(t) for t in np.concatenate([toks[0, :4], toks[0, 30:], nxt[0]])])
  np.testing.assert_allclose(a[0, 0], want[-1], atol=ATOL)


def test_per_turn_policy_makes_room_for_the_whole_turn(model):
  n_sink, window = 2, 12
  first, turn = tokens_of(20, seed=2), tokens_of(7, seed=3)
  _, cache = feed(model, new_sink(model, 1, n_sink, window), first, 4)
  cache = cache.make_room(7)  # window keeps 5 of the 12, so all 7 new tokens fit
  assert int(cache.length[0]) == n_sink + 5
  got, cache = feed(model, cache, turn, 7)
  kept = np.concatenate([first[0, :n_sink], first[0, 15:]])
  want = lm.score(model, [int(t) for t in np.concatenate([kept, turn[0]])])[len(kept) :]
  np.testing.assert_allclose(got[0], want, atol=ATOL)
  assert int(cache.length[0]) == n_sink + window
  with pytest.raises(ValueError, match="fit the window of 12"):
    cache.make_room(13)


def test_batch_rows_at_different_fills(model, deep):
  """Rows fed different numbers of real tokens per step equal the re-positioned sequence
  (one layer) and their unbatched token-by-token runs (three layers)."""
  n_sink, window = 3, 6
  toks = tokens_of(30, seed=4, batch=2)
  ref = [expected(model, toks[b], n_sink, window) for b in range(2)]
  _batched_fills(model, toks, n_sink, window, lambda b, i: ref[b][i])
  singles = [
    feed(deep, new_sink(deep, 1, n_sink, window), toks[b : b + 1], 1)[0][0] for b in range(2)
  ]
  _batched_fills(deep, toks, n_sink, window, lambda b, i: singles[b][i])


def _batched_fills(model, toks, n_sink, window, want):
  cache = new_sink(model, 2, n_sink, window)
  counts = [(5, 2), (1, 4), (4, 4), (3, 1), (2, 5)]  # real tokens per row in each step
  pos = [0, 0]
  for n0, n1 in counts:
    T = max(n0, n1)
    part = np.zeros((2, T), np.int32)
    part[0, :n0], part[1, :n1] = toks[0, pos[0] : pos[0] + n0], toks[1, pos[1] : pos[1] + n1]
    logits, cache = _step(
      model.graphdef, model.state, cache, jnp.asarray(part), jnp.asarray([n0, n1], jnp.int32)
    )
    for b, n in enumerate((n0, n1)):
      for j in range(n):
        np.testing.assert_allclose(np.asarray(logits)[b, j], want(b, pos[b] + j), atol=ATOL)
    pos = [pos[0] + n0, pos[1] + n1]
  np.testing.assert_array_equal(np.asarray(cache.count), pos)


@pytest.mark.parametrize(
  "family, windows",
  [
    ("gemma2", (5,)),
    ("gemma2", (0,)),
    ("mistral", (6,)),
    ("qwen2", (0,)),
    ("gemma3_text", (5,)),
    ("phi3", (6,)),
  ],
)
def test_families(family, windows):
  """Gemma-2's local layers keep their own (smaller) window inside the cache; a Gemma 3 local
  layer's keys are re-rotated by its own RoPE base (1e4, not the global 1e6 with scaling).
  Phi-3's longrope attention factor holds on the keys the cache re-rotates."""
  model = tiny.model(family, n_layers=1, windows=windows)
  toks = tokens_of(30, seed=5)
  got, _ = feed(model, new_sink(model, 1, 4, 9), toks, 4)
  np.testing.assert_allclose(got[0], expected(model, toks[0], 4, 9), atol=ATOL)


def test_bfloat16(model):
  bf = model.with_params(jax.tree.map(lambda a: a.astype(jnp.bfloat16), model.params()))
  toks = tokens_of(24, seed=6)
  got, cache = feed(bf, new_sink(bf, 1, 2, 7), toks, 5)
  assert cache.k.dtype == jnp.bfloat16
  want = expected(model, toks[0], 2, 7)
  assert np.abs(got[0] - want).max() < 0.1


def test_errors(model):
  cache = new_sink(model, 1, 4, 8)
  with pytest.raises(ValueError, match="assigns positions"):
    model.decoder(jnp.zeros((1, 2), jnp.int32), cache=cache, positions=jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="window must be an int >= 1"):
    new_sink(model, 1, 4, 0)
  with pytest.raises(ValueError, match="n_sink must be an int >= 0"):
    new_sink(model, 1, -1, 8)
