#!/usr/bin/env bash
# One run on a GPU or TPU machine (under 10 minutes): kvjax over the machine's own JAX, the
# kernel tests on the device, then benchmarks/device_check.py (kernels vs their XLA references,
# timed; the prefill dispatch; the decode grid against the measured bandwidth). Results land in
# benchmarks/results/device_<backend>.{json,md}, which docs/benchmarks.md quotes.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q --no-deps -e . || pip install -q --no-deps --no-build-isolation -e .
pip install -q pytest safetensors tokenizers jinja2 tqdm >/dev/null 2>&1 || true
# the kernel-vs-reference tests (interpret and TPU-interpret modes, lowering) on this machine
python -m pytest -q -p no:xdist -o addopts="--import-mode=importlib" \
  tests/kernels/test_sink_attention.py tests/kernels/test_tree_attention.py tests/lm/test_attention.py || true
timeout 480 python benchmarks/device_check.py "$@"
