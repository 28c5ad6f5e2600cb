# Quick start:  make serve   (install, export, serve LiteMedSAM on ONNX Runtime)
#               make test    (the whole test suite; what CI runs)
VENV      ?= .venv
PY        := $(VENV)/bin/python
REPO      ?= model_repository
HOST      ?= 127.0.0.1
PORT      ?= 50051
METRICS_PORT ?= 9090
MODELS    := $(REPO)/medsam_lite_encoder/1/model.onnx $(REPO)/medsam_lite_decoder/1/model.onnx
PROTO_OUT := medseg/v1/segmentation_pb2.py

.PHONY: install protos models serve test test-unit clean
.DEFAULT_GOAL := serve

install:
	@scripts/bootstrap.sh

$(PROTO_OUT): protos/medseg/v1/segmentation.proto | install
	PY=$(PY) scripts/gen_protos.sh

protos: install $(PROTO_OUT)

$(MODELS) &: | install
	$(PY) -m export medsam_lite --repository $(REPO)

models: install $(MODELS)

serve: protos models
	$(PY) -m service --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT) \
	  --backend embedded --model-repository $(REPO)

test: protos models
	$(PY) -m pytest

test-unit: protos
	$(PY) -m pytest tests/unit

clean:
	rm -rf medseg $(REPO)/*/1 .pytest_cache
