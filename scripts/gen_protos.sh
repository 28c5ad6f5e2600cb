#!/usr/bin/env bash
# Generate the Python gRPC code for protos/ into the (git-ignored) package medseg/.
# Run by `make protos` (and so by `make serve` / `make test`); never edit the output.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. \
  $(find protos -name '*.proto' | sort)
