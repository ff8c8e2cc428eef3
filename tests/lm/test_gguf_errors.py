"""A GGUF file that is broken, or that kvjax cannot run, is refused in one error naming the file
and the key or tensor at fault (CheckpointError; TokenizerError for the tokenizer metadata)."""

import os
import pathlib
import shutil
import struct

import gguf_files
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hf_models import hf_model

from kvjax import lm


@pytest.fixture(scope="module")
def source():
  return hf_model("llama", rope_scaling=None)


@pytest.fixture(scope="module")
def good(source, tmp_path_factory):
  """A valid tiny llama GGUF file (F32, byte-level BPE)."""
  return gguf_files.write(source, str(tmp_path_factory.mktemp("good") / "good.gguf"))


@pytest.fixture
def write(source, tmp_path):
  """write(**gguf_files.write keywords) -> path of a tiny llama GGUF file built that way."""
  return lambda **kw: gguf_files.write(source, str(tmp_path / "bad.gguf"), **kw)


def edited(good: str, tmp_path, edit) -> str:
  """A copy of the good file with edit(bytearray) applied."""
  data = bytearray(pathlib.Path(good).read_bytes())
  edit(data)
  path = tmp_path / "edited.gguf"
  path.write_bytes(data)
  return str(path)


def inside_index(good: str) -> int:
  """An offset inside the good file's tensor index: just after one tensor's name."""
  data = pathlib.Path(good).read_bytes()
  name = b"blk.2.ffn_down.weight"
  return data.index(name) + len(name)


@pytest.mark.parametrize("where", ["magic", "counts", "metadata", "index", "data"])
def test_truncated_file(good, tmp_path, where):
  size = os.path.getsize(good)
  cut = {
    "magic": 2,
    "counts": 12,
    "metadata": size // 100,
    "index": inside_index(good),
    "data": size - 1,
  }[where]
  path = edited(good, tmp_path, lambda d: d.__delitem__(slice(cut, None)))
  with pytest.raises(lm.CheckpointError, match=r"edited\.gguf: truncated: .* but the file has"):
    lm.load(path)


def test_not_a_gguf_file(good, tmp_path):
  with pytest.raises(lm.CheckpointError, match=r"not a GGUF file \(magic b'GGUG'"):
    lm.load(edited(good, tmp_path, lambda d: d.__setitem__(slice(0, 4), b"GGUG")))
  (tmp_path / "empty.gguf").write_bytes(b"")
  with pytest.raises(lm.CheckpointError, match="empty file"):
    lm.load(str(tmp_path / "empty.gguf"))


def test_unsupported_version(good, tmp_path):
  path = edited(good, tmp_path, lambda d: d.__setitem__(slice(4, 8), struct.pack("<I", 1)))
  with pytest.raises(lm.CheckpointError, match=r"GGUF version 1 is not supported"):
    lm.load(path)


@pytest.mark.parametrize(
  ("arch", "message"),
  [
    ("mamba", r"general.architecture 'mamba' is not supported; kvjax reads \['gemma3', "),
  ],
)
def test_unknown_architecture(write, arch, message):
  with pytest.raises(lm.CheckpointError, match=message):
    lm.load(write(metadata={"general.architecture": arch}))


def tensor_type_at(data: bytes, name: bytes) -> int:
  """The offset of tensor `name`'s ggml type in the index (after its u32 n_dims, u64 dims)."""
  at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
  n_dims = struct.unpack_from("<I", data, at)[0]
  return at + 4 + 8 * n_dims


@pytest.mark.parametrize(
  ("type_id", "message"),
  [
    (99, r"tensor 'output_norm.weight' has unknown ggml type id 99"),
    (int(T.IQ4_XS), r"tensor 'output_norm.weight' has type IQ4_XS, which kvjax does not read"),
  ],
)
def test_unknown_tensor_type(good, tmp_path, type_id, message):
  def edit(d):
    at = tensor_type_at(bytes(d), b"output_norm.weight")
    d[at : at + 4] = struct.pack("<I", type_id)

  with pytest.raises(lm.CheckpointError, match=message):
    lm.load(edited(good, tmp_path, edit))


def test_missing_and_extra_tensors(write, source):
  with pytest.raises(lm.CheckpointError, match=r"missing tensor 'blk.1.ffn_up.weight'"):
    lm.load(write(drop=("blk.1.ffn_up.weight",)))
  bias = np.zeros(64, np.float32)
  with pytest.raises(
    lm.CheckpointError,
    match=r"1 tensor\(s\) that a llama model with this metadata does not have: "
    r"'blk.0.attn_q.bias'",
  ):
    lm.load(write(extra={"blk.0.attn_q.bias": bias}))


def test_tensor_shape_disagrees_with_metadata(write):
  with pytest.raises(
    lm.CheckpointError,
    match=r"tensor 'blk.0.ffn_gate.weight' has shape \[128, 64\] \(ggml dims \[64, 128\]\); "
    r"the metadata implies \[96, 64\]",
  ):
    lm.load(write(metadata={"llama.feed_forward_length": 96}))
  with pytest.raises(lm.CheckpointError, match=r"tensor 'token_embd.weight' has shape \[320, 64\]"):
    lm.load(write(metadata={"llama.vocab_size": 330}))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight(write, source, bad):
  w = gguf_files.permute(source.model.layers[2].self_attn.k_proj.weight.detach().numpy(), 2)
  w = w.copy()
  w[3, 5] = bad
  path = write(extra={"blk.2.attn_k.weight": w})
  with pytest.raises(
    lm.CheckpointError, match=r"tensor 'blk.2.attn_k.weight' holds 1 non-finite value\(s\)"
  ):
    lm.load(path)
  lm.load(path, check_finite=False)  # loads when asked not to check


@pytest.mark.parametrize(
  ("metadata", "message"),
  [
    ({"llama.attention.head_count": 0}, r"llama.attention.head_count must be an int >= 1; got 0"),
    (
      {"llama.attention.layer_norm_rms_epsilon": -1.0},
      r"llama.attention.layer_norm_rms_epsilon must be a finite number > 0",
    ),
    ({"llama.block_count": None}, r"no llama.block_count in the metadata"),
    (
      {"llama.attention.head_count_kv": [2, 1, 2]},
      r"llama.attention.head_count_kv varies by layer",
    ),
    ({"llama.rope.dimension_count": 8}, r"llama.rope.dimension_count is 8, but the heads have 16"),
    ({"llama.rope.scaling.type": "yarn"}, r"llama.rope.scaling.type 'yarn' is not supported"),
    ({"split.count": 3}, r"part 1 of a GGUF file split in 3"),
    ({"llama.expert_count": 8}, r"llama.expert_count is 8: mixture-of-experts llama files"),
  ],
)
def test_metadata_kvjax_cannot_run(write, metadata, message):
  with pytest.raises(lm.CheckpointError, match=message):
    lm.load(write(metadata=metadata))


def test_rope_freqs_that_are_not_llama3(write):
  with pytest.raises(lm.CheckpointError, match=r"'rope_freqs.weight' holds RoPE divisors that no"):
    lm.load(write(extra={"rope_freqs.weight": np.linspace(1, 9, 8).astype(np.float32)[::-1]}))


@pytest.mark.parametrize(
  ("metadata", "message"),
  [
    ({"tokenizer.ggml.pre": "falcon"}, r"tokenizer.ggml.pre 'falcon' \(the pre-tokenizer\) is not"),
    ({"tokenizer.ggml.model": "bert"}, r"tokenizer.ggml.model 'bert' is not supported"),
    ({"tokenizer.ggml.eos_token_id": 999}, r"tokenizer.ggml.eos_token_id 999 is not a token id"),
    (
      {"tokenizer.ggml.merges": ["Ġ zz"]},
      r"tokenizer.ggml.merges do not fit tokenizer.ggml.tokens",
    ),
    ({"tokenizer.ggml.tokens": None}, r"no tokenizer.ggml.tokens"),
  ],
)
def test_tokenizer_metadata(write, metadata, message):
  with pytest.raises(lm.TokenizerError, match=message):
    lm.load(write(metadata=metadata), weights=False)


def test_directories(good, tmp_path, source):
  """A directory with several .gguf files and no config.json is refused; with a config.json it
  is a Hugging Face directory, whatever .gguf files it also holds."""
  for name in ("a.gguf", "b.gguf"):
    shutil.copy(good, tmp_path / name)
  with pytest.raises(lm.CheckpointError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\)"):
    lm.load(str(tmp_path))
  source.save_pretrained(tmp_path)
  assert lm.load(str(tmp_path), weights=False).path == str(tmp_path)
