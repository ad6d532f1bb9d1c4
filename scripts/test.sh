#!/usr/bin/env bash
# The test suite: unit tests, JAX<->torch parity tests and the executed notebooks; then, in a process of its
# own (XLA reads the simulated device count when JAX starts), the multi-device tests of tests/mesh on 8
# simulated CPU devices. With the interpreter of scripts/python.sh (the project's .venv from
# scripts/setup.sh; `PYTHON=python3 bash scripts/test.sh` runs them with another interpreter that has the
# dependencies). Arguments go to both pytest invocations.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python.sh
if [[ ! -x "$(command -v "$PY")" ]]; then
  echo "scripts/test.sh: no interpreter at $PY; run 'bash scripts/setup.sh' first (it creates .venv), or set" \
       "PYTHON to an interpreter that has the dependencies" >&2
  exit 1
fi
export JAX_PLATFORMS=cpu MPLBACKEND=Agg
"$PY" -m pytest -n 2 --dist loadgroup -q tests notebooks --nbmake --ignore=tests/mesh "$@"
XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8" OPENBLAS_NUM_THREADS=1 \
  exec "$PY" -m pytest -n 2 -q tests/mesh "$@"
