#!/usr/bin/env bash
# Quickstart, command 1: install everything (scripts/setup.sh), then run the training comparison of
# examples/charlm (SOAP, Sophia-G, Sophia-H vs AdamW on a character-level GPT, JAX and PyTorch).
# No arguments: the small default (a few minutes on 2 CPU cores). Arguments go to the comparison,
# e.g. `bash scripts/compare.sh --full` for the full-scale run (see examples/charlm/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} MPLBACKEND=Agg
exec "$PY" -m examples.charlm.compare "$@"
