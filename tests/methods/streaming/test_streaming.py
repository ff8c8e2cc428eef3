"""Streaming perplexity (`kvjax.lm.streaming`, `kvjax ppl`) against full recompute."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cli

from kvjax import lm
from kvjax.cache import SinkCache
from kvjax.lm import steps, streaming, tiny


@pytest.fixture(scope="module")
def deep():
  return tiny.model(n_layers=2)


def ids_of(n, seed=0):
  return np.random.default_rng(seed).integers(2, 258, n).astype(np.int32)


def nll_of_score(model, ids):
  logits = lm.score(model, ids).astype(np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return (lse - logits[np.arange(len(ids)), ids[1:].tolist() + [0]])[:-1]


def test_dense_equals_score(deep):
  ids = ids_of(70)
  got = streaming.perplexity(deep, ids, cache="dense", chunk=32)
  np.testing.assert_allclose(got.nll, nll_of_score(deep, ids), atol=2e-4)
  assert got.tokens == 69 and got.peak_cache_tokens == 69 and got.ms_per_token > 0


def test_sink_without_eviction_equals_dense(deep):
  ids = ids_of(50, seed=1)
  dense = streaming.perplexity(deep, ids, cache="dense", chunk=16)
  sink = streaming.perplexity(deep, ids, cache="sink", n_sink=4, window=60, chunk=16)
  np.testing.assert_allclose(sink.nll, dense.nll, atol=2e-4)


def test_window_equals_recompute_for_one_layer(one_layer):
  """With one layer the rolling window's cached K/V depend on the tokens only, so it must
  equal recomputing the same window from scratch (positions 0..W-1) for every token."""
  ids = ids_of(60, seed=2)
  window = streaming.perplexity(one_layer, ids, cache="window", window=9, chunk=16)
  recompute = streaming.perplexity(one_layer, ids, cache="recompute", window=9)
  np.testing.assert_allclose(window.nll, recompute.nll, atol=2e-4)
  assert window.peak_cache_tokens == recompute.peak_cache_tokens == 9
  for i in (5, 30, 58):  # token i + 1 from the previous (at most) 9 tokens, positions from 0
    ctx = ids[max(0, i + 1 - 9) : i + 2]
    assert abs(recompute.nll[i] - nll_of_score(one_layer, ctx)[-1]) < 2e-4


@pytest.mark.parametrize("cache, n_sink", [("sink", 2), ("window", 0)])
def test_chunks_equal_one_token_at_a_time(deep, cache, n_sink):
  """A chunk evicts per token inside one forward: chunks of 7 and 32 (longer than the 12
  slots) give the nll of one decode step per token (chunk=1) and of `steps.nll_scan`."""
  ids = ids_of(80, seed=3)
  kw = dict(cache=cache, n_sink=n_sink, window=12 - n_sink)
  one = streaming.perplexity(deep, ids, chunk=1, **kw)
  for chunk in (7, 32):
    got = streaming.perplexity(deep, ids, chunk=chunk, **kw)
    np.testing.assert_allclose(got.nll, one.nll, atol=2e-5)
  kv = SinkCache.init(**deep.cfg.cache_dims, batch=1, n_sink=n_sink, window=12 - n_sink)
  (scan, _), _ = steps.call(
    deep, steps.nll_scan, kv, jnp.asarray(ids[None, :-1]), jnp.asarray(ids[None, 1:])
  )
  np.testing.assert_allclose(np.asarray(scan[0]), one.nll, atol=2e-5)
  assert one.peak_cache_tokens == 12 and one.tokens == 79
  np.testing.assert_array_equal(one.positions, np.arange(1, 80))


def test_recompute_every_kth_token(deep):
  ids = ids_of(60, seed=4)
  full = streaming.perplexity(deep, ids, cache="recompute", window=10)
  some = streaming.perplexity(deep, ids, cache="recompute", window=10, every=7)
  # tokens 1..10 from the first window, then 11, 18, ..., 53 (every 7th)
  want = np.concatenate([np.arange(1, 11), np.arange(11, 60, 7)])
  np.testing.assert_array_equal(some.positions, want)
  np.testing.assert_allclose(some.nll, full.nll[want - 1], atol=2e-5)
  assert some.tokens == len(want)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(cache="dense"), "more than the model's context"),
    (dict(cache="window", window=0), "window >= 1"),
    (dict(cache="recompute", window=4, n_sink=2), "keeps no sinks"),
    (dict(cache="sink", n_sink=-1, window=4), "n_sink must be an int >= 0"),
    (dict(cache="lru", window=4), "cache must be one of"),
    (dict(cache="sink", window=4, every=2), "applies to cache='recompute' only"),
    (dict(cache="recompute", window=4, every=0), "every must be an int >= 1"),
    (dict(cache="sink", window=4, chunk=0), "chunk must be an int >= 1"),
  ],
)
def test_bad_arguments(kwargs, message):
  model = tiny.model(n_layers=1, max_position=32)
  with pytest.raises(ValueError, match=message):
    streaming.perplexity(model, ids_of(40), **kwargs)


def test_cli(tmp_path, one_layer, model_dir):
  text = tmp_path / "t.txt"
  text.write_text("to be or not to be, that is the question " * 4, encoding="utf-8")
  code, out, err = cli(
    "ppl",
    "--model",
    model_dir,
    "--text",
    text,
    "--cache",
    "sink",
    "--sinks",
    2,
    "--window",
    16,
    "--json",
  )
  assert code == 0, err
  got = json.loads(out)
  ids = one_layer.tokenizer.encode(text.read_text(encoding="utf-8"))
  want = streaming.perplexity(one_layer, ids, cache="sink", n_sink=2, window=16)
  assert got["ppl"] == pytest.approx(want.ppl, rel=1e-5)
  assert got["tokens"] == len(ids) - 1 and got["peak_cache_tokens"] == 18
  assert set(got) >= {"ppl", "tokens", "peak_cache_tokens", "ms_per_token"}
  code, out, err = cli(
    "ppl", "--model", model_dir, "--text", text, "--cache", "recompute", "--window", 8,
    "--every", 5, "--json",
  )  # fmt: skip
  assert code == 0, err
  want = streaming.perplexity(one_layer, ids, cache="recompute", window=8, every=5)
  got = json.loads(out)
  assert got["tokens"] == want.tokens == 8 + len(range(1, len(ids) - 1 - 8 + 1, 5))
  assert got["ppl"] == pytest.approx(want.ppl, rel=1e-5) and got["every"] == 5
  for argv, words in [
    (["--cache", "sink"], "needs --window"),
    (["--cache", "window", "--window", 8, "--sinks", 4], "keeps no sinks"),
    (["--cache", "dense", "--window", 8], "do not apply"),
    (["--cache", "sink", "--window", 0], "--window"),
    (["--cache", "sink", "--window", 8, "--every", 2], "--every applies to --cache recompute"),
    (["--cache", "recompute", "--window", 8, "--every", 0], "--every"),
  ]:
    code, out, err = cli("ppl", "--model", model_dir, "--text", text, *argv)
    assert code == 2 and words in err and out == ""
