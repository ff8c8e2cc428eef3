"""Incremental detokenisation (`kvjax.lm.detokenize.Detokenizer`, `detokenize.detokenize`): the text
of a stream equals the decode of its ids, stop strings and stop tokens end it where `generate`
would, and the work per token is bounded however long the stream runs."""

import types

import hypothesis
import pytest
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from kvjax import lm
from kvjax.lm import tiny
from kvjax.lm.detokenize import Detokenizer, detokenize
from kvjax.lm.model import resolve
from kvjax.lm.tokenizer import Tokenizer

SETTINGS = hypothesis.settings(max_examples=150, derandomize=True, database=None, deadline=None)
BYTE = tiny.byte_tokenizer()
TEXT_ONLY = types.SimpleNamespace(tokenizer=BYTE, path=None)  # all detokenize reads
EURO = [8, 9, 10]  # the SentencePiece tokenizer's byte tokens of "€" (E2 82 AC)


def sentencepiece() -> Tokenizer:
  """A Llama-2-style tokenizer: Metaspace pieces, byte fallback, the leading space stripped."""
  vocab = {
    "<unk>": 0,
    "▁": 1,
    "a": 2,
    "b": 3,
    "▁a": 4,
    "▁b": 5,
    "ab": 6,
    "▁ab": 7,
    "<0xE2>": 8,
    "<0x82>": 9,
    "<0xAC>": 10,
    "c": 11,
  }
  tok = HFTokenizer(
    models.BPE(
      vocab=vocab,
      merges=[("a", "b"), ("▁", "a"), ("▁", "b"), ("▁a", "b")],
      unk_token="<unk>",
      byte_fallback=True,
    )
  )
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Sequence(
    [
      decoders.Replace("▁", " "),
      decoders.ByteFallback(),
      decoders.Fuse(),
      decoders.Strip(" ", 1, 0),
    ]
  )
  return Tokenizer(tok)


SENTENCEPIECE = sentencepiece()


def streamed(tok, ids, **kw) -> tuple[list[str], Detokenizer]:
  d = Detokenizer(tok, **kw)
  pieces = [d.push(i) for i in ids]
  return pieces + [d.flush()], d


@SETTINGS
@hypothesis.given(st.lists(st.integers(0, 257), max_size=120))
def test_byte_level_stream_equals_the_whole_decode(ids):
  """Random bytes: split multi-byte characters, invalid sequences, special tokens."""
  pieces, _ = streamed(BYTE, ids)
  assert "".join(pieces) == BYTE.decode(ids)


@SETTINGS
@hypothesis.given(
  st.lists(st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 11]), st.just(-1)), max_size=120)
)
def test_sentencepiece_stream_keeps_its_spaces(ids):
  """A decoder that strips the leading space of a text keeps every later one in a stream
  (the window keeps context), and byte-fallback characters arrive whole."""
  ids = [i for t in ids for i in (EURO if t == -1 else [t])]
  pieces, _ = streamed(SENTENCEPIECE, ids)
  assert "".join(pieces) == SENTENCEPIECE.decode(ids)


def test_a_split_character_arrives_once_complete():
  ids = BYTE.encode("a€b", add_special_tokens=False)  # one id per byte: "€" is three
  pieces, _ = streamed(BYTE, ids)
  assert pieces == ["a", "", "", "€", "b", ""]


def test_unfinished_bytes_are_released_after_max_hold():
  """Lead bytes that never complete are not held forever: after max_hold tokens the text up to
  a boundary the later ids cannot change is emitted, and the stream still equals the decode."""
  lead = BYTE.encode("\u20ac", add_special_tokens=False)[0]  # 0xE2 alone: never completed
  ids = [lead] * 40
  pieces, d = streamed(BYTE, ids, max_hold=4)
  assert "".join(pieces) == BYTE.decode(ids)
  assert sum(bool(p) for p in pieces[:-1]) >= 5  # released along the way, not only at the end
  assert len(d.window) <= 4 + 4


class Counting:
  """A tokenizer that records the length of every decode."""

  def __init__(self, tok):
    self.tok, self.lengths = tok, []

  def decode(self, ids, skip_special_tokens=True):
    self.lengths.append(len(ids))
    return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_work_per_token_is_bounded():
  """20,000 tokens of real text (the bundled tokenizer) and of raw bytes through the stream
  detokeniser every streaming path uses: no decode ever sees more than a few ids, and decodes
  per token stay constant (a whole-reply decode per token,
  the old cost, would reach 20,000 ids)."""
  shakespeare = Tokenizer.load(resolve("shakespeare")[0])
  text = (
    "ROMEO: But soft, what light through yonder window breaks? It is the east, and "
    "Juliet is the sun. \u00e6\u00f8 \u20ac "
  ) * 150
  for tok, ids in (
    (shakespeare, shakespeare.encode(text)[:20000]),
    (BYTE, BYTE.encode(text, add_special_tokens=False)[:20000]),
  ):
    counting = Counting(tok)
    streams = types.SimpleNamespace(tokenizer=counting, path=None)
    text = "".join(detokenize(streams, iter(ids), ["\n\n\n"], {-1}, {}))
    assert text == tok.decode(ids)
    assert max(counting.lengths) <= 16 and len(counting.lengths) <= 3 * len(ids) + 1


def test_stop_token_keeps_the_held_text():
  """Text held back because it might start a stop string is still yielded when a stop token
  ends the stream (it used to be dropped)."""
  ids = BYTE.encode("abcdef", add_special_tokens=False) + [1]
  done = {}
  text = "".join(detokenize(TEXT_ONLY, iter(ids), ["xyz"], {1}, done))
  assert text == "abcdef" and done["finish"] == "stop_token" and done["ids"] == ids


@pytest.mark.parametrize(
  "stop,want,finish",
  [
    (["cd"], "ab€", "stop_string"),
    (["€"], "ab", "stop_string"),  # a stop string made of a split character
    (["b€c"], "a", "stop_string"),  # spanning pieces
    (["zz"], "ab€cd", "length"),
  ],
)
def test_stop_strings_across_pieces(stop, want, finish):
  ids = BYTE.encode("ab€cd", add_special_tokens=False)
  done = {}
  pieces = list(detokenize(TEXT_ONLY, iter(ids), stop, set(), done))
  assert "".join(pieces) == want and done["finish"] == finish
  assert all(pieces)


def test_stream_matches_generate_with_stop_strings():
  """generate_iter's text, cut at a stop string, is generate's (the same greedy tokens)."""
  model = tiny.model(n_layers=1)
  free = lm.generate(model, "to be", max_new_tokens=40, stop_tokens=())
  needle = free.texts[0][20:22]
  got = "".join(lm.generate_iter(model, "to be", max_new_tokens=40, stop_tokens=(), stop=[needle]))
  want = lm.generate(model, "to be", max_new_tokens=40, stop_tokens=(), stop=[needle])
  assert got == want.texts[0] and needle not in got
