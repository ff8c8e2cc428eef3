"""The benchmark scripts (benchmarks/*.py) imported as modules, as the tests of them and of the
real models (the random configs in a real model's shape) need them."""

import importlib.util
import os
import sys

BENCH = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks"
)


def script(name: str):
  """benchmarks/<name>.py imported as a module named bench_<name> (no clash with kvjax's
  names), with benchmarks/ on sys.path while it imports its siblings (report,
  peer_protocol), as running the script puts it there. The module is in sys.modules, as an
  imported one is (dataclasses look their module up there)."""
  spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  sys.path.insert(0, BENCH)
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(BENCH)
  return module
