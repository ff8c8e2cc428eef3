"""Two processes on one mesh (`jax.distributed`, CPU, gloo collectives) equal one process.

Two `multihost_worker.py` subprocesses join through a localhost coordinator with 2 CPU devices
each and run greedy generation (on a (data=2, model=2) mesh whose "model" axis spans the
processes) and 10 LM training steps (a mesh whose "data" axis does); this process computes the
same on one device. The pair runs under a
deadline, and when either worker fails the other is killed and both workers' stderr shown.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import multihost_worker as worker
import numpy as np
import pytest

from kvjax import lm
from kvjax.lm import tiny
from kvjax.train import metrics
from kvjax.train.lm import train

DEADLINE_S = 240


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def worker_env() -> dict[str, str]:
  """This environment without conftest's 8 simulated devices (each worker sets its own 2) and
  without the session's persistent compilation cache: its keys ignore the device count, so a
  program compiled by a 2-process gloo worker would be served to the 8-device test processes
  (which crashed them)."""
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  flags = env.get("XLA_FLAGS", "").split()
  env["XLA_FLAGS"] = " ".join(f for f in flags if "xla_force_host_platform_device_count" not in f)
  return env


def start(out_dir, commands=None) -> list[tuple[subprocess.Popen, str]]:
  """Starts the 2 workers (or `commands`, one argv per process) -> [(process, its log file)]."""
  port = free_port()
  commands = commands or [
    [sys.executable, worker.__file__, str(i), "2", str(port), str(out_dir)] for i in range(2)
  ]
  procs = []
  for i, cmd in enumerate(commands):
    log = os.path.join(out_dir, f"worker{i}.log")
    with open(log, "w") as f:
      procs.append(
        (subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=worker_env()), log)
      )
  return procs


def wait(procs, deadline_s: float = DEADLINE_S) -> None:
  """Waits for every process; when one fails or the deadline passes, kills the rest and fails
  with each process's exit status and the tail of its output."""
  end = time.monotonic() + deadline_s
  why = None
  while why is None and any(p.poll() is None for p, _ in procs):
    failed = [i for i, (p, _) in enumerate(procs) if p.poll() not in (None, 0)]
    if failed:
      why = f"worker {failed[0]} exited with status {procs[failed[0]][0].returncode}"
    elif time.monotonic() > end:
      why = f"the workers did not finish within {deadline_s:.0f} s"
    else:
      time.sleep(0.2)
  for p, _ in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
  if why is None and any(p.returncode for p, _ in procs):
    why = f"exit statuses {[p.returncode for p, _ in procs]}"
  if why is not None:
    tails = []
    for i, (p, log) in enumerate(procs):
      with open(log) as f:
        lines = [l for l in f.read().splitlines() if not l.startswith("[Gloo]")]
      tails.append(f"--- worker {i} (status {p.returncode}):\n" + "\n".join(lines[-30:]))
    pytest.fail(f"{why}\n" + "\n".join(tails), pytrace=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """(each worker's report, each worker's trained params, the run dir, the single-process
  reference: (generation, train result)). The reference runs while the workers do."""
  out = tmp_path_factory.mktemp("multihost")
  procs = start(out)
  try:
    ref_gen = lm.generate(tiny.model(**worker.ARCH), worker.ROWS, max_new_tokens=12, stop_tokens=[])
    ref_train = train(
      tiny.model(**worker.ARCH),
      worker.config(str(out / "single"), data_parallel=1, model_parallel=1),
      worker.synthetic,
      worker.eval_batches,
      progress=False,
    )
  finally:
    wait(procs)
  reports = [json.loads((out / f"result{i}.json").read_text()) for i in range(2)]
  params = [dict(np.load(out / f"params{i}.npz")) for i in range(2)]
  return reports, params, out / "run", (ref_gen, ref_train)


def test_two_processes_span_one_mesh(pair):
  reports, *_ = pair
  for i, r in enumerate(reports):
    assert (r["process"], r["processes"], r["devices"], r["local_devices"]) == (i, 2, 4, 2)
    assert r["mesh"] == [[0, 1], [0, 1]]  # generation: "model" runs across the processes
    assert r["train_mesh"] == [[0, 0], [1, 1]]  # training: "data" runs across them
    # params (vocab on "model"), the cache (kv heads on "model", rows on "data") are global
    assert r["spans"] == {"embed": True, "cache_k": True, "cache_length": True}


def test_generation_equals_one_process(pair):
  reports, _, _, (ref_gen, _) = pair
  assert all(len(t) == 12 for t in ref_gen.tokens)
  for r in reports:
    assert r["tokens"] == ref_gen.tokens


def test_training_equals_one_process(pair):
  reports, params, run, (_, ref) = pair
  want = [rec["loss"] for rec in ref.records]
  assert len(want) == worker.STEPS
  for r, p in zip(reports, params):
    np.testing.assert_allclose(r["losses"], want, atol=1e-5, rtol=0)
    assert r["eval_loss"] == pytest.approx(ref.records[-1]["eval_loss"], abs=1e-5)
    ref_params = jax.tree_util.tree_leaves_with_path(ref.model.params())
    assert sorted(p) == sorted(jax.tree_util.keystr(k) for k, _ in ref_params)
    for k, v in ref_params:
      np.testing.assert_allclose(
        p[jax.tree_util.keystr(k)], v, atol=2e-5, rtol=2e-4, err_msg=jax.tree_util.keystr(k)
      )
  # one writer: each step logged once; both processes' checkpoints in one orbax directory
  assert [rec["step"] for rec in metrics.read(run)] == list(range(1, worker.STEPS + 1))
  assert sorted(os.listdir(run / "checkpoints")) == ["10", "5"]
  assert (run / "loss.png").exists() and (run / "spec" / "config.json").exists()


def test_a_dead_worker_fails_fast_with_its_output(tmp_path):
  """Worker 1 dies at once: worker 0, waiting for it at the coordinator, is killed and the
  failure shows worker 1's output, long before the coordinator's own timeout (60 s)."""
  port = free_port()
  procs = start(
    tmp_path,
    [
      [sys.executable, worker.__file__, "0", "2", str(port), str(tmp_path)],
      [sys.executable, "-c", "import sys; sys.exit('worker 1: planted failure')"],
    ],
  )
  t0 = time.monotonic()
  with pytest.raises(
    pytest.fail.Exception,
    match=r"(?s)worker 1 exited with status 1.*"
    r"planted failure",
  ):
    wait(procs)
  assert time.monotonic() - t0 < 20
  assert procs[0][0].returncode != 0  # killed, not left waiting
