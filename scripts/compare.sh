#!/usr/bin/env bash
# Quickstart, command 1: install everything (scripts/setup.sh: into the project's .venv unless a virtual
# environment is active), then run the training comparison of examples/charlm (SOAP, Sophia-G, Sophia-H vs
# AdamW on a character-level GPT, JAX and PyTorch) with the same interpreter. No arguments: the small
# default (a few minutes on 2 CPU cores); results go to examples/charlm/runs/ (git-ignored). Arguments go
# to the comparison, e.g. `bash scripts/compare.sh --full` (see examples/charlm/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/python.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} MPLBACKEND=Agg
exec "$PY" -m examples.charlm.compare "$@"
