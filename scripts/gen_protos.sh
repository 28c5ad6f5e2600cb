#!/usr/bin/env bash
# Generate the Python gRPC code for protos/ into client/medseg_client/_generated/ (committed,
# so the client package installs without grpcio-tools; tests/unit/test_generated_protos.py
# fails when it is stale). Run by `make protos`; never edit the output by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=client/medseg_client/_generated
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m grpc_tools.protoc -I protos --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  $(find protos -name '*.proto' | sort)
mkdir -p "$OUT"
for f in "$tmp"/medseg/v1/*; do
  # The stubs import each other as medseg.v1.X; inside this package they are siblings.
  sed -E 's/^from medseg\.v1 import /from . import /' "$f" > "$OUT/$(basename "$f")"
done
cat > "$OUT/__init__.py" <<'PY'
"""Generated from protos/medseg/v1/*.proto by scripts/gen_protos.sh (`make protos`); do not edit."""
PY
