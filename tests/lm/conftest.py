"""Fixtures of the lm core's tests: the tiny Hugging Face llama checkpoint and copies to break."""

import shutil

import pytest

from kvjax import lm


@pytest.fixture(scope="module")
def src(hf_dir):
  return hf_dir("llama")


@pytest.fixture(scope="module")
def model(src):
  """The intact tiny llama: vocab 320, 3 layers, d_model 64, 512 positions, eos 2."""
  return lm.load(src)


@pytest.fixture
def broken(src, tmp_path):
  """A fresh copy of the tiny llama checkpoint to break one file of."""
  return shutil.copytree(src, str(tmp_path / "model"))
