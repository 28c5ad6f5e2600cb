"""Generated from protos/medseg/v1/*.proto by scripts/gen_protos.sh (`make protos`); do not edit."""
