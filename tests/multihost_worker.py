"""One process of tests/test_multihost.py's 2-process run (not a test file itself).

    python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Joins the others through a localhost coordinator (2 CPU devices per process), then on a
(data=2, model=2) mesh that spans the processes: greedy generation of ROWS with a tiny model,
and 10 LM training steps (checkpointed every 5). Writes OUT_DIR/result{PROCESS_ID}.json
(generated tokens, losses, which arrays span processes) and OUT_DIR/params{PROCESS_ID}.npz.
"""

import json
import os
import sys

from kvjax.lm import distributed

pid, n, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
distributed.initialize(f"localhost:{port}", n, pid, local_devices=2, timeout_s=60)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from kvjax import lm  # noqa: E402
from kvjax.lm import sharding, tiny  # noqa: E402
from kvjax.lm.generate import new_cache  # noqa: E402
from kvjax.train.lm import TrainConfig, train  # noqa: E402

B, T, V = 4, 32, 258
ARCH = dict(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64)
ROWS = [[0, 5, 6, 7], [0, 9, 10, 40, 41], [0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [0, 11]]
STEPS = 10


def synthetic(start, seed=0):
  """Batch i (a function of seed and i only), the same global batch on every process."""
  i = start
  while True:
    rng = np.random.default_rng((seed, i))
    seq = (rng.integers(2, V, (B, 1)) + np.arange(T + 1)) % V
    yield {"inputs": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32),
           "mask": np.ones((B, T), np.float32), "chars": np.ones((B, T), np.float32)}
    i += 1


def eval_batches():
  return [next(synthetic(10**6))]


def config(out_dir):
  return TrainConfig(steps=STEPS, batch_size=B, seq_len=T, lr=1e-2, warmup=3, out_dir=out_dir,
                     log_every=1, eval_every=5, save_every=5, data_parallel=2, model_parallel=2)


def spans(x) -> bool:
  """x is a global array with shards on another process's devices."""
  return not x.is_fully_addressable


mesh = sharding.make_mesh(data=2, model=2)
model = sharding.shard(tiny.model(**ARCH), mesh)
gen = lm.generate(model, ROWS, max_new_tokens=12, stop_tokens=[])
cache = new_cache(model, len(ROWS), 32)
trained = train(tiny.model(**ARCH), config(os.path.join(out, "run")), synthetic,
                 eval_batches, progress=True)
report = {
    "process": jax.process_index(), "processes": jax.process_count(),
    "devices": len(jax.devices()), "local_devices": len(jax.local_devices()),
    "mesh": [[d.process_index for d in r] for r in mesh.devices],
    "tokens": gen.tokens, "finish": gen.finish,
    "spans": {"embed": spans(model.state["embed"][...]), "cache_k": spans(cache.k),
              "cache_length": spans(cache.length)},
    "losses": [r["loss"] for r in trained.records],
    "eval_loss": trained.records[-1]["eval_loss"],
}
with open(os.path.join(out, f"result{pid}.json"), "w") as f:
  json.dump(report, f)
np.savez(os.path.join(out, f"params{pid}.npz"),
         **{jax.tree_util.keystr(k): v for k, v in
            jax.tree_util.tree_leaves_with_path(trained.model.params())})
