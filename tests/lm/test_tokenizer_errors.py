"""A tokenizer or generation config that does not fit the model is named with its file."""

import os

import pytest
from helpers import edit_json, load_fails, write

from kvjax import lm
from kvjax.lm import tiny


@pytest.mark.parametrize("text", ['{"version": "1.0", "model": 3}', '{"version": "1.0", "mod'])
def test_corrupt_tokenizer(broken, text):
  write(broken, "tokenizer.json", text)
  load_fails(lm.TokenizerError, broken, "tokenizer.json", "not a readable tokenizer")


def test_tokenizer_larger_than_vocab(broken):
  tok = tiny.byte_tokenizer()  # 258 tokens; the checkpoint's vocab_size is 320
  tok.tok.add_tokens([f"<extra_{i}>" for i in range(70)])
  tok.tok.save(os.path.join(broken, "tokenizer.json"))
  load_fails(lm.TokenizerError, broken, "tokenizer.json", "328 tokens", "vocab_size is 320")


def test_eos_token_not_in_vocab(broken):
  edit_json(broken, "tokenizer_config.json", lambda c: c.update(eos_token="<|eot_id|>"))
  load_fails(
    lm.TokenizerError,
    broken,
    "tokenizer_config.json",
    "eos_token '<|eot_id|>'",
    "not in the vocabulary",
    os.path.join(broken, "tokenizer.json"),
  )


@pytest.mark.parametrize("eos,bad", [(320, "[320]"), ([1, -1], "[-1]"), ("</s>", "['</s>']")])
def test_generation_config_eos_outside_vocab(broken, eos, bad):
  edit_json(broken, "generation_config.json", lambda c: c.update(eos_token_id=eos))
  load_fails(lm.ConfigError, broken, "generation_config.json", f"eos_token_id {bad}", "[0, 320)")


def test_config_eos_outside_vocab(broken):
  os.remove(os.path.join(broken, "generation_config.json"))
  edit_json(broken, "config.json", lambda c: c.update(eos_token_id=1000))
  load_fails(lm.ConfigError, broken, "config.json", "eos_token_id [1000]", "[0, 320)")


@pytest.mark.parametrize(
  "name,error",
  [("tokenizer_config.json", lm.TokenizerError), ("generation_config.json", lm.ConfigError)],
)
def test_side_file_invalid_json(broken, name, error):
  write(broken, name, "{")
  load_fails(error, broken, name, "invalid JSON")
