"""Generated token ids back to text: whole rows cut at their stop strings (`outputs`), or
incrementally for streaming (`detokenize`, over a `Detokenizer`), and the decode time of a
stream (`timed`).

Incremental detokenisation: token ids in, final text out, with bounded work per token.
Decoding a whole reply after every token costs O(n) per token (O(n^2) for a stream). A
`Detokenizer` decodes only a short window of recent ids: the ids of the last piece it emitted
(context, so decoders that treat the start of a text specially, e.g. SentencePiece's leading
space, see the same start twice) and the ids since. The piece it emits is the window's text
past the context's text. A window whose text ends in U+FFFD (an unfinished UTF-8 character
split over tokens, or a BPE byte sequence still open) is held until the character is complete;
after `max_hold` held tokens it emits up to the last token boundary whose text is final.

Invariant: the concatenation of every piece `push` returned and `flush`'s is
`tokenizer.decode(ids)` for the ids pushed, for every decoder whose text for a sequence is its
text for a prefix followed by more (byte-level BPE, SentencePiece/Metaspace, WordPiece). One
exception: `ByteFallback` decodes a run of byte tokens that is not valid UTF-8 as one U+FFFD
per byte, so where such a run starts with a complete character the stream shows that
character and the whole decode does not.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np

from kvjax.lm.engine import require_tokenizer
from kvjax.lm.model import Model


class Detokenizer:
  """tokenizer: anything with `decode(ids) -> str` (`kvjax.lm.tokenizer.Tokenizer`).
  max_hold: most tokens held while their text is unfinished (bounds the work per token)."""

  def __init__(self, tokenizer, *, max_hold: int = 8):
    self.decode = tokenizer.decode
    self.max_hold = max_hold
    self.window: list[int] = []  # context ids (already emitted), then ids not yet emitted
    self.read = 0  # window[:read] is the context
    self.base = ""  # decode(window[:read])

  def push(self, token: int) -> str:
    """Adds one id; returns the text that became final ('' while a character is unfinished)."""
    self.window.append(token)
    text = self.decode(self.window)
    if not text.endswith("\ufffd"):
      return self._emit(len(self.window), text)
    if len(self.window) - self.read <= self.max_hold:
      return ""
    # too long unfinished: emit up to the last boundary whose text the later ids cannot change
    # (a UTF-8 sequence is at most 4 bytes, so 3 tokens later it is complete or invalid)
    for j in range(len(self.window) - 1, self.read, -1):
      head = self.decode(self.window[:j])
      if text.startswith(head) and (not head.endswith("\ufffd") or j <= len(self.window) - 3):
        return self._emit(j, head)
    return ""

  def flush(self) -> str:
    """The text of the ids still held (call once, at the end)."""
    if len(self.window) == self.read:
      return ""
    return self._emit(len(self.window), self.decode(self.window))

  def _emit(self, j: int, text: str) -> str:
    """Emits text = decode(window[:j]) past the context; window[read:j] becomes the context."""
    piece = text[len(self.base) :]
    self.window = self.window[self.read :]
    self.read = j - self.read
    self.base = self.decode(self.window[: self.read])
    return piece


def _cut_at_stop(model: Model, ids: list[int], stop: Sequence[str]) -> tuple[str, list[int], bool]:
  """Text before the first stop string, and the shortest token prefix that produces it."""
  text = model.tokenizer.decode(ids)
  cut = _first_stop(text, stop)
  if cut < 0:
    return text, ids, False
  lo, hi = 1, len(ids)  # smallest n whose decode reaches past the cut point with a stop string
  while lo < hi:
    mid = (lo + hi) // 2
    t = model.tokenizer.decode(ids[:mid])
    if any(s in t[cut:] for s in stop if s):
      hi = mid
    else:
      lo = mid + 1
  return text[:cut], ids[:lo], True


def outputs(
  model: Model, out: np.ndarray, counts: np.ndarray, stop: Sequence[str], stop_ids: Sequence[int]
) -> tuple[list[str], list[list[int]], list[str]]:
  """(texts, tokens, finish) of generated rows out [B, >= counts] cut at counts [B], as
  `Generation` reports them."""
  texts, tokens, finish = [], [], []
  for b in range(len(counts)):
    ids = out[b, : counts[b]].tolist()
    hit_stop = bool(ids) and ids[-1] in stop_ids
    reason = "stop_token" if hit_stop else "length"
    text = ""
    if model.tokenizer is not None:
      text, ids_cut, cut = _cut_at_stop(model, ids[:-1] if hit_stop else ids, stop)
      if cut:
        ids, reason = ids_cut, "stop_string"
    texts.append(text)
    tokens.append(ids)
    finish.append(reason)
  return texts, tokens, finish


def timed(pieces: Iterator[str], stats: dict) -> Iterator[str]:
  """Yields pieces, adding to stats["decode_s"] the seconds spent producing each (decode steps,
  detokenisation, stop checks), less the compile seconds the producer added to
  stats["compile_s"] meanwhile. The consumer's time between pieces is not counted."""
  pieces = iter(pieces)
  while True:
    t0, c0 = time.perf_counter(), stats["compile_s"]
    piece = next(pieces, None)
    stats["decode_s"] += time.perf_counter() - t0 - (stats["compile_s"] - c0)
    if piece is None:
      return
    yield piece


def detokenize(
  model: Model,
  tokens: Iterator[int],
  stop: Sequence[str],
  stop_ids: set[int],
  done: dict,
  *,
  keep_ids: bool = True,
) -> Iterator[str]:
  """Yields the text of `tokens` as it becomes final, pulling one token per piece: it ends at a
  stop token or a stop string (neither yielded) or when `tokens` runs out ("length"). Text that
  may start a stop string or an unfinished UTF-8 character is held back until it is decided.
  Fills `done` with n (tokens pulled, a stop token included), finish and, with keep_ids, ids
  (those tokens; an endless stream that needs none keeps constant memory without them).

  Work per token is bounded (`Detokenizer` decodes a short window of recent ids; stop strings
  are searched in the text not yet yielded, at most the longest stop string plus one piece),
  so an endless stream costs the same per token at its millionth token as at its first."""
  ids: list[int] = []
  done.update(n=0, finish="length", **({"ids": ids} if keep_ids else {}))
  text = Detokenizer(require_tokenizer(model, "detokenisation"))
  hold = max((len(s) for s in stop), default=1) - 1  # chars that may start a stop string
  pending = ""  # decoded, not yet yielded: every stop string that starts here is still unseen
  for tok in tokens:
    done["n"] += 1
    if keep_ids:
      ids.append(tok)
    if tok in stop_ids:
      done["finish"] = "stop_token"
      break
    pending += text.push(tok)
    at = _first_stop(pending, stop)
    if at >= 0:
      done["finish"] = "stop_string"
      if at:
        yield pending[:at]
      return
    if len(pending) > hold:
      yield pending[: len(pending) - hold]
      pending = pending[len(pending) - hold :]
  pending += text.flush()
  at = _first_stop(pending, stop)
  if at >= 0:
    done["finish"] = "stop_string"
    pending = pending[:at]
  if pending:
    yield pending


def _first_stop(text: str, stop: Sequence[str]) -> int:
  """Where the first (non-empty) stop string in text starts, or -1."""
  return min((text.find(s) for s in stop if s and s in text), default=-1)
