"""Incremental detokenisation: token ids in, final text out, with bounded work per token.

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
