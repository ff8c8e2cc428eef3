"""Tokenizers built from a GGUF file's tokenizer.ggml.* metadata against transformers' GGUF
tokenizer on the same file: byte-level BPE under each supported pre-tokenizer, SentencePiece BPE
with and without the space prefix (merges ranked by score, or by file position for Gemma)."""

import os

import gguf_files
import pytest
from hf_models import hf_model

from kvjax import lm

TEXTS = [
  "hello the world and the end",
  "  two  spaces\n\n\ttab  \n",
  "héllo ünïcode 日本語 🙂 ä",
  "def f(x):\n    return x**2  # 12345\n\tpass",
  "year 2024, 3.14159; $1,000.00!",
  "<|im_start|>user\nhi<|im_end|>\n<think>and</think>",
  "<s>x</s> <start_of_turn>hi<end_of_turn>",
  " leading and trailing ",
  "",
  "it's I'm we'll they've",
  "tabs\tand\r\nCRLF\n\n\n\nnewlines",
  "hello" * 12,
]
# name -> (family, gguf_files.write keywords)
FILES = {
  "gpt2-smollm": ("llama", dict(tokenizer="gpt2", pre="smollm")),
  "gpt2-default": ("llama", dict(tokenizer="gpt2", pre="default")),
  "gpt2-llama-bpe": ("llama", dict(tokenizer="gpt2", pre="llama-bpe")),
  "gpt2-qwen2": ("qwen2", dict(tokenizer="gpt2", pre="qwen2")),
  "spm-llama": ("llama", dict(tokenizer="spm")),
  "spm-gemma3": ("gemma3_text", dict(tokenizer="spm")),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """name -> (kvjax Tokenizer, transformers tokenizer) of one file."""
  import transformers

  made = {}

  def get(name):
    if name not in made:
      family, keywords = FILES[name]
      path = str(tmp_path_factory.mktemp(name) / f"{name}.gguf")
      gguf_files.write(hf_model(family), path, **keywords)
      made[name] = (
        lm.load(path, weights=False).tokenizer,
        transformers.AutoTokenizer.from_pretrained(
          os.path.dirname(path), gguf_file=os.path.basename(path)
        ),
      )
    return made[name]

  return get


@pytest.mark.parametrize("name", FILES)
def test_encode_and_decode_as_transformers(pair, name):
  ours, theirs = pair(name)
  assert ours.vocab_size == len(theirs)
  for text in TEXTS:
    for special in (True, False):
      ids = ours.encode(text, add_special_tokens=special)
      assert ids == theirs.encode(text, add_special_tokens=special), (text, special)
      for skip in (True, False):
        want = theirs.decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids, skip_special_tokens=skip) == want, (text, skip)


def test_special_tokens(pair):
  """Control tokens stay whole and are dropped by skip_special_tokens; user-defined ones stay
  whole and are kept; SentencePiece files add BOS (add_bos_token), byte-level ones here not."""
  bpe, _ = pair("gpt2-smollm")
  ids = bpe.encode("<|im_start|>hi<think>")
  assert ids[0] == 1 and bpe.tok.id_to_token(ids[-1]) == "<think>"
  assert bpe.decode(ids) == "hi<think>"
  assert (bpe.bos, bpe.eos, bpe.unk, bpe.pad) == (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_end|>",
  )
  spm, _ = pair("spm-llama")
  assert spm.encode("hello")[0] == spm.bos_id == 1
  assert [spm.tok.id_to_token(i) for i in spm.encode("hello")[1:]] == ["▁", "hello"]  # prefix
  gemma, _ = pair("spm-gemma3")
  assert gemma.encode("hello")[0] == gemma.bos_id == 2
  assert [gemma.tok.id_to_token(i) for i in gemma.encode("hello")[1:]] == ["hello"]  # none


def test_smollm_isolates_every_numeral_as_llama_cpp_does(pair):
  """llama.cpp's "smollm" pre-tokenizer splits each \\p{N} character off before GPT-2's regex
  (SmolLM's own tokenizer.json: Digits(individual_digits)). transformers' GGUF tokenizer keeps
  GPT-2's regex only: the same tokens where no merge joins a numeral to its neighbours (SmolLM2's
  vocabulary has none for ASCII digits), not for other numerals: " ½" is "Ġ", "Â", "½" here
  and "ĠÂ", "½" under GPT-2's regex, where the merge "Ġ Â" applies."""
  ours, _ = pair("gpt2-smollm")
  assert [ours.tok.id_to_token(i) for i in ours.encode(" 12 the")] == ["Ġ", "1", "2", "Ġthe"]
  assert [ours.tok.id_to_token(i) for i in ours.encode(" ½")] == ["Ġ", "Â", "½"]
  gpt2, _ = pair("gpt2-default")
  assert [gpt2.tok.id_to_token(i) for i in gpt2.encode(" ½")] == ["ĠÂ", "½"]
