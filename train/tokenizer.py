"""Byte-level BPE tokenizers trained with `tokenizers`, saved so that `kvjax.lm` loads them.

Layout of a trained vocabulary: id 0 is <s>, id 1 is </s>, then the 256 byte symbols, then the
merges in the order learnt. Encoding adds <s> in front (the post-processor), like
`kvjax.lm.tiny.byte_tokenizer`; decoding inverts encoding exactly for any text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from kvjax.lm.tokenizer import Tokenizer
from kvjax.train import corpus

BOS, EOS = "<s>", "</s>"
N_BASE = 2 + 256  # specials + byte alphabet: the smallest vocabulary


def train_tokenizer(
  texts: Iterable[str],
  vocab_size: int = 4096,
  *,
  min_frequency: int = 2,
  show_progress: bool = False,
) -> Tokenizer:
  """Byte-level BPE with vocab_size ids (fewer if the texts run out of pairs seen min_frequency
  times). Pass only training text: validation/test text must not shape the vocabulary."""
  from tokenizers import (
    Tokenizer as HFTokenizer,
  )
  from tokenizers import (
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
  )

  if vocab_size < N_BASE:
    raise ValueError(
      f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
      f"{N_BASE} (2 special tokens + 256 bytes)"
    )
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError("train_tokenizer: no (non-empty) texts to train on")
  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=min_frequency,
    special_tokens=[BOS, EOS],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=show_progress,
  )
  tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
  tok.post_processor = processors.TemplateProcessing(
    single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
  )
  assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1, "specials must be ids 0, 1"
  return Tokenizer(tok, bos=BOS, eos=EOS)


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
  """Writes path/tokenizer.json and path/tokenizer_config.json (read by Tokenizer.load and by
  transformers' PreTrainedTokenizerFast)."""
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  tok.tok.save(os.path.join(path, "tokenizer.json"))
  conf = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": tok.bos,
    "eos_token": tok.eos,
    "add_bos_token": True,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 1 << 30,
  }
  if tok.chat_template is not None:
    conf["chat_template"] = tok.chat_template
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(conf, f, indent=2)


def corpus_tokenizer(
  source="shakespeare",
  vocab_size: int = 4096,
  *,
  data_dir: str | None = None,
  show_progress: bool = True,
) -> Tokenizer:
  """A tokenizer trained on the train split (all genres) of a corpus (see kvjax.train.corpus)."""
  b = corpus.builder(source, data_dir=data_dir)
  texts = [d.text for d in corpus.load_documents(b, "train")]
  return train_tokenizer(texts, vocab_size, show_progress=show_progress)
