#!/usr/bin/env bash
# Install what is missing into the project-local virtual environment (.venv).
# Idempotent: a stamp holding the hash of the requirement files skips a finished install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp="$VENV/.installed"
want=$(cat requirements/*.txt pyproject.toml client/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV with $PYTHON ($("$PYTHON" --version))"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
C=(-c requirements/constraints.txt)
# torch first, alone, at the pinned CPU build; every later install is constrained to it.
"${pip[@]}" "${C[@]}" torch
"${pip[@]}" "${C[@]}" -r requirements/base.txt -r requirements/test.txt -r requirements/training.txt
"${pip[@]}" "${C[@]}" --no-deps -r requirements/nodeps.txt
# The client SDK is its own package (client/); the gateway and the tests use it from the tree.
"${pip[@]}" --no-deps -e ./client
echo "$want" > "$stamp"
echo "bootstrap: environment ready in $VENV"
