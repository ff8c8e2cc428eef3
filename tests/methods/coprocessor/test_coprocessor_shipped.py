"""The shipped coprocessors for the bundled `shakespeare` model: names, loading, use (their size
counts in tests/lm/test_bundled.py's 80 MB budget)."""

import json

import numpy as np
import pytest
from helpers import cli

from kvjax import coprocessor as cp
from kvjax import lm


def test_names_and_configs():
  assert cp.shipped() == ("shakespeare-16", "shakespeare-8")
  base = lm.load("shakespeare")
  for name, n in (("shakespeare-8", 8), ("shakespeare-16", 16)):
    cop = cp.load(name, base)
    assert cop.n_latents == n and cop.cc.kind == "coprocessor" and cop.cc.init == "lora"
    assert cop.cc.base_name == "shakespeare" and cop.soft.dtype == base.dtype
  other = lm.load("shakespeare-comedy")  # same architecture, other weights: refused by default
  with pytest.raises(cp.CoprocessorError, match="trained against other params"):
    cp.load("shakespeare-8", other)


def test_cli_generate_with_a_shipped_coprocessor_equals_the_library():
  code, out, err = cli(
    "generate",
    "--model",
    "shakespeare",
    "--coprocessor",
    "shakespeare-16",
    "--prompt",
    "ROMEO.",
    "--max-new-tokens",
    12,
    "--json",
  )
  assert code == 0, err
  base = lm.load("shakespeare")
  want = cp.generate(base, cp.load("shakespeare-16", base), "ROMEO.", max_new_tokens=12)
  got = json.loads(out)
  assert got["tokens"] == want.tokens and got["coprocessor"] == "shakespeare-16"
  assert np.isfinite(got["decode_tokens_per_s"])
