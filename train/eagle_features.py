"""The frozen target's view of fixed training sequences, computed once and kept on disk, so an
EAGLE head trains many epochs without running its target at every step.

    store = eagle_features.compute(model, head, seqs, "run/features")   # resumable
    data = eagle_features.FeatureData(SequenceData(seqs, batch_size=8), store)
    eagle.train(model, head, ec, data.train_batches, ...)

For sequences [N, T + 1] (-1 = no token) the target runs once over each row's first T tokens
and the store keeps, memory-mapped under its directory:

  features.npy      [N, T, F] bfloat16 (kept as uint16 bits): `Head.feature_inputs`, the
                    eagle3 head's concatenated layer inputs (F = 3 D) or eagle1's top state
  label_ids.npy     [N, T, k] int32: the target's k most likely next tokens at each position
  label_logits.npy  [N, T, k] bfloat16 bits: their logits
  best.npy          [N, T] int32: the target's argmax (= label_ids[..., 0])
  store.json        what made it (target fingerprint, head kind and fuse layers, shapes, k, a
                    digest of the sequences) and how many rows are done

The head's training loss then reads the top-k label (`kvjax.train.eagle.label_ce`): with k at
least the vocabulary it is the live loss up to bfloat16 rounding; with k = 32 on a real model
the dropped tail is the mass past the 32nd token. Rows are written a batch at a time and the
count saved after each, so an interrupted computation resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from numpy.lib.format import open_memmap
from tqdm import tqdm

from kvjax.lm.artifact import params_fingerprint
from kvjax.lm.model import Model
from kvjax.speculative import head as heads
from kvjax.train.eagle import CACHED_KEYS, target_forward
from kvjax.train.eagle_data import SequenceData
from kvjax.train.errors import TrainError
from kvjax.train.loop import Batch

TOP_K = 32  # label entries kept per position
META = "store.json"
ARRAYS = tuple(CACHED_KEYS)  # features, label_ids, label_logits, best
BF16 = ("features", "label_logits")  # kept as uint16 bits of bfloat16


@dataclasses.dataclass(frozen=True)
class FeatureStore:
  """The arrays of a finished store (memory-mapped, read-only) and its record."""

  path: str
  arrays: dict[str, np.ndarray]
  meta: dict

  def rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """CACHED_KEYS for the given rows: features / label_logits as bfloat16."""
    out = {}
    for k in ARRAYS:
      a = np.asarray(self.arrays[k][np.asarray(rows)])
      out[k] = a.view(ml_dtypes.bfloat16) if k in BF16 else a
    return out


def _digest(seqs: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(seqs, np.int32).tobytes()).hexdigest()[:16]


def _record(model: Model, head: heads.LoadedHead, seqs: np.ndarray, top_k: int) -> dict:
  hc = head.hc
  return {
    "target_fingerprint": params_fingerprint(model),
    "kind": hc.kind,
    "fuse_layers": list(hc.fuse_layers),
    "rows": int(seqs.shape[0]),
    "seq_len": int(seqs.shape[1] - 1),
    "top_k": int(top_k),
    "sequences": _digest(seqs),
  }


def compute(
  model: Model,
  head: heads.LoadedHead,
  seqs: np.ndarray,
  path: str,
  *,
  batch_size: int = 8,
  top_k: int = TOP_K,
  progress: bool = True,
) -> FeatureStore:
  """The store of `seqs` [N, T + 1] under directory `path`: read back when complete, resumed
  when partly written, made otherwise. A store made for another target, head kind, fuse
  layers, k or other sequences is refused."""
  seqs = np.asarray(seqs)
  if seqs.ndim != 2 or seqs.shape[1] < 2 or not len(seqs):
    raise TrainError(f"sequences must be [N, T + 1] with T >= 1; got {list(seqs.shape)}")
  heads.check(head.hc, model.cfg)
  top_k = min(int(top_k), model.cfg.vocab_size)
  want = _record(model, head, seqs, top_k)
  N, T = want["rows"], want["seq_len"]
  shapes = {
    "features": ((N, T, head.hc.feature_width), np.uint16),
    "label_ids": ((N, T, top_k), np.int32),
    "label_logits": ((N, T, top_k), np.uint16),
    "best": ((N, T), np.int32),
  }
  meta_path = os.path.join(path, META)
  done = 0
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    got = {k: meta.get(k) for k in want}
    if got != want:
      diff = sorted(k for k in want if got[k] != want[k])
      raise TrainError(
        f"{path} holds target features of another run (differs in {', '.join(diff)}); "
        "remove it or pass a new out dir"
      )
    done = int(meta["done"])
  os.makedirs(path, exist_ok=True)
  mode = "r+" if done else "w+"
  arrays = {
    k: open_memmap(os.path.join(path, f"{k}.npy"), mode, dtype, shape if mode == "w+" else None)
    for k, (shape, dtype) in shapes.items()
  }
  if done < N:
    step = _forward(model, head, top_k)
    bar = tqdm(total=N, initial=done, desc="target features", unit="seq", disable=not progress)
    params = model.params()
    for s in range(done, N, batch_size):
      rows = seqs[s : s + batch_size]
      n = len(rows)
      rows = np.concatenate([rows, np.repeat(rows[:1], batch_size - n, 0)])  # one shape
      got = jax.device_get(step(params, jnp.asarray(np.maximum(rows[:, :-1], 0), jnp.int32)))
      got["best"] = got["label_ids"][..., 0]
      for k in ARRAYS:
        a = np.asarray(got[k])[:n]
        arrays[k][s : s + n] = a.view(np.uint16) if k in BF16 else a
      for a in arrays.values():
        a.flush()
      _write_meta(meta_path, {**want, "done": s + n})
      bar.update(n)
    bar.close()
  del arrays
  read = {k: np.load(os.path.join(path, f"{k}.npy"), mmap_mode="r") for k in ARRAYS}
  return FeatureStore(path=path, arrays=read, meta={**want, "done": N})


def _write_meta(path: str, meta: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, path)


def _forward(model: Model, head: heads.LoadedHead, top_k: int):
  """jitted (params, inputs [B, T]) -> CACHED_KEYS of one batch but "best" (label_ids[..., 0],
  taken on the host: slicing top_k's output in the program makes XLA's CPU top-k 5x slower)."""
  module = head.module

  @jax.jit
  def step(params, inputs):
    dec = model.with_params(params).decoder
    out = target_forward(dec, {"inputs": inputs}, head.hc.kind == "eagle3")
    vals, ids = jax.lax.top_k(out["logits"], top_k)  # [B, T, k], sorted
    feats = module.feature_inputs(out["hidden"], out.get("layer_inputs"))
    return {
      "features": feats.astype(jnp.bfloat16),
      "label_ids": ids.astype(jnp.int32),
      "label_logits": vals.astype(jnp.bfloat16),
    }

  return step


class FeatureData:
  """SequenceData's batches with each row's stored target view added (CACHED_KEYS): batch i
  is the same pure function of (seed, i)."""

  def __init__(self, data: SequenceData, store: FeatureStore):
    if store.meta["rows"] != len(data.seqs) or store.meta["seq_len"] != data.seqs.shape[1] - 1:
      raise TrainError(
        f"the feature store {store.path} holds {store.meta['rows']} rows of "
        f"{store.meta['seq_len']} positions; the sequences are {list(data.seqs.shape)}"
      )
    if store.meta["sequences"] != _digest(data.seqs):
      raise TrainError(f"the feature store {store.path} was made from other sequences")
    self.data, self.store = data, store

  def batch(self, i: int) -> Batch:
    return {**self.data.batch(i), **self.store.rows(self.data.rows(i))}

  def train_batches(self, start: int = 0):
    i = start
    while True:
      yield self.batch(i)
      i += 1
