#!/usr/bin/env bash
# Installs so-optax (editable) and everything its tests, notebooks, benchmarks and examples need into the
# interpreter of scripts/python.sh: by default the project's own virtual environment .venv, created here
# (an active virtual environment, or $PYTHON, takes its place). Nothing outside that environment changes.
# torch goes first and pinned ($SO_OPTAX_TORCH, default the CPU-machine pin torch==2.13.0): an unpinned
# torch pulled in by a dependency would replace it, or fetch a multi-GB CUDA build.
# A run that finds this checkout already installed from the same pyproject.toml (a stamp of its hash in the
# environment) and importable installs nothing; SO_OPTAX_REINSTALL=1 installs anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python.sh
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
TORCH=${SO_OPTAX_TORCH:-torch==2.13.0}

if [[ "$PY" == "$PWD/.venv/bin/python" && ! -x "$PY" ]]; then
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    { echo "so-optax setup: needs Python >= 3.10 as python3 (or set PYTHON=/path/to/python)" >&2; exit 1; }
  echo "so-optax setup: creating the project environment .venv"
  python3 -m venv .venv
fi

stamp_key=$( { sha256sum pyproject.toml | cut -d' ' -f1; echo "$PWD $TORCH"; } | sha256sum | cut -d' ' -f1)
stamp=$("$PY" -c 'import sys; print(sys.prefix)')/.so-optax-setup
versions() {  # fails unless every dependency is installed and so_optax is this checkout's (without importing)
  SO_OPTAX_ROOT=$PWD "$PY" - <<'PY'
import os
from importlib import metadata, util

found = {name: metadata.version(name) for name in ("torch", "jax", "optax", "flax", "lightning", "so-optax")}
root = os.path.dirname(os.path.dirname(os.path.dirname(util.find_spec("so_optax").origin)))
assert root == os.environ["SO_OPTAX_ROOT"], f"so_optax is imported from {root}"
assert util.find_spec("torch_bridge") is not None
print(", ".join(f"{name} {v}" for name, v in found.items()) + f" from {root}")
PY
}
if [[ "${SO_OPTAX_REINSTALL:-0}" != 1 && -f "$stamp" && "$(cat "$stamp")" == "$stamp_key" ]] && report=$(versions 2>/dev/null); then
  echo "so-optax setup: up to date in $("$PY" -c 'import sys; print(sys.prefix)') ($report)"
  exit 0
fi
echo "so-optax setup: installing into $("$PY" -c 'import sys; print(sys.prefix)')"
# --no-compile: Python byte-compiles what is imported when it is first imported (not all of torch's sources)
"$PY" -m pip install -q --no-compile "$TORCH"
"$PY" -m pip install -q --no-compile -e ".[dev]"
report=$(versions)
echo "$stamp_key" > "$stamp"
echo "so-optax setup: $report"
