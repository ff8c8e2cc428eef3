"""examples/quickstart.ipynb runs top to bottom, headless, with its tiny settings
(KVJAX_NOTEBOOK_FAST=1), and prints what each section shows.

nbclient runs in a child process (the kernel is this venv's Python: nbclient's python3 kernel is
the interpreter that runs it), never in the test process: with its zmq and tornado threads
loaded into a test worker, that worker's later XLA compiles crashed now and then (segfaults and
aborts inside XLA, seen in 3 of 3 full runs, only in workers that had run the notebook). The
kernel inherits the environment: PYTHONPATH (kvjax from the worktree, or the editable install in
CI) and the XLA flags and compilation cache of conftest.
"""

import math
import os
import re
import subprocess
import sys

import nbformat

NOTEBOOK = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  "examples",
  "quickstart.ipynb",
)


EXECUTE = """
import sys
import nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=300, kernel_name="python3",
               resources={"metadata": {"path": sys.argv[2]}}).execute()
nbformat.write(nb, sys.argv[3])
"""


def _run(tmp_path) -> str:
  """Executes the notebook in tmp_path (in a child process); returns every code cell's text
  output joined."""
  done = tmp_path / "executed.ipynb"
  proc = subprocess.run(
    [sys.executable, "-c", EXECUTE, NOTEBOOK, str(tmp_path), str(done)],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  nb = nbformat.read(str(done), as_version=4)
  out = []
  for cell in nb.cells:
    if cell.cell_type == "code":
      for o in cell.get("outputs", []):
        assert o.output_type != "error", f"{o.ename}: {o.evalue}"
        if o.output_type == "stream" and o.name == "stdout":
          out.append(o.text)
  return "".join(out)


def _number(pattern: str, text: str) -> list:
  """Every match of pattern in text, its groups as floats (a tuple for several groups)."""
  found = [
    tuple(map(float, m)) if isinstance(m, tuple) else float(m) for m in re.findall(pattern, text)
  ]
  assert found, f"{pattern!r} not in the notebook's output:\n{text}"
  return found


def test_quickstart_notebook_runs_headless(tmp_path, monkeypatch):
  monkeypatch.setenv("KVJAX_NOTEBOOK_FAST", "1")
  text = _run(tmp_path)
  assert "FAST=True" in text  # the parameters cell read the test's settings
  assert "greedy: " in text and "sampled: " in text
  generated, peak = _number(r"generated (\d+) tokens, peak cache (\d+) tokens", text)[0]
  assert generated == 48 and peak == 32  # constant memory: 4 sinks + the window of 28
  for kind in ("dense", "window", "sink", "recompute"):
    (ppl,) = _number(rf"\n{kind} +ppl +([\d.]+) ", text)
    assert math.isfinite(ppl) and ppl > 1, (kind, ppl)
  for name in ("shakespeare (eagle1)", "shakespeare-eagle3 (eagle3)"):
    assert f"{name}: identical to greedy: True" in text
  accept = re.findall(r"mean accepted length ([\d.]+) .* per round: \[([\d, ]+)\]", text)
  assert len(accept) == 2, text
  for mean, rounds in accept:  # depth 4: at most 5 tokens a round
    rounds = [int(n) for n in rounds.split(",")]
    assert all(1 <= n <= 5 for n in rounds), rounds
    assert abs(float(mean) - sum(rounds) / len(rounds)) <= 0.005, (mean, rounds)
  ((reused, full),) = _number(
    r"recomputes layers \[0, 1\]: loss ([\d.]+) vs full prefill "
    r"([\d.]+)",
    text,
  )
  assert math.isfinite(reused) and math.isfinite(full)
  (layers,) = re.findall(r"max \|K - K_full\| per layer: ([\d. ]+)", text)
  layers = [float(x) for x in layers.split()]  # layers 0 and 1 are the receiver's own
  assert len(layers) == 12 and layers[0] == layers[1] == 0.0 and min(layers[2:]) > 0, layers
  assert "augmented: " in text
  ((base, aug),) = _number(r"base ([\d.]+), augmented ([\d.]+) \(", text)
  assert math.isfinite(base) and math.isfinite(aug)
  assert "1. With justice -> " in text and "answer: " in text
  assert re.search(r"\n3 points expanded together, [1-9]\d* tokens", text)
