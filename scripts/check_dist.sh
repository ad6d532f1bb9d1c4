#!/usr/bin/env bash
# The distribution as a user installs it: build the wheel and the sdist (python -m build), check them
# (twine check), install the wheel -- not this checkout -- into a fresh virtual environment (torch pinned
# first, as in setup.sh) and take a tiny so_optax step and a tiny torch_bridge step from it, outside the
# source tree. Run by .ci/run; uses the interpreter of scripts/python.sh for build and twine.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python.sh
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
TORCH=${SO_OPTAX_TORCH:-torch==2.13.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PY" -m build -q --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
"$PY" -m twine check --strict "$work"/dist/*
wheel=$(ls "$work"/dist/*.whl)
"$PY" - "$wheel" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
missing = {f"{pkg}/py.typed" for pkg in ("so_optax", "torch_bridge", "so_common")} - names
assert not missing, f"the wheel lacks {sorted(missing)}"
PY

"$PY" -m venv "$work/venv"
# --no-compile: a throwaway environment, no need to byte-compile torch's and jax's sources
"$work/venv/bin/python" -m pip install -q --no-compile "$TORCH"
"$work/venv/bin/python" -m pip install -q --no-compile "$wheel[jax]"
cd "$work"  # outside the checkout: the installed wheel, not ./src, is what imports
JAX_PLATFORMS=cpu "$work/venv/bin/python" - <<'PY'
from importlib.metadata import version

import jax.numpy as jnp
import optax
import torch

import so_optax
import torch_bridge

assert so_optax.__version__ == torch_bridge.__version__ == version("so-optax"), so_optax.__version__
assert "/site-packages/" in so_optax.__file__, so_optax.__file__

params = {"w": jnp.ones((3, 2))}
tx = optax.chain(so_optax.soap(), optax.scale(-1e-2))
state = tx.init(params)
for _ in range(2):
    updates, state = tx.update({"w": jnp.full((3, 2), 0.5)}, state, params)
    params = optax.apply_updates(params, updates)
assert float(params["w"][0, 0]) < 1.0

w = torch.nn.Parameter(torch.ones(3, 2))
opt = torch_bridge.SOAP([w], lr=1e-2)
for _ in range(2):
    w.grad = torch.full((3, 2), 0.5)
    opt.step()
assert float(w.detach()[0, 0]) < 1.0
print(f"so-optax {so_optax.__version__}: wheel and sdist built and checked; the installed wheel steps in JAX and torch")
PY
