"""One plain-text file as training data: tokenised once, cut into windows, served as batches.

The file is a single document: BOS, then its tokens. Windows of T + 1 tokens start every T
tokens (consecutive windows share one token, so every token after the first is a target once).
The last `eval_fraction` of the windows is held out for evaluation. Train batch i is a
deterministic function of (seed, i): the windows in epoch-wise permutations seeded by
(seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would.

Batch contract (shared with `kvjax.train.data`): a dict of numpy arrays
  inputs [B, T] int32, targets [B, T] int32, mask [B, T] float32 (1 = a real target),
  chars [B, T] float32 (characters of text each target covers).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import numpy as np

from kvjax.lm.tokenizer import Tokenizer


class DataError(ValueError):
  """Training text that cannot be used (missing, empty, too short for one batch)."""


def encode(text: str, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """text -> (tokens [N] int32, chars [N] float32): chars[n] counts the characters token n
  adds beyond those already covered (0 for special tokens); chars.sum() == len(text)."""
  enc = tokenizer.tok.encode(text)
  tokens = np.asarray(enc.ids, np.int32)
  ends = np.maximum.accumulate(np.asarray([e for _, e in enc.offsets], np.int64))
  chars = np.diff(ends, prepend=0).astype(np.float32)
  return tokens, chars


@functools.lru_cache(maxsize=8)
def permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of n training rows in one epoch: a function of (seed, epoch) only, so a resumed
  run sees the batches it would have seen (cached: consecutive steps read the same epoch)."""
  return np.random.default_rng((seed, epoch)).permutation(n)


class TextData:
  """Windows of one tokenised text file; see the module docstring."""

  def __init__(
    self,
    path: str,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    eval_fraction: float = 0.1,
  ):
    if not os.path.isfile(path):
      raise DataError(f"--text {path!r}: no such file")
    with open(path, encoding="utf-8") as f:
      text = f.read()
    if not text.strip():
      raise DataError(f"--text {path!r}: the file is empty")
    tokens, chars = encode(text, tokenizer)
    T = seq_len
    n = (len(tokens) - 1) // T
    n_eval = max(1, round(n * eval_fraction)) if eval_fraction > 0 else 0
    if n - n_eval < 1:
      raise DataError(
        f"--text {path!r}: {len(tokens)} tokens make {n} windows of "
        f"{T} + 1 tokens; need at least {n_eval + 1} (train + eval): use a longer "
        "file or a smaller --seq-len"
      )
    starts = np.arange(n) * T
    idx = starts[:, None] + np.arange(T + 1)[None, :]
    self.windows = tokens[idx]  # [W, T + 1]
    self.window_chars = chars[idx][:, 1:]  # [W, T]: chars of each target
    self.n_train = n - n_eval
    self.seq_len, self.batch_size, self.seed = T, batch_size, seed
    self.n_tokens, self.n_chars = len(tokens), len(text)

  def _perm(self, epoch: int) -> np.ndarray:
    return permutation(self.seed, epoch, self.n_train)

  def _batch(self, rows: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
    """rows [B] window indices; valid [B] bool (False rows are padding with mask 0)."""
    w = self.windows[rows]
    mask = np.broadcast_to(valid[:, None], (len(rows), self.seq_len)).astype(np.float32)
    return {
      "inputs": w[:, :-1].astype(np.int32),
      "targets": w[:, 1:].astype(np.int32),
      "mask": mask,
      "chars": self.window_chars[rows].astype(np.float32),
    }

  def batch(self, i: int) -> dict[str, np.ndarray]:
    """Train batch i (a pure function of seed and i)."""
    B = self.batch_size
    rows = [self._perm(k // self.n_train)[k % self.n_train] for k in range(i * B, (i + 1) * B)]
    return self._batch(np.asarray(rows), np.ones(B, bool))

  def train_batches(self, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches start, start + 1, ... forever."""
    i = start
    while True:
      yield self.batch(i)
      i += 1

  def eval_batches(self) -> list[dict[str, np.ndarray]]:
    """Every held-out window once; the last batch is padded with mask-0 rows."""
    held = np.arange(self.n_train, len(self.windows))
    out = []
    for s in range(0, len(held), self.batch_size):
      rows = held[s : s + self.batch_size]
      valid = np.ones(self.batch_size, bool)
      valid[len(rows) :] = False
      rows = np.pad(rows, (0, self.batch_size - len(rows)), constant_values=held[0])
      out.append(self._batch(rows, valid))
    return out
