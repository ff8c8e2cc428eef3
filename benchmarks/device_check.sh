#!/usr/bin/env bash
# One run on a GPU or TPU machine, meant to finish in under 8 minutes: the kernel tests on the
# device (at most 150 s), then benchmarks/device_check.py (at most 330 s): the kernels against
# their XLA references, timed; the prefill attention dispatch; issue 30's decode grid (batches
# 1,8,32 x contexts 512,2048, prefill 512,2048, bfloat16) on SmolLM2-135M-Instruct, its real
# weights where its package is installed, else random weights in its shapes, against the
# device's measured bandwidth. Arguments go to device_check.py; PYTHON names the interpreter
# (default python3, the one with JAX for the device). Results land in
# benchmarks/results/device_<backend>.{json,md}, which docs/benchmarks.md quotes.
#
# kvjax runs from this checkout (on PYTHONPATH, nothing installed: the machine may have no
# package index). Of its dependencies a JAX GPU image may lack gguf (pure Python): where it does,
# put its wheel in .whl/ beforehand, on a machine with PyPI, and bring that folder along:
#   python -m pip download --no-deps -d .whl gguf==0.19.0
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
site=$(mktemp -d)
ln -s "$PWD" "$site/kvjax"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import kvjax.lm" 2>"$site/import.err"; then
  tail -n 1 "$site/import.err" >&2
  echo "device_check.sh: kvjax does not import here; a missing package can come as a wheel in" \
    ".whl/ (see the top of this script)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
# the kernel-vs-reference tests (interpret and TPU-interpret modes, lowering) on this machine
timeout 150 "$PY" -m pytest -q -p no:xdist -o addopts="--import-mode=importlib" \
  tests/kernels/test_sink_attention.py tests/kernels/test_tree_attention.py \
  tests/lm/test_attention.py || true
timeout 330 "$PY" benchmarks/device_check.py "$@"
