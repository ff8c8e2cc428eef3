"""Training metrics: one JSON object per logged step in `metrics.jsonl`, a PNG loss curve."""

from __future__ import annotations

import json
import math
import os
from typing import Any

JSONL = "metrics.jsonl"
PNG = "loss.png"


def _clean(value: Any) -> Any:
  """JSON has no NaN/inf: those become null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def read(out_dir: str) -> list[dict[str, Any]]:
  """Every record in out_dir/metrics.jsonl (empty when there is none)."""
  path = os.path.join(out_dir, JSONL)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate(out_dir: str, step: int) -> None:
  """Drops records after `step` (a resumed run rewrites the steps after its checkpoint)."""
  records = [r for r in read(out_dir) if r["step"] <= step]
  with open(os.path.join(out_dir, JSONL), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def append(out_dir: str, record: dict[str, Any]) -> None:
  with open(os.path.join(out_dir, JSONL), "a") as f:
    f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")


def plot(out_dir: str, ylabel: str = "loss per token (nats)") -> str:
  """Writes out_dir/loss.png: train loss (and eval loss where present) against step, and
  val_accept_len (EAGLE heads) on a second axis where present."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = read(out_dir)
  fig, ax = plt.subplots(figsize=(7, 4))
  train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
  evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
  if train:
    ax.plot(*zip(*train), label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval loss")
  base = [(r["step"], r["eval_base_loss"]) for r in records if r.get("eval_base_loss") is not None]
  if base:  # coprocessors: the frozen model's own eval loss on the same targets
    ax.plot(*zip(*base), "x:", color="tab:gray", label="eval loss, no augmentation")
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  handles, labels = ax.get_legend_handles_labels()
  accept = [
    (r["step"], r["val_accept_len"]) for r in records if r.get("val_accept_len") is not None
  ]
  if accept:
    ax2 = ax.twinx()
    ax2.plot(*zip(*accept), "s--", color="tab:green", label="val accept len")
    ax2.set_ylabel("tokens per target forward")
    h2, l2 = ax2.get_legend_handles_labels()
    handles, labels = handles + h2, labels + l2
  ax.legend(handles, labels)
  fig.tight_layout()
  path = os.path.join(out_dir, PNG)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
