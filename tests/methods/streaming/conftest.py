"""Fixtures of the StreamingLLM tests: a one-layer tiny llama, and that model saved."""

import pytest

from kvjax import lm
from kvjax.lm import tiny


@pytest.fixture(scope="module")
def one_layer():
  return tiny.model(n_layers=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_layer):
  """one_layer saved (`lm.save`), for the commands."""
  path = tmp_path_factory.mktemp("stream") / "model"
  lm.save(one_layer, str(path))
  return str(path)
