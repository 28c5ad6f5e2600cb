#!/usr/bin/env bash
# Generate the Python gRPC code for protos/ into client/medseg_client/_generated/ (git-ignored:
# generated, never edited; tests/unit/test_generated_protos.py fails when it is stale).
# Run by `make protos` (and so by `make serve` / `make test`) before the client is built.
# OUT (output folder) and PROTO_DIR (the .proto tree) default to the committed locations; the
# staleness test points them at temporary folders.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-client/medseg_client/_generated}
PROTO_DIR=${PROTO_DIR:-protos}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m grpc_tools.protoc -I "$PROTO_DIR" --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  $(find "$PROTO_DIR" -name '*.proto' | sort)
mkdir -p "$OUT"
for f in "$tmp"/medseg/v1/*; do
  # The stubs import each other as medseg.v1.X; inside this package they are siblings.
  sed -E 's/^from medseg\.v1 import /from . import /' "$f" > "$OUT/$(basename "$f")"
done
cat > "$OUT/__init__.py" <<'PY'
"""Generated from protos/medseg/v1/*.proto by scripts/gen_protos.sh (`make protos`); do not edit."""
PY
