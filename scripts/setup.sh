#!/usr/bin/env bash
# Installs so-optax and everything its tests, notebooks and benchmarks need, from nothing.
# torch goes first and pinned: the CPU wheel 2.13.0 is what these machines carry; an unpinned torch
# pulled in by a dependency would fetch a multi-GB CUDA build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[dev]"
$PY - <<'PY'
import torch, jax, optax, flax
print(f"so-optax setup: torch {torch.__version__}, jax {jax.__version__}, optax {optax.__version__}, flax {flax.__version__}")
PY
