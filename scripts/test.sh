#!/usr/bin/env bash
# The test suite: unit tests, JAX<->torch parity tests and the executed notebooks; then, in a process of its
# own (XLA reads the simulated device count when JAX starts), the multi-device tests of tests/mesh.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu MPLBACKEND=Agg
python3 -m pytest -n 2 -q tests notebooks --nbmake --ignore=tests/mesh "$@"
XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8" OPENBLAS_NUM_THREADS=1 \
  python3 -m pytest -n 2 -q tests/mesh "$@"
