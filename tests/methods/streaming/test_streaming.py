"""Streaming perplexity (`kvjax.lm.streaming`, `kvjax ppl`) against full recompute."""

import json

import numpy as np
import pytest
from helpers import cli

from kvjax import lm
from kvjax.lm import streaming, tiny


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


def test_sink_chunks_do_not_change_the_result(deep):
  ids = ids_of(80, seed=3)
  a = streaming.perplexity(deep, ids, cache="sink", n_sink=2, window=10, chunk=7)
  b = streaming.perplexity(deep, ids, cache="sink", n_sink=2, window=10, chunk=32)
  np.testing.assert_allclose(a.nll, b.nll, atol=2e-5)
  assert a.peak_cache_tokens == 12


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(cache="dense"), "more than the model's context"),
    (dict(cache="window", window=0), "window >= 1"),
    (dict(cache="recompute", window=4, n_sink=2), "keeps no sinks"),
    (dict(cache="sink", n_sink=-1, window=4), "n_sink must be an int >= 0"),
    (dict(cache="lru", window=4), "cache must be one of"),
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
  for argv, words in [
    (["--cache", "sink"], "needs --window"),
    (["--cache", "window", "--window", 8, "--sinks", 4], "keeps no sinks"),
    (["--cache", "dense", "--window", 8], "do not apply"),
    (["--cache", "sink", "--window", 0], "--window"),
  ]:
    code, out, err = cli("ppl", "--model", model_dir, "--text", text, *argv)
    assert code == 2 and words in err and out == ""
