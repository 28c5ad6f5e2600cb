# syntax=docker/dockerfile:1
# NVIDIA Triton Inference Server for medseg: the NGC image plus ONNX Runtime for the python
# backend, run as a non-root user. The model repository is NOT baked in: it comes from the
# medseg-models image through an init container (docs/DEPLOYMENT.md explains why).
#   docker build -f deploy/docker/triton.Dockerfile -t medseg-triton:0.1.0-triton25.08 .
# The NGC tag fixes the Triton release (25.08: Ubuntu 24.04, Python 3.12, whose wheels of
# onnxruntime 1.32 exist); mirror it and pin its digest (@sha256:...) at release time.
FROM nvcr.io/nvidia/tritonserver:25.08-py3
COPY deploy/docker/triton-python-requirements.txt /tmp/triton-python-requirements.txt
# --break-system-packages: Ubuntu 24.04 marks its Python as externally managed, and the
# python backend's stub runs that very interpreter.
RUN python3 -m pip install --no-cache-dir --break-system-packages -r /tmp/triton-python-requirements.txt \
 && rm /tmp/triton-python-requirements.txt \
 && groupadd --system --gid 10001 medseg \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin medseg
ENV HOME=/tmp
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=3)"]
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=none", "--strict-readiness=true"]
