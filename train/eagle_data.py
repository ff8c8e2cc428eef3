"""The data EAGLE heads train on besides plain batches (`kvjax.train.eagle`): prompts cut from
a token stream, self-distillation (the target's own continuations of prompts as training
sequences, made once and kept in OUT/selfdistill.npy) and the batches of fixed sequences.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import numpy as np
from tqdm import tqdm

from kvjax.lm.generate import generate
from kvjax.lm.model import Model
from kvjax.lm.sampling import Sampling
from kvjax.train import instructions
from kvjax.train.errors import TrainError
from kvjax.train.loop import Batch

DISTILL_FILE = "selfdistill.npy"


def prompts_from_stream(
  tokens: np.ndarray,
  doc: np.ndarray,
  n: int,
  length: int,
  *,
  rng: np.random.Generator | None = None,
) -> list[list[int]]:
  """n prompts of `length` tokens, each inside one document of a token stream (tokens, doc
  [N]): evenly spaced over the stream, or drawn at random with `rng`."""
  tokens, doc = np.asarray(tokens), np.asarray(doc)
  if n == 0:
    return []
  ok = (
    np.flatnonzero(doc[: len(doc) - length + 1] == doc[length - 1 :])
    if len(doc) >= length
    else np.zeros(0, np.int64)
  )
  if not len(ok):
    raise TrainError(f"no document of the held-out / prompt text has {length} tokens for a prompt")
  if rng is None:
    starts = ok[np.linspace(0, len(ok) - 1, n).round().astype(np.int64)]
  else:
    starts = rng.choice(ok, n, replace=len(ok) < n)
  return [tokens[s : s + length].tolist() for s in starts]


def chat_prompts(model: Model, n: int, *, seed: int = 0) -> list[list[int]]:
  """n of `kvjax.train.instructions`' prompts, each a user turn in the model's chat template
  (the assistant's turn opened), as token ids."""
  tok = model.tokenizer
  if tok is None or not tok.chat_template:
    raise TrainError("--distill-prompts instructions needs a target with a chat template")
  return [
    tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
    for p in instructions.prompts(n, seed=seed)
  ]


def text_streams(td) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """The (tokens, doc) streams of a `kvjax.train.text.TextData`'s train and held-out parts."""
  train = td.windows[: td.n_train, :-1].ravel()
  held = td.windows[td.n_train :, :-1].ravel()
  return (train, np.zeros(len(train), np.int32)), (held, np.zeros(len(held), np.int32))


def self_distill(
  model: Model,
  prompts: Sequence[Sequence[int]],
  length: int,
  *,
  temperature: float = 1.0,
  seed: int = 0,
  path: str | None = None,
  chunk: int = 32,
  progress: bool = True,
) -> np.ndarray:
  """The target's own continuations of `prompts` as training sequences: [N, length] int32,
  each row a prompt and what `kvjax.lm.generate` (greedy at temperature 0, else sampled) made
  after it up to `length` tokens, -1 after a stop token. With `path` (a .npy file) the result
  is made once and read back afterwards, and the work so far is kept after every `chunk`
  prompts in `path` + ".partial.npz", from which an interrupted run resumes (chunk i is
  sampled with key fold_in(seed, i * chunk), so a resumed run makes the same sequences)."""
  n = len(prompts)
  if path is not None and os.path.exists(path):
    seqs = np.load(path)
    if seqs.shape != (n, length):
      raise TrainError(
        f"{path} holds {seqs.shape[0]} sequences of {seqs.shape[1]} tokens, not "
        f"{n} of {length}: it belongs to another run; pass a new out dir"
      )
    return seqs
  longest = max(map(len, prompts))
  if longest >= length or length > model.cfg.max_position:
    raise TrainError(
      f"self-distillation needs prompts ({longest} tokens) shorter than the "
      f"sequences ({length}), which must fit max_position "
      f"{model.cfg.max_position}"
    )
  sampling = Sampling(temperature=float(temperature))
  partial = None if path is None else path + ".partial.npz"
  run = dict(temperature=float(temperature), seed=int(seed), chunk=int(chunk))
  seqs, start = _resume(partial, prompts, length, run)
  bar = tqdm(total=n, desc="self-distill", unit="seq", dynamic_ncols=True, disable=not progress)
  bar.update(start)
  for s in range(start, n, chunk):
    rows = [list(map(int, p)) for p in prompts[s : s + chunk]]
    rows += [rows[0]] * (chunk - len(rows))  # one batch shape for every chunk
    out = generate(
      model,
      rows,
      max_new_tokens=length - min(map(len, rows)),
      sampling=sampling,
      key=jax.random.fold_in(jax.random.key(seed), s),
    )
    for r in range(min(chunk, n - s)):
      ids = (rows[r] + out.tokens[r])[:length]
      seqs[s + r, : len(ids)] = ids
    bar.update(min(chunk, n - s))
    if partial is not None and s + chunk < n:
      _save(partial, np.savez, seqs=seqs, done=s + chunk, **run)
  bar.close()
  if path is not None:
    _save(path, np.save, seqs)
    if os.path.exists(partial):
      os.remove(partial)
  return seqs


def _save(path: str, save, *args, **arrays) -> None:
  """Writes with `save` (np.save / np.savez) to a temporary file and renames it over path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp" + os.path.splitext(path)[1]
  save(tmp, *args, **arrays)
  os.replace(tmp, path)


def _resume(
  partial: str | None, prompts: Sequence[Sequence[int]], length: int, run: dict
) -> tuple[np.ndarray, int]:
  """(sequences [N, length] so far, prompts done) from an interrupted run's partial file, or
  an empty start; a partial file of other prompts or settings is refused."""
  n = len(prompts)
  if partial is None or not os.path.exists(partial):
    return np.full((n, length), -1, np.int32), 0
  with np.load(partial) as f:
    seqs, done = f["seqs"], int(f["done"])
    saved = {k: f[k].item() for k in run}
  same = seqs.shape == (n, length) and saved == run and 0 < done <= n
  same = same and all(list(seqs[i, : len(p)]) == list(p) for i, p in enumerate(prompts[:done]))
  if not same:
    raise TrainError(
      f"{partial} holds an interrupted self-distillation of other prompts or settings "
      f"({saved}); remove it or pass a new out dir"
    )
  return seqs.astype(np.int32), done


class SequenceData:
  """Batches of fixed sequences [N, T + 1] (-1 = no token), T = seq_len: batch i is a pure
  function of (seed, i), rows in epoch-wise permutations."""

  def __init__(self, seqs: np.ndarray, *, batch_size: int, seed: int = 0):
    seqs = np.asarray(seqs)
    if seqs.ndim != 2 or seqs.shape[1] < 2 or not len(seqs):
      raise TrainError(f"sequences must be [N, T + 1] with T >= 1; got {list(seqs.shape)}")
    self.seqs, self.batch_size, self.seed = seqs, batch_size, seed

  def rows(self, i: int) -> np.ndarray:
    """[B] int64: the sequences of batch i."""
    n, B = len(self.seqs), self.batch_size
    return np.asarray(
      [_permutation(self.seed, k // n, n)[k % n] for k in range(i * B, (i + 1) * B)]
    )

  def batch(self, i: int) -> Batch:
    w = self.seqs[self.rows(i)]
    real = (w[:, :-1] >= 0) & (w[:, 1:] >= 0)
    return {
      "inputs": np.maximum(w[:, :-1], 0).astype(np.int32),
      "targets": np.maximum(w[:, 1:], 0).astype(np.int32),
      "mask": real.astype(np.float32),
    }

  def train_batches(self, start: int = 0):
    i = start
    while True:
      yield self.batch(i)
      i += 1


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the n sequences in an epoch (cached: a batch reads one or two epochs)."""
  return np.random.default_rng((seed, epoch)).permutation(n)
