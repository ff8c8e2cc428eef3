"""What the benchmarks ran on, and where they write their results."""

from __future__ import annotations

import json
import os
import platform

import jax


def cpu_name() -> str:
  """The processor's model name (from /proc/cpuinfo on Linux)."""
  name = platform.processor()
  if not name and os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      name = next(
        (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), ""
      )
  return name or platform.machine()


def describe() -> str:
  """'<cpu>, <n> cores, JAX <version> on <backend> (<device kind>)'."""
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  return (
    f"{cpu_name()}, {os.cpu_count()} cores, JAX {jax.__version__} on "
    f"{jax.default_backend()} ({kind})"
  )


def rss_mib() -> float:
  """The process's resident memory in MiB (Linux /proc; NaN elsewhere)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return float("nan")


def write(out_dir: str, name: str, results: dict, table: str) -> str:
  """Writes <out_dir>/<name>_<backend>.json (results) and .md (table); returns that stem."""
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, f"{name}_{jax.default_backend()}")
  with open(stem + ".json", "w") as f:
    json.dump(results, f, indent=1, default=str)
  with open(stem + ".md", "w") as f:
    f.write(table.rstrip("\n") + "\n")
  return stem


def publish(out_dir: str, name: str, results: dict, table: str) -> str:
  """Writes the results and their table (`write`), then prints the table; returns the stem."""
  stem = write(out_dir, name, results, table)
  print(table)
  return stem
