"""Generation engine: stops, streaming, sampling, buckets, chat template."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import lm
from kvjax.lm import sampling as sampling_lib
from kvjax.lm import tiny


@pytest.fixture(scope="module")
def model():
  return tiny.model("llama", seed=3)


def test_stop_token_ends_row_and_is_reported(model):
  free = lm.generate(model, "abc", max_new_tokens=12, stop_tokens=[])
  stop = free.tokens[0][4]
  first = free.tokens[0].index(stop)
  out = lm.generate(model, "abc", max_new_tokens=12, stop_tokens=[stop])
  assert out.tokens[0] == free.tokens[0][: first + 1]
  assert out.finish == ["stop_token"]
  assert out.texts[0] == model.tokenizer.decode(free.tokens[0][:first])


def test_rows_stop_independently(model):
  free = lm.generate(model, ["abc", "xyz"], max_new_tokens=10, stop_tokens=[])
  stop = free.tokens[0][2]
  out = lm.generate(model, ["abc", "xyz"], max_new_tokens=10, stop_tokens=[stop])
  for got, ref in zip(out.tokens, free.tokens):
    expect = ref[: ref.index(stop) + 1] if stop in ref else ref
    assert got == expect


def test_stop_string_cuts_text_and_tokens(model):
  free = lm.generate(model, "hello", max_new_tokens=16, stop_tokens=[])
  text = free.texts[0]
  needle = text[5:7]
  out = lm.generate(model, "hello", max_new_tokens=16, stop_tokens=[], stop=[needle])
  cut = text.index(needle)
  assert out.texts[0] == text[:cut]
  assert out.finish == ["stop_string"]
  ids = out.tokens[0]
  assert needle in model.tokenizer.decode(ids)[cut:]
  assert needle not in model.tokenizer.decode(ids[:-1])[cut:]


def test_stream_yields_the_generated_text(model):
  for stop in ([], ["zz"]):
    ref = lm.generate(model, "Once", max_new_tokens=24, stop_tokens=[], stop=stop).texts[0]
    pieces = list(lm.generate_iter(model, "Once", max_new_tokens=24, stop_tokens=[], stop=stop))
    assert "".join(pieces) == ref
    assert len(pieces) > 1


def test_stream_stops_at_stop_string_early(model):
  text = lm.generate(model, "Once", max_new_tokens=24, stop_tokens=[]).texts[0]
  needle = text[3:5]
  got = "".join(lm.generate_iter(model, "Once", max_new_tokens=24, stop_tokens=[], stop=[needle]))
  assert got == text[: text.index(needle)]


def test_sampling_is_reproducible_and_key_dependent(model):
  s = lm.Sampling(temperature=1.5)
  a = lm.generate(model, "abc", max_new_tokens=16, sampling=s, key=jax.random.key(1))
  b = lm.generate(model, "abc", max_new_tokens=16, sampling=s, key=jax.random.key(1))
  c = lm.generate(model, "abc", max_new_tokens=16, sampling=s, key=jax.random.key(2))
  assert a.tokens == b.tokens
  assert a.tokens != c.tokens


def test_top_k_one_is_greedy(model):
  greedy = lm.generate(model, "abc", max_new_tokens=12, stop_tokens=[])
  top1 = lm.generate(
    model,
    "abc",
    max_new_tokens=12,
    stop_tokens=[],
    sampling=lm.Sampling(temperature=0.7, top_k=1),
    key=jax.random.key(0),
  )
  assert top1.tokens == greedy.tokens


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  kept = lambda s: np.isfinite(np.asarray(sampling_lib.filter_logits(logits, s)))[0]
  assert kept(lm.Sampling(temperature=1.0, top_k=2)).tolist() == [1, 1, 0, 0, 0]
  # top_p keeps the smallest prefix whose mass reaches p: 0.5 + 0.2 >= 0.6
  assert kept(lm.Sampling(temperature=1.0, top_p=0.6)).tolist() == [1, 1, 0, 0, 0]
  assert kept(lm.Sampling(temperature=1.0, top_p=0.5)).tolist() == [1, 0, 0, 0, 0]
  assert kept(lm.Sampling(temperature=1.0, top_p=0.86)).tolist() == [1, 1, 1, 1, 0]


def test_prompt_lengths_in_one_bucket_share_one_executable(model):
  # prompt and cache sizes both stay in the 16 bucket (13 + 3), whatever ran before
  lm.generate(model, [5] * 3, max_new_tokens=3)
  n = len(model.compiled)
  for length in (4, 9, 13):
    lm.generate(model, [7] * length, max_new_tokens=3)
  for stops in ([], [1, 2], [1, 2, 3]):  # stop ids are padded to one shape too
    lm.generate(model, [7] * 5, max_new_tokens=3, stop_tokens=stops)
  assert len(model.compiled) == n


def test_stats_and_finish(model):
  out = lm.generate(model, ["a", "bb"], max_new_tokens=5, stop_tokens=[])
  assert out.finish == ["length", "length"]
  assert [len(t) for t in out.tokens] == [5, 5]
  assert out.stats["new_tokens"] == 10
  assert out.stats["prefill_s"] > 0 and out.stats["decode_tokens_per_s"] > 0
  assert out.prompt_tokens[0] == model.tokenizer.encode("a")


def test_chat_template_prompt(model):
  out = lm.generate(model, "hi", max_new_tokens=4, stop_tokens=[], chat=True)
  assert model.tokenizer.decode(out.prompt_tokens[0], skip_special_tokens=False) == (
    "<s><|user|>hi</s><|assistant|>"
  )


def test_score_shapes(model):
  ids = model.tokenizer.encode("hello there")
  one = lm.score(model, ids)
  assert one.shape == (len(ids), model.cfg.vocab_size)
  ragged = lm.score(model, [ids, ids[:4]])
  np.testing.assert_allclose(ragged[0], one, atol=1e-5)
  np.testing.assert_allclose(ragged[1], one[:4], atol=1e-5)


def test_models_of_one_config_share_executables(tmp_path):
  """Two loads of one checkpoint compile each program once: the second model's generate and
  stream reuse the first's executables (steps.EXECUTABLES, keyed by graphdef and shapes)."""
  from kvjax.lm import steps

  lm.save(tiny.model(seed=4), str(tmp_path))
  a, b = lm.load(str(tmp_path)), lm.load(str(tmp_path))
  steps.EXECUTABLES.clear()
  before = steps.compilations
  first = lm.generate(a, [5, 6, 7], max_new_tokens=3)
  "".join(lm.generate_iter(a, [5, 6, 7], max_new_tokens=3, stop_tokens=[]))
  compiled = steps.compilations - before
  assert compiled == 3 and first.stats["compile_s"] > 0  # prefill, decode loop, stream step
  again = lm.generate(b, [5, 6, 7], max_new_tokens=3)
  "".join(lm.generate_iter(b, [5, 6, 7], max_new_tokens=3, stop_tokens=[]))
  assert steps.compilations - before == compiled and again.stats["compile_s"] == 0
  assert again.tokens == first.tokens
