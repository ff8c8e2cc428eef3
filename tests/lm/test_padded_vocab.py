"""A config vocab_size larger than the tokenizer (a padded embedding): `lm.load` reports it, and
no path ever produces an id the tokenizer does not have, even when the padding ids' logits are
the largest."""

import json

import jax
import numpy as np
import pytest
from helpers import cli

from kvjax import lm, speculative
from kvjax.lm import sot, streaming, tiny

T = 258  # the byte tokenizer's size
PROMPTS = ["to be or not", "ab"]


def dominated_by_padding(model):
  """The model with each padding id's LM-head column twice a real id's: whenever that real
  logit is positive its padding twin is larger, so an unmasked sampler emits padding ids."""
  params = model.params()
  head = np.array(params["head"])
  V = head.shape[1]
  head[:, T:] = 2 * head[:, (np.arange(T, V) - T) % T]
  params["head"] = head
  return model.with_params(params)


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
  """(the model as lm.load reads it, the same params without the mask)."""
  raw = dominated_by_padding(tiny.model(n_layers=1, vocab_size=320))
  path = str(tmp_path_factory.mktemp("padded") / "model")
  lm.save(raw, path)
  with pytest.warns(
    lm.VocabPaddingWarning,
    match=r"vocab_size 320 pads the tokenizer's 258 "
    r"tokens; ids 258\.\.319 are masked",
  ):
    model = lm.load(path)
  return model, raw


def test_load_records_the_tokenizer_size(padded):
  model, raw = padded
  assert model.cfg.tokenizer_size == T and raw.cfg.tokenizer_size is None
  assert model.cfg.vocab_size == 320


def test_unmasked_the_padding_ids_win(padded):
  """The premise: without the mask greedy decoding emits padding ids (so the tests below can
  fail)."""
  _, raw = padded
  out = lm.generate(raw, PROMPTS, max_new_tokens=16, stop_tokens=())
  assert max(max(t) for t in out.tokens) >= T


def test_score_masks_the_padding_and_keeps_the_rest(padded):
  model, raw = padded
  ids = model.tokenizer.encode(PROMPTS[0])
  got, want = lm.score(model, ids), lm.score(raw, ids)
  np.testing.assert_array_equal(got[:, :T], want[:, :T])
  assert (got[:, T:] == np.finfo(np.float32).min).all()


def test_no_path_samples_a_padding_id(padded):
  model, _ = padded
  key = jax.random.key(0)
  hot = lm.Sampling(temperature=1.5)
  runs = {
    "greedy": lm.generate(model, PROMPTS, max_new_tokens=32, stop_tokens=()).tokens,
    "sampled": lm.generate(
      model, PROMPTS, max_new_tokens=32, sampling=hot, key=key, stop_tokens=()
    ).tokens,
    "sot": sot.expand(
      model, PROMPTS, max_new_tokens=24, sampling=hot, key=key, stop_tokens=()
    ).tokens,
  }
  done = {}
  session = streaming.Session(model, n_sink=2, window=16, sampling=hot, key=key, stop_tokens=())
  "".join(session.turn(PROMPTS[0], max_new_tokens=40, done=done))
  runs["stream"] = [done["ids"]]
  head = speculative.init_head(model, "eagle1", seed=1)
  runs["eagle"] = speculative.generate(
    model, head, PROMPTS, max_new_tokens=24, sampling=hot, key=key, stop_tokens=()
  ).tokens
  for name, rows in runs.items():
    assert all(0 <= t < T for row in rows for t in row), name
    assert sum(map(len, rows)) >= 24, name


def test_cli_reports_the_padding_in_one_line(padded, tmp_path):
  _, raw = padded
  path = str(tmp_path / "model")
  lm.save(raw, path)
  code, out, err = cli(
    "generate", "--model", path, "--prompt", PROMPTS[0], "--max-new-tokens", "8", "--json"
  )
  lines = err.strip().splitlines()
  assert code == 0 and len(lines) == 1 and lines[0].startswith("kvjax: warning: "), err
  assert "ids 258..319 are masked" in lines[0]
  assert all(t < T for t in json.loads(out)["tokens"][0])
