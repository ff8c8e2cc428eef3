"""Bad arguments to generate, generate_iter, score and Sampling get a ValueError or TypeError that
says what was wrong and what was expected."""

import dataclasses
import os

import numpy as np
import pytest
from helpers import raises

from kvjax import lm
from kvjax.lm import tiny


@pytest.mark.parametrize(
  "kwargs,parts",
  [
    (dict(temperature=-1), ("temperature must be 0 (greedy) or a finite number >= 1e-6", "got -1")),
    (dict(temperature=float("inf")), ("temperature", "got inf")),
    (dict(temperature=1e-50), ("temperature", "got 1e-50")),
    (dict(top_k=True), ("top_k must be an int >= 0", "got True")),
    (dict(temperature=float("nan")), ("temperature", "got nan")),
    (dict(top_p=0), ("top_p must be in (0, 1]", "got 0")),
    (dict(top_p=1.5), ("top_p must be in (0, 1]", "got 1.5")),
    (dict(top_k=-1), ("top_k must be an int >= 0", "got -1")),
    (dict(top_k=2.5), ("top_k must be an int >= 0", "got 2.5")),
  ],
)
def test_bad_sampling(kwargs, parts):
  raises(ValueError, lambda: lm.Sampling(**kwargs), *parts)


def test_sampling_needs_key(model):
  raises(
    ValueError,
    lambda: lm.generate(model, "hi", sampling=lm.Sampling(temperature=0.7)),
    "temperature > 0",
    "key=jax.random.key",
  )


@pytest.mark.parametrize("n", [0, -3, 2.0])
def test_bad_max_new_tokens(model, n):
  raises(
    ValueError,
    lambda: lm.generate(model, "hi", max_new_tokens=n),
    "max_new_tokens must be an int >= 1",
    f"got {n!r}",
  )


def test_sampling_must_be_a_sampling(model):
  raises(
    TypeError,
    lambda: lm.generate(model, "hi", sampling={"temperature": 0.5}),
    "kvjax.lm.Sampling",
    "dict",
  )


def test_empty_prompt_list(model):
  raises(ValueError, lambda: lm.generate(model, [], max_new_tokens=2), "prompts is empty")


def test_empty_prompt(model):
  raises(
    ValueError,
    lambda: lm.generate(model, [[5, 6], []], max_new_tokens=2),
    "prompt 1 is empty",
    "at least one token",
  )


@pytest.mark.parametrize("prompt,bad", [([5, 320], "[320]"), ([[5], [-1, 7]], "[-1]")])
def test_token_ids_out_of_range(model, prompt, bad):
  raises(
    ValueError,
    lambda: lm.generate(model, prompt, max_new_tokens=2),
    f"token ids {bad}",
    "outside [0, 320)",
  )


def test_stop_tokens_out_of_range(model):
  raises(
    ValueError,
    lambda: lm.generate(model, [5], max_new_tokens=2, stop_tokens=[1000]),
    "stop_tokens [1000]",
    "outside [0, 320)",
  )


def test_prompt_plus_new_tokens_beyond_context(model):
  raises(
    ValueError,
    lambda: lm.generate(model, [5] * 510, max_new_tokens=5),
    "prompt (510 tokens)",
    "max_new_tokens (5)",
    "context of 512 positions",
  )


def test_text_without_tokenizer(model):
  bare = dataclasses.replace(model, tokenizer=None)
  raises(
    ValueError,
    lambda: lm.generate(bare, "hello", max_new_tokens=2),
    "no tokenizer",
    "pass token ids",
  )
  raises(
    ValueError,
    lambda: lm.generate(bare, [5, 6], max_new_tokens=2, stop=["x"]),
    "stop strings need the model's tokenizer",
  )
  raises(
    ValueError,
    lambda: next(lm.generate_iter(bare, [5, 6], max_new_tokens=2)),
    "generate_iter needs the model's tokenizer",
    "tokenizer=None",
  )


def test_missing_tokenizer_file_is_named(broken):
  os.remove(os.path.join(broken, "tokenizer.json"))
  bare = lm.load(broken)
  assert bare.tokenizer is None
  file = os.path.join(broken, "tokenizer.json")
  raises(
    ValueError,
    lambda: lm.generate(bare, "hello", max_new_tokens=2),
    "a text prompt (pass token ids instead) needs the model's tokenizer",
    f"no {file}",
  )
  raises(
    ValueError,
    lambda: next(lm.generate_iter(bare, [5, 6], max_new_tokens=2)),
    "generate_iter needs the model's tokenizer",
    f"no {file}",
  )


@pytest.mark.parametrize("n", [True, False, 0, -1, 2.0, "3"])
def test_max_new_tokens_must_be_a_positive_int(model, n):
  raises(
    ValueError,
    lambda: lm.generate(model, [[5, 6]], max_new_tokens=n),
    "max_new_tokens must be an int >= 1",
    f"got {n!r}",
  )


def test_score_given_text(model):
  raises(TypeError, lambda: lm.score(model, "hello"), "token ids, not text", "model.tokenizer")
  raises(TypeError, lambda: lm.score(model, ["hello", "there"]), "token ids, not text")


def test_score_3d(model):
  raises(
    ValueError,
    lambda: lm.score(model, np.zeros((1, 2, 3), np.int32)),
    "token_ids must be [T] or [B, T]",
    "(1, 2, 3)",
  )


def test_score_out_of_range(model):
  raises(
    ValueError,
    lambda: lm.score(model, [[1, 2], [3, 999]]),
    "prompt 1",
    "token ids [999]",
    "outside [0, 320)",
  )


def test_prompt_ids_must_be_flat_ints(model):
  raises(
    ValueError,
    lambda: lm.generate(model, [[5.5, 3]], max_new_tokens=2),
    "prompt 0 must be a string or a flat sequence of int token ids",
    "float64",
  )
  raises(
    ValueError,
    lambda: lm.generate(model, [[[1, 2], [3, 4]]], max_new_tokens=2),
    "prompt 0",
    "shape (2, 2)",
  )
  raises(ValueError, lambda: lm.score(model, np.array([1.5, 2.0])), "int token ids")


def test_score_beyond_context():
  small = lm.init(tiny.config(max_position=16))
  raises(ValueError, lambda: lm.score(small, [3] * 20), "20 tokens", "16 positions")


def test_bare_stop_string_is_one_stop_string():
  m = tiny.model(seed=4)
  text = lm.generate(m, "abc", max_new_tokens=12, stop_tokens=[]).texts[0]
  needle = text[4:7]
  out = lm.generate(m, "abc", max_new_tokens=12, stop_tokens=[], stop=needle)
  assert out.texts[0] == text[: text.index(needle)]
