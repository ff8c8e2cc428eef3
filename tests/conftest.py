"""Shared fixtures. 8 simulated CPU devices so sharding tests run in the same session.

The suite is dominated by XLA compile time on a 2-core CPU, so it runs with XLA's most
optimizations off (JAX_DISABLE_MOST_OPTIMIZATIONS: the same programs, compiled about twice as
fast) and with XLA CPU's classic loop emitters instead of its newer fusion emitters
(--xla_cpu_use_fusion_emitters=false: about 30% less compile time on this suite); benchmarks
and user runs compile with the defaults. Set JAX_DISABLE_MOST_OPTIMIZATIONS=0, or pass your own
--xla_cpu_use_fusion_emitters in XLA_FLAGS, to test those programs. XLA's CPU compiler runs
here with one LLVM codegen thread per program (--xla_cpu_parallel_codegen_split_count=1): with
its default parallel codegen, a test worker's compile or executable serialisation crashed
(segfault or abort inside XLA, jaxlib 0.10.2) at least once in each of 6 full runs of the suite
with the Qwen3 / Gemma 3 / Phi-3 / Mixtral programs, in tests old and new; with one thread, none
did, and the suite runs no slower on 2 cores.

Tests build many fresh tiny models whose programs are identical, and each model's executables
are cached on the model; a persistent compilation cache shared by the session's workers and
subprocesses (a fresh temporary directory, removed at the end) compiles each program once.
GGUF files' converted copies (`kvjax.lm.gguf_cache`) go to another such directory, never to
the user's ~/.cache/kvjax.

pytest-xdist (`--dist loadfile --no-loadscope-reorder`, pyproject's addopts) hands each worker
one module at a time, in collection order, so a module's fixtures are built once; the modules
with the longest tests (`SLOW_FIRST`) are collected first, so a run ends on short modules
rather than on one worker finishing a long one while the other idles.
"""

import atexit
import fnmatch
import os
import shutil
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_cpu_use_fusion_emitters" not in _flags:  # the classic emitters compile ~30% faster
  _flags += " --xla_cpu_use_fusion_emitters=false"
if "xla_cpu_parallel_codegen_split_count" not in _flags:  # see the module docstring
  _flags += " --xla_cpu_parallel_codegen_split_count=1"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the first process (xdist's controller)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kvjax-tests-xla-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
if "KVJAX_CACHE_DIR" not in os.environ:  # GGUF files' converted copies: the session's own
  os.environ["KVJAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="kvjax-tests-models-")
  atexit.register(shutil.rmtree, os.environ["KVJAX_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
from hf_models import build  # noqa: E402

from kvjax.lm.config import FAMILIES  # noqa: E402

# Modules (paths under tests/) that run first, slowest first (about 25 s or more of one worker's
# time on 2 cores, or one test of 15 s or more); the rest keep their order.
SLOW_FIRST = (
  "lm/test_real_*.py",  # real checkpoints
  "methods/speculative/test_real_eagle.py",  # the real checkpoint's shipped head
  "project/test_notebook.py",  # the quickstart notebook in a child process
  "lm/test_multihost.py",  # two child processes under a deadline
  "methods/test_family_methods.py",
  "train/test_train_eagle.py",
  "project/test_benchmarks.py",
  "methods/speculative/test_speculative.py",
  "train/test_train.py",
  "lm/test_parity.py",
  "lm/test_sharding.py",
  "methods/droidspeak/test_droidspeak.py",
  "methods/test_bfloat16.py",
  "train/test_coprocessor_train.py",
  "train/test_train_bfloat16.py",
  "lm/test_bundled.py",
  "cli/test_cli_bfloat16.py",
)
TESTS = os.path.dirname(os.path.abspath(__file__))


def _rank(item) -> int:
  """Where item's module stands in SLOW_FIRST (len(SLOW_FIRST) when it is not there)."""
  path = os.path.relpath(str(item.path), TESTS).replace(os.sep, "/")
  return next((i for i, p in enumerate(SLOW_FIRST) if fnmatch.fnmatch(path, p)), len(SLOW_FIRST))


def pytest_collection_modifyitems(items):
  items.sort(key=_rank)  # stable: each module's own order, the other modules' order


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
  """hf_dir(family) -> path of a tiny random HF checkpoint of that family (built once)."""
  made = {}

  def get(family: str) -> str:
    if family not in made:
      made[family] = build(family, str(tmp_path_factory.mktemp(family)))
    return made[family]

  return get


@pytest.fixture(params=FAMILIES)
def family(request):
  return request.param
