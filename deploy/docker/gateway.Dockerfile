# syntax=docker/dockerfile:1
# The medseg gateway (`python -m service`). Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t medseg-gateway:0.1.0 .
# Runtime: non-root (uid 10001), no pip/compilers, works with a read-only root file system
# (bytecode compiled at build time; /tmp is the only writable path it needs).
# Models are not baked in: mount a model repository at /models (Kubernetes: the
# medseg-models init container; docker: -v "$PWD/model_repository:/models:ro").

# ---- build: virtual environment with the gateway's runtime dependencies
# Both stages use the same base: the venv built here runs on the runtime stage's Python.
FROM python:3.11.7-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY requirements/constraints.txt requirements/constraints.txt
COPY deploy/docker/gateway-requirements.txt gateway-requirements.txt
# Runtime venv without pip/setuptools afterwards; grpcio-tools lives in a throw-away venv.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c requirements/constraints.txt -r gateway-requirements.txt \
 && /opt/venv/bin/python -m pip uninstall --yes pip setuptools \
 && python -m venv /opt/protoc \
 && /opt/protoc/bin/pip install -c requirements/constraints.txt grpcio-tools
# The server imports the client package's generated stubs: generate them here.
COPY protos protos
COPY scripts/gen_protos.sh scripts/gen_protos.sh
COPY client/medseg_client client/medseg_client
RUN PY=/opt/protoc/bin/python scripts/gen_protos.sh && mv client/medseg_client medseg_client
COPY service service
COPY deploy/docker/grpc_health_check.py service_healthcheck.py
RUN /opt/venv/bin/python -m compileall -q /opt/venv service medseg_client service_healthcheck.py

# ---- runtime
FROM python:3.11.7-slim-bookworm AS runtime
# No package installer in the final image.
RUN python -m pip uninstall --yes pip setuptools wheel \
 && groupadd --system --gid 10001 medseg \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin medseg
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MEDSEG_HOST=0.0.0.0 \
    MEDSEG_METRICS_HOST=0.0.0.0 \
    MEDSEG_MODEL_REPOSITORY=/models
WORKDIR /opt/medseg
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/medseg_client medseg_client
COPY --from=build /src/service service
COPY --from=build /src/service_healthcheck.py healthcheck.py
USER 10001:10001
EXPOSE 50051 9090
# grpc.health.v1 Check on the gRPC port: SERVING once the models are loaded and warm.
# (Kubernetes ignores HEALTHCHECK and uses its native gRPC probes on the same service.)
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/opt/medseg/healthcheck.py"]
# The same command as `make serve` / the README: settings come as flags (CMD or Kubernetes
# args) or MEDSEG_* environment variables.
ENTRYPOINT ["python", "-m", "service"]
