"""Fixtures of the command-line tests: a tiny random model saved as a model directory."""

import pytest

from kvjax import lm
from kvjax.lm import tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """The default tiny random model (`kvjax.lm.tiny.model()`) saved with its tokenizer."""
  path = str(tmp_path_factory.mktemp("tiny"))
  lm.save(tiny.model(), path)
  return path
