#!/usr/bin/env bash
# The test suite: unit tests, JAX<->torch parity tests and the executed notebooks.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu MPLBACKEND=Agg
exec python3 -m pytest -n 2 --dist loadgroup -q tests notebooks --nbmake "$@"
