"""Synthetic LM training data the trainer tests share (tests/train, the multihost worker)."""

import numpy as np

B, T, V = 4, 32, 258
ARCH = dict(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64)


def synthetic(start, seed=0):
  """Batch i (a function of seed and i only): rows count up mod V from a random token."""
  i = start
  while True:
    rng = np.random.default_rng((seed, i))
    seq = (rng.integers(2, V, (B, 1)) + np.arange(T + 1)) % V
    yield {
      "inputs": seq[:, :-1].astype(np.int32),
      "targets": seq[:, 1:].astype(np.int32),
      "mask": np.ones((B, T), np.float32),
      "chars": np.ones((B, T), np.float32),
    }
    i += 1


def eval_batches():
  return [next(synthetic(10**6))]
