#!/usr/bin/env bash
# The test suite: unit tests, JAX<->torch parity tests and the executed notebooks, with the interpreter of
# scripts/python.sh (the project's .venv from scripts/setup.sh; `PYTHON=python3 bash scripts/test.sh` runs
# them with another interpreter that has the dependencies). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python.sh
if [[ ! -x "$(command -v "$PY")" ]]; then
  echo "scripts/test.sh: no interpreter at $PY; run 'bash scripts/setup.sh' first (it creates .venv), or set" \
       "PYTHON to an interpreter that has the dependencies" >&2
  exit 1
fi
export JAX_PLATFORMS=cpu MPLBACKEND=Agg
exec "$PY" -m pytest -n 2 --dist loadgroup -q tests notebooks --nbmake "$@"
