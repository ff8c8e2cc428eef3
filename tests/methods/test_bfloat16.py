"""Every method on a bfloat16 model, against float32 on the same weights.

The bfloat16 model's weights are bfloat16 numbers; the reference is that model cast to float32
(the same numbers), so the two differ only by the arithmetic. bfloat16 keeps 8 significant bits
(a relative rounding error of up to 2^-9 per stored value): through these two-layer tiny models
the logits (spread about 0.16 over a vocabulary of 258) move by at most 0.007 from float32,
and TOL = 0.02 bounds that with 3x margin, while a wrong path (another row's keys, a skipped
layer, an unrotated key) moves them by about 0.1 and more. Greedy tokens are checked where
margins allow: each bfloat16 greedy token is within TOL of the best float32 logit at its
position, given the same prefix (the float32 greedy token itself when the margin exceeds TOL).

  generate, generate_iter  greedy tokens near-greedy under float32 scoring; the stream equals
                           the batch
  score                    logits within TOL of float32
  sinks (perplexity)       SinkCache nll within TOL of float32's
  sinks (session)          a StreamingLLM turn's tokens near-greedy under float32 scoring
  sinks (attention mass)   within TOL of float32's
  SoT                      shared-prefix expansion (the bfloat16 x bfloat16 -> float32 dot XLA's
                           CPU backend cannot run): every row near-greedy under float32
  DroidSpeak               the receiver's cache within bfloat16's rounding of float32's
  EAGLE                    speculative tokens near-greedy under float32 scoring
  coprocessor              the augmented cache near float32's, and generation from it
                           near-greedy under float32's augmented decoding
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import coprocessor, lm, speculative
from kvjax.lm import droidspeak as ds
from kvjax.lm import sot, steps, streaming, tiny
from kvjax.lm.generate import new_cache
from kvjax.lm.streaming import sinks

TOL = 0.02  # logits and nll: see the module docstring
KV_TOL = 0.05  # K/V: of the cache's largest magnitude (see assert_kv_close)
ROWS = [[5, 9, 12, 40, 7, 7, 100, 3, 18, 22, 31, 4, 60], [44, 2, 90, 16, 8]]


def cast(model, dtype):
  return model.with_params(jax.tree.map(lambda a: a.astype(dtype), model.params()))


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def pair(request):
  """(bfloat16 model, the same weights in float32): a two-layer tiny model (gemma3_text: a
  sliding-window layer of 6, embedding scaling, q/k norms, a tied head)."""
  kw = {"windows": (6, 0)} if request.param == "gemma3_text" else {}
  m16 = cast(tiny.model(request.param, n_layers=2, **kw), jnp.bfloat16)
  return m16, cast(m16, jnp.float32)


def assert_near_greedy(m32, prompt, tokens):
  """Each of `tokens`, generated after `prompt`, is within TOL of the best float32 logit
  after the same prefix (`lm.score` on prompt + tokens)."""
  logits = np.asarray(lm.score(m32, list(prompt) + list(tokens)))  # [T, V]
  rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
  gap = rows.max(-1) - rows[np.arange(len(tokens)), tokens]
  assert len(tokens) and (gap <= TOL).all(), gap


def assert_kv_close(got, want, rows) -> None:
  """A bfloat16 cache's K/V [L, B, K, S, H] in each row's first rows[b] slots within KV_TOL of
  float32's largest magnitude: bfloat16's step there is 2^-8 of it; the deviations seen are up
  to 2.7% (Gemma 3's q/k-normed keys of the coprocessor's latents, after its two layers and the
  base's), a wrong path's are of the order of the values."""
  for b, n in enumerate(rows):
    for x, y in ((got.k, want.k), (got.v, want.v)):
      x, y = np.asarray(x[:, b, :, :n], np.float32), np.asarray(y[:, b, :, :n])
      assert x.dtype == y.dtype and np.abs(x - y).max() <= KV_TOL * np.abs(y).max()


def test_models_are_bfloat16_and_float32(pair):
  m16, m32 = pair
  assert {a.dtype for a in jax.tree.leaves(m16.params())} == {jnp.dtype(jnp.bfloat16)}
  assert m32.dtype == jnp.float32


def test_score_and_greedy_generation(pair):
  m16, m32 = pair
  ids = ROWS[0] + ROWS[1]
  got, want = np.asarray(lm.score(m16, ids)), np.asarray(lm.score(m32, ids))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  out = lm.generate(m16, ROWS, max_new_tokens=12, stop_tokens=[])
  for prompt, tokens in zip(ROWS, out.tokens):
    assert_near_greedy(m32, prompt, tokens)
  streamed = "".join(lm.generate_iter(m16, ROWS[0], max_new_tokens=12, stop_tokens=[]))
  assert streamed == out.texts[0]


def test_sink_perplexity(pair):
  ids = np.random.default_rng(0).integers(2, 258, 40).tolist()
  got, want = (
    streaming.perplexity(m, ids, cache="sink", n_sink=2, window=7, chunk=16) for m in pair
  )
  assert got.peak_cache_tokens == want.peak_cache_tokens == 9
  np.testing.assert_allclose(got.nll, want.nll, atol=TOL, rtol=0)


def test_streaming_session(pair):
  """A StreamingLLM turn (the sink attention's XLA reference on CPU): near-greedy under
  float32 while the window still holds every token."""
  m16, m32 = pair
  done = {}
  pieces = list(
    streaming.Session(m16, n_sink=2, window=30).turn(ROWS[0], max_new_tokens=10, done=done)
  )
  assert pieces and len(done["ids"]) == 10
  assert_near_greedy(m32, ROWS[0], done["ids"])


def test_attention_mass(pair):
  ids = np.random.default_rng(1).integers(2, 258, 30).tolist()
  got, want = (sinks.attention_mass(m, ids, sink_tokens=4) for m in pair)
  np.testing.assert_allclose(got.mass, want.mass, atol=TOL, rtol=0)


def test_sot_shared_prefix_expansion(pair):
  """The shared prefix's values [K, S, H] against probabilities [B, K, G, T, S]: the dot whose
  batch axis is not leading, `UNIMPLEMENTED: ... BF16 x BF16 = F32` on CPU before."""
  m16, m32 = pair
  prefix = ROWS[0][:9]
  rows = [prefix + [70, 71], prefix + [3], prefix + [80, 81, 82, 83]]
  got = sot.expand(m16, rows, max_new_tokens=[5, 9, 7], stop_tokens=[])
  assert got.stats["prefix_tokens_shared"] == len(prefix)
  for row, tokens in zip(rows, got.tokens):
    assert_near_greedy(m32, row, tokens)


def test_droidspeak_reuse(pair):
  m16, m32 = pair
  L = m16.cfg.n_layers
  tokens = np.zeros((2, 16), np.int32)
  for b, r in enumerate(ROWS):
    tokens[b, : len(r)] = r
  lengths = jnp.asarray([len(r) for r in ROWS], jnp.int32)
  plan = ds.Plan.parse("1-2", L)  # layer 0 reused from the sender, layer 1 recomputed

  def reuse(m):
    receiver = m.with_params(jax.tree.map(lambda a: a * 1.0625, m.params()))  # exact in bf16
    return ds.receive(receiver, ds.capture(m, jnp.asarray(tokens), lengths, plan), size=16)

  got, want = reuse(m16), reuse(m32)
  assert got.k.dtype == jnp.bfloat16
  assert_kv_close(got, want, [len(r) for r in ROWS])


def test_speculative_decoding(pair):
  m16, m32 = pair
  head = speculative.init_head(m16, "eagle3", seed=1, copy_top_layer=False)
  tree = speculative.TreeSpec(top_k=2, depth=3, total_tokens=6)
  got = speculative.generate(m16, head, ROWS, max_new_tokens=12, stop_tokens=[], tree=tree)
  assert got.stats["target_forwards"] >= 1
  for prompt, tokens in zip(ROWS, got.tokens):
    assert len(tokens) == 12
    assert_near_greedy(m32, prompt, tokens)


def test_coprocessor_augmentation(pair):
  m16, m32 = pair
  cop16 = coprocessor.init(m16, 4, seed=5)
  cop32 = cop16.with_params(jax.tree.map(lambda a: a.astype(jnp.float32), cop16.params))
  prompt = ROWS[0]
  got = coprocessor.generate(m16, cop16, [prompt], max_new_tokens=6, stop_tokens=[]).tokens[0]

  def augmented(base, cop):
    tokens = np.zeros((1, 16), np.int32)
    tokens[0, : len(prompt) - 1] = prompt[:-1]
    _, cache = steps.prefill(
      base.graphdef,
      base.state,
      new_cache(base, 1, 64),
      jnp.asarray(tokens),
      jnp.asarray([len(prompt) - 1], jnp.int32),
    )
    return coprocessor.augment(base, cop, cache)

  c16, c32 = augmented(m16, cop16), augmented(m32, cop32)
  n = int(c32.length[0])
  assert int(c16.length[0]) == n > len(prompt) - 1  # the latents are in the cache
  assert_kv_close(c16, c32, [n])
  # float32 decoding from its augmented cache, fed the bfloat16 tokens (teacher forcing)
  cache, feed, gaps = c32, [prompt[-1], *got], []
  for j in range(len(got)):
    logits, cache = steps.extend(
      m32.graphdef, m32.state, cache, jnp.asarray([[feed[j]]]), jnp.asarray([1], jnp.int32)
    )
    row = np.asarray(logits[0])
    gaps.append(row.max() - row[got[j]])
  assert max(gaps) <= TOL, gaps
