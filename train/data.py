"""Packed token batches from a corpus split: TFDS array_record source -> grain -> numpy.

Packing. The documents of a split (in the data source's fixed order, after the genre filter)
become one token stream `<s> d1 </s> <s> d2 </s> ...`. Row r is the window
stream[r T : r T + T + 1]: inputs = window[:-1], targets = window[1:], so consecutive rows share
one token and every target (every stream token but the first) occurs in exactly one row per
epoch; long documents span many rows, nothing is dropped. Only the last row is short; it is
padded (id 0, mask 0).

Batch (a dict of numpy arrays, B = batch_size, T = seq_len):
  inputs       int32   [B, T]
  targets      int32   [B, T]  targets[:, t] = the token after inputs[:, t]
  mask         float32 [B, T]  1 for a real target of the same document as its input; 0 for
                               padding and for the one target per boundary that crosses it
                               (input </s> -> target <s>). Predicting </s> after a document's
                               last token counts (mask 1, 0 chars); so does the first token
                               after <s>.
  chars        float32 [B, T]  characters of the document text the target token covers (0 for
                               <s>, </s>, padding); summed over a document's masked targets it is
                               len(text). Bits per character = sum(nll * mask) / ln 2 /
                               sum(chars * mask).
  segment_ids  int32   [B, T]  1, 2, ... per document inside the row (of the input token); 0 pad
  positions    int32   [B, T]  position of the input token inside its segment of the row

`batches` returns a `grain.MapDataset`: batch i is `ds[i]`, a pure function of (seed, i), so a
resumed run indexes on from its step; iterate with `iter(ds)`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence

import numpy as np

from kvjax.lm.tokenizer import Tokenizer
from kvjax.train import corpus
from kvjax.train.corpus import CorpusError

PAD = 0


@dataclasses.dataclass(frozen=True)
class SplitTokens:
  """A split as one token stream. tokens, chars, doc: [N]; doc[i] = document index of token i."""

  tokens: np.ndarray  # int32
  chars: np.ndarray  # float32
  doc: np.ndarray  # int32
  titles: tuple[str, ...]

  def n_rows(self, seq_len: int, bos: bool = False) -> int:
    """Rows of seq_len targets needed to cover the N - 1 targets (with bos rows, seq_len - 1
    real targets each)."""
    return -(-(len(self.tokens) - 1) // (seq_len - 1 if bos else seq_len))


def token_chars(offsets: np.ndarray, n_chars: int) -> np.ndarray:
  """chars [n] from char offsets [n, 2]: each character counts for the first token reaching it.

  SplitTokens sharing a character (byte pieces of one multi-byte character) count it once. Raises
  if the tokens do not reach the end of the text (a tokenizer that drops text).
  """
  ends = offsets[:, 1].astype(np.int64) if len(offsets) else np.zeros(0, np.int64)
  reach = np.maximum.accumulate(np.concatenate([[0], ends]))
  chars = reach[1:] - reach[:-1]
  if reach[-1] != n_chars:
    raise CorpusError(
      f"tokenizer offsets cover {reach[-1]} of {n_chars} characters; "
      "bits per character needs a tokenizer that keeps all text"
    )
  return chars.astype(np.float32)


def tokenize(texts: Sequence[str], tokenizer: Tokenizer, titles: Sequence[str] = ()) -> SplitTokens:
  """The stream <s> t1 </s> <s> t2 </s> ... of the texts (tokenized without the post-processor)."""
  if tokenizer.bos_id is None or tokenizer.eos_id is None:
    raise CorpusError(
      f"{tokenizer.source}: packing needs bos and eos tokens "
      "(tokenizer_config.json bos_token / eos_token)"
    )
  if not texts:
    raise CorpusError("no documents to tokenize")
  encs = tokenizer.tok.encode_batch(list(texts), add_special_tokens=False)
  tokens, chars, doc = [], [], []
  for i, (text, enc) in enumerate(zip(texts, encs)):
    tokens += [[tokenizer.bos_id], enc.ids, [tokenizer.eos_id]]
    c = token_chars(np.asarray(enc.offsets, np.int64).reshape(-1, 2), len(text))
    chars += [[0.0], c, [0.0]]
    doc.append(np.full(len(enc.ids) + 2, i, np.int32))
  cat = lambda parts, dt: np.concatenate([np.asarray(p, dt) for p in parts])
  return SplitTokens(
    cat(tokens, np.int32),
    cat(chars, np.float32),
    np.concatenate(doc),
    tuple(titles) or tuple(f"doc{i}" for i in range(len(texts))),
  )


def row(
  stream: SplitTokens, r: int, seq_len: int, bos_id: int | None = None
) -> dict[str, np.ndarray]:
  """Row r (a padding row if r >= n_rows): the dict of [T] arrays described in the docstring;
  with bos_id, a row that starts with it (`bos_row`)."""
  if bos_id is not None:
    return bos_row(stream, r, seq_len, bos_id)
  lo = r * seq_len
  hi = min(lo + seq_len + 1, len(stream.tokens))
  n = max(hi - lo - 1, 0)  # real targets in this row
  out = {
    "inputs": np.full(seq_len, PAD, np.int32),
    "targets": np.full(seq_len, PAD, np.int32),
    "mask": np.zeros(seq_len, np.float32),
    "chars": np.zeros(seq_len, np.float32),
    "segment_ids": np.zeros(seq_len, np.int32),
    "positions": np.zeros(seq_len, np.int32),
  }
  if n == 0:
    return out
  doc_in, doc_out = stream.doc[lo : lo + n], stream.doc[lo + 1 : hi]
  out["inputs"][:n] = stream.tokens[lo : lo + n]
  out["targets"][:n] = stream.tokens[lo + 1 : hi]
  out["mask"][:n] = doc_in == doc_out
  out["chars"][:n] = stream.chars[lo + 1 : hi]
  out["segment_ids"][:n], out["positions"][:n] = _segments(doc_in)
  return out


def _segments(doc_in: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(segment ids 1, 2, ..., position inside the segment) of a row's inputs, by document."""
  idx = np.arange(len(doc_in))
  starts = np.where(np.concatenate([[True], doc_in[1:] != doc_in[:-1]]), idx, 0)
  return doc_in - doc_in[0] + 1, idx - np.maximum.accumulate(starts)


def bos_row(stream: SplitTokens, r: int, seq_len: int, bos_id: int) -> dict[str, np.ndarray]:
  """Row r when every row starts with the BOS token, as real LMs are trained: the window
  w = stream[r (T - 1) : r (T - 1) + T], inputs = [BOS] + w[:-1], targets = w. The BOS input
  joins the segment of the token after it at position 0 (so a row that starts mid-document
  sees it at positions 1, 2, ...); its target w[0] is masked, being the last target of the
  row before. Every stream target thus counts once, with T - 1 per row. (A row whose window
  starts at a document's own <s> begins <s> <s>.)"""
  T = seq_len
  lo = r * (T - 1)
  hi = min(lo + T, len(stream.tokens))
  m = max(hi - lo, 0)
  out = {
    "inputs": np.full(T, PAD, np.int32),
    "targets": np.full(T, PAD, np.int32),
    "mask": np.zeros(T, np.float32),
    "chars": np.zeros(T, np.float32),
    "segment_ids": np.zeros(T, np.int32),
    "positions": np.zeros(T, np.int32),
  }
  if m < 2:
    return out
  docs = stream.doc[lo:hi]
  doc_in = np.concatenate([docs[:1], docs[:-1]])  # BOS takes the doc of the token after it
  out["inputs"][:m] = np.concatenate([[bos_id], stream.tokens[lo : hi - 1]])
  out["targets"][:m] = stream.tokens[lo:hi]
  out["mask"][1:m] = doc_in[1:] == docs[1:]
  out["chars"][:m] = stream.chars[lo:hi]
  out["segment_ids"][:m], out["positions"][:m] = _segments(doc_in)
  return out


def _stack(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def split_stream(
  source,
  split: str,
  tokenizer: Tokenizer,
  *,
  genres: Iterable[str] | None = None,
  exclude_genres: Iterable[str] | None = None,
  data_dir: str | None = None,
) -> SplitTokens:
  """The token stream of one split of a corpus (a name, a directory or a prepared builder)."""
  b = source if hasattr(source, "as_data_source") else corpus.builder(source, data_dir=data_dir)
  docs = corpus.load_documents(b, split, genres, exclude_genres)
  if not docs:
    raise CorpusError(
      f"split {split!r} of {b.builder_config.name} has no documents"
      + (f" with genres {list(genres)}" if genres is not None else "")
      + (f" without {list(exclude_genres)}" if exclude_genres else "")
    )
  return tokenize([d.text for d in docs], tokenizer, [d.title for d in docs])


def _check_shape(batch_size: int, seq_len: int) -> None:
  for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be a positive int; got {v!r}")


def batches(
  source: str | os.PathLike,
  split: str,
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  seq_len: int,
  seed: int = 0,
  genres: Iterable[str] | None = None,
  exclude_genres: Iterable[str] | None = None,
  shuffle: bool = True,
  repeat: bool = True,
  start: int = 0,
  data_dir: str | None = None,
  bos: bool = False,
):
  """grain.MapDataset of packed batches ([B, T] dicts, see module docstring) of one split.

  shuffle: rows in a fresh permutation each epoch (seeded by seed). repeat: endless epochs whose
  batches may straddle two epochs; else one epoch, the last batch padded with empty rows
  (mask 0). start: drop the first `start` batches (resume). bos: every row starts with the
  tokenizer's BOS token (`bos_row`). Deterministic for a seed.
  """
  import grain

  _check_shape(batch_size, seq_len)
  if bos and seq_len < 2:
    raise ValueError(f"rows that start with BOS need seq_len >= 2; got {seq_len}")
  stream = split_stream(
    source, split, tokenizer, genres=genres, exclude_genres=exclude_genres, data_dir=data_dir
  )
  bos_id = tokenizer.bos_id if bos else None
  n = stream.n_rows(seq_len, bos)
  if not repeat:
    n = -(-n // batch_size) * batch_size  # pad to whole batches with empty rows
  ds = grain.MapDataset.range(n)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  ds = ds.map(lambda r: row(stream, int(r), seq_len, bos_id)).batch(batch_size, batch_fn=_stack)
  return ds[start:] if start else ds


def eval_batches(
  source: str | os.PathLike,
  split: str,
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  seq_len: int,
  genres: Iterable[str] | None = None,
  exclude_genres: Iterable[str] | None = None,
  data_dir: str | None = None,
  bos: bool = False,
):
  """One pass over a split in order, no shuffling: every target exactly once (last batch padded)."""
  return batches(
    source,
    split,
    tokenizer,
    batch_size=batch_size,
    seq_len=seq_len,
    genres=genres,
    exclude_genres=exclude_genres,
    shuffle=False,
    repeat=False,
    data_dir=data_dir,
    bos=bos,
  )
