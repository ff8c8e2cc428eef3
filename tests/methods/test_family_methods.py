"""Every method on every family added after the first five: one smoke test per method and
family on a tiny random model, each against an independent expected value (never the method's
own building blocks).

  sinks        streaming perplexity through a SinkCache == -log softmax of `lm.score` on the
               re-positioned sequence the cache holds (exact for a one-layer model);
  EAGLE        speculative greedy output == plain greedy (lossless), an eagle3 head;
  DroidSpeak   a mixed reuse plan == the receiver's layers run by hand over the sender's E;
  coprocessor  augmented greedy generation == prefill, augment and greedy decoding by hand;
  SoT          the shared-prefix expansion of rows == `lm.generate` of each row alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from by_hand import assert_rows_close, droidspeak_kv, greedy_after

from kvjax import coprocessor, lm, speculative
from kvjax.lm import droidspeak as ds
from kvjax.lm import sot, steps, tiny
from kvjax.lm.generate import new_cache
from kvjax.lm.streaming import perplexity

FAMILIES = ("qwen3", "gemma3_text", "phi3", "mixtral", "qwen3_moe")
ROWS = [[5, 9, 12, 40, 7, 7, 100, 3, 18, 22, 31, 4, 60], [44, 2, 90, 16, 8]]


@pytest.fixture(params=FAMILIES)
def fam(request):
  return request.param


def windows(family, n_layers):
  """Sliding windows shorter than the test texts where the family has them: Gemma 3's local
  layers (own RoPE base) with a global top layer, a window on every Phi-3, Mixtral and
  Qwen3-MoE layer (tiny.config's Qwen3-MoE: experts in the even layers, a dense MLP in the
  odd ones)."""
  if family == "gemma3_text":
    return {"windows": (6,) * max(n_layers - 1, 1) + (0,) * (n_layers > 1)}
  return {"windows": (6,) * n_layers} if family in ("phi3", "mixtral", "qwen3_moe") else {}


def test_sink_stream_equals_rescoring_what_the_cache_holds(fam):
  model = tiny.model(fam, n_layers=1, **windows(fam, 1))
  ids = np.random.default_rng(0).integers(2, 258, 40).tolist()
  n_sink, window = 2, 7
  got = perplexity(model, ids, cache="sink", n_sink=n_sink, window=window, chunk=16)
  rows = [
    ids[: min(n_sink, i + 1)] + ids[max(n_sink, i - window + 1) : i + 1]
    for i in range(len(ids) - 1)
  ]
  scored = lm.score(model, rows)
  want = [-jax.nn.log_softmax(scored[b][len(r) - 1])[ids[b + 1]] for b, r in enumerate(rows)]
  assert got.peak_cache_tokens == n_sink + window
  np.testing.assert_allclose(got.nll, want, atol=2e-4)


def test_speculative_greedy_is_lossless(fam):
  """An EAGLE-3 head (the three fused layer inputs: the target's features at every depth)."""
  model = tiny.model(fam, n_layers=3, **windows(fam, 3))
  head = speculative.init_head(model, "eagle3", seed=1, copy_top_layer=False)
  plain = lm.generate(model, ROWS, max_new_tokens=16, stop_tokens=[])
  spec = speculative.generate(
    model,
    head,
    ROWS,
    max_new_tokens=16,
    stop_tokens=[],
    tree=speculative.TreeSpec(top_k=2, depth=3, total_tokens=6),
  )
  assert spec.tokens == plain.tokens
  assert spec.stats["target_forwards"] >= 1


def test_droidspeak_mixed_plan_equals_the_layers_by_hand(fam):
  L = 4
  sender = tiny.model(fam, n_layers=L, **windows(fam, L))
  rng = np.random.default_rng(1)
  receiver = sender.with_params(
    jax.tree.map(
      lambda a: a + 0.05 * np.std(a) * rng.standard_normal(a.shape).astype(np.float32),
      sender.params(),
    )
  )
  tokens = np.zeros((2, 16), np.int32)
  for b, r in enumerate(ROWS):
    tokens[b, : len(r)] = r
  lengths = jnp.asarray([len(r) for r in ROWS], jnp.int32)
  tokens = jnp.asarray(tokens)
  plan = ds.Plan.parse("0-1,2-4", L)  # two groups from different E layers, layers 1 reused
  got = ds.receive(receiver, ds.capture(sender, tokens, lengths, plan), size=16)
  assert_rows_close(got, *droidspeak_kv(sender, receiver, tokens, plan), lengths)


def test_coprocessor_generation_is_the_augmented_greedy_path(fam):
  base = tiny.model(fam, n_layers=2, **windows(fam, 2))
  cop = coprocessor.init(base, 4, seed=5)
  got = coprocessor.generate(base, cop, ROWS, max_new_tokens=6, stop_tokens=[])
  for b, r in enumerate(ROWS):
    tokens = np.zeros((1, 16), np.int32)
    tokens[0, : len(r) - 1] = r[:-1]
    _, cache = steps.prefill(
      base.graphdef,
      base.state,
      new_cache(base, 1, 64),
      jnp.asarray(tokens),
      jnp.asarray([len(r) - 1], jnp.int32),
    )
    cache = coprocessor.augment(base, cop, cache)
    assert got.tokens[b] == greedy_after(base, cache, r[-1], 6)


def test_sot_shared_prefix_expansion_equals_each_row_alone(fam):
  model = tiny.model(fam, n_layers=2, **windows(fam, 2))
  prefix = ROWS[0][:9]
  rows = [prefix + [70, 71], prefix + [3], prefix + [80, 81, 82, 83]]
  got = sot.expand(model, rows, max_new_tokens=[5, 9, 7], stop_tokens=[])
  assert got.stats["prefix_tokens_shared"] == len(prefix)
  for row, budget, tokens in zip(rows, [5, 9, 7], got.tokens):
    assert tokens == lm.generate(model, row, max_new_tokens=budget, stop_tokens=[]).tokens[0]
