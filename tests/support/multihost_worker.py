"""One process of tests/lm/test_multihost.py's 2-process run (not a test file itself).

    python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Joins the others through a localhost coordinator (2 CPU devices per process), then on
(data=2, model=2) meshes that span the processes: greedy generation of ROWS with a tiny model
("model" across the processes), and 10 LM training steps ("data" across them; checkpointed
every 5). Writes OUT_DIR/result{PROCESS_ID}.json
(generated tokens, losses, which arrays span processes) and OUT_DIR/params{PROCESS_ID}.npz.
"""

import json
import os
import sys
import time

import jax
import numpy as np
from train_data import ARCH, B, T, eval_batches, synthetic  # the single-process tests' data

from kvjax import lm
from kvjax.lm import distributed, sharding, tiny
from kvjax.lm.generate import new_cache
from kvjax.train.lm import TrainConfig, make_mesh, train

ROWS = [[0, 5, 6, 7], [0, 9, 10, 40, 41], [0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [0, 11]]
STEPS = 10


def config(out_dir, data_parallel=2, model_parallel=2):
  return TrainConfig(
    steps=STEPS,
    batch_size=B,
    seq_len=T,
    lr=1e-2,
    warmup=3,
    out_dir=out_dir,
    log_every=1,
    eval_every=5,
    save_every=5,
    data_parallel=data_parallel,
    model_parallel=model_parallel,
  )


def spans(x) -> bool:
  """x is a global array with shards on another process's devices."""
  return not x.is_fully_addressable


def where(mesh) -> list[list[int]]:
  """The process of each device of a (data, model) mesh."""
  return [[d.process_index for d in row] for row in mesh.devices]


def main(pid: int, n: int, port: int, out: str) -> None:
  t0 = time.perf_counter()
  log = lambda what: print(f"worker {pid}: {what} at {time.perf_counter() - t0:.1f} s", flush=True)
  distributed.initialize(f"localhost:{port}", n, pid, local_devices=2, timeout_s=60)
  log("joined")
  # generation: the "model" axis across the processes (tensor-parallel collectives over gloo);
  # training: its own mesh, jax.devices() in order, so "data" runs across them
  p0, p1 = (jax.local_devices(process_index=i) for i in range(2))
  mesh = sharding.make_mesh(data=2, model=2, devices=[p0[0], p1[0], p0[1], p1[1]])
  model = sharding.shard(tiny.model(**ARCH), mesh)
  gen = lm.generate(model, ROWS, max_new_tokens=12, stop_tokens=[])
  cache = new_cache(model, len(ROWS), 32)
  log("generated")
  trained = train(
    tiny.model(**ARCH), config(os.path.join(out, "run")), synthetic, eval_batches, progress=True
  )
  log("trained")
  report = {
    "process": jax.process_index(),
    "processes": jax.process_count(),
    "devices": len(jax.devices()),
    "local_devices": len(jax.local_devices()),
    "mesh": where(mesh),
    "train_mesh": where(make_mesh(config(out))),
    "tokens": gen.tokens,
    "finish": gen.finish,
    "spans": {
      "embed": spans(model.state["embed"][...]),
      "cache_k": spans(cache.k),
      "cache_length": spans(cache.length),
    },
    "losses": [r["loss"] for r in trained.records],
    "eval_loss": trained.records[-1]["eval_loss"],
  }
  with open(os.path.join(out, f"result{pid}.json"), "w") as f:
    json.dump(report, f)
  np.savez(
    os.path.join(out, f"params{pid}.npz"),
    **{
      jax.tree_util.keystr(k): v
      for k, v in jax.tree_util.tree_leaves_with_path(trained.model.params())
    },
  )


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
