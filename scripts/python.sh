# Sourced by the scripts: sets PY, the interpreter every script uses (setup, tests, the comparison).
#   1. $PYTHON if set, e.g. `PYTHON=python3 bash scripts/test.sh` for an interpreter that already has the
#      dependencies (setup.sh then installs into that interpreter's environment);
#   2. else the active virtual environment ($VIRTUAL_ENV);
#   3. else the project's own environment .venv in the repository root (git-ignored; setup.sh creates it).
if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
  PY=$VIRTUAL_ENV/bin/python
else
  PY=$PWD/.venv/bin/python
fi
