"""What the benchmarks ran on, for their JSON and tables."""

from __future__ import annotations

import os
import platform

import jax


def cpu_name() -> str:
  """The processor's model name (from /proc/cpuinfo on Linux)."""
  name = platform.processor()
  if not name and os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                  "")
  return name or platform.machine()


def describe() -> str:
  """'<cpu>, <n> cores, JAX <version> on <backend> (<device kind>)'."""
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  return (f"{cpu_name()}, {os.cpu_count()} cores, JAX {jax.__version__} on "
          f"{jax.default_backend()} ({kind})")
