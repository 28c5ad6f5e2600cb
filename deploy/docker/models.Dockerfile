# syntax=docker/dockerfile:1
# medseg-models: an image that holds only a Triton model repository (config.pbtxt files and
# the exported ONNX models). Kubernetes runs it as an init container of both the gateway and
# Triton, copying /models into an emptyDir, so one tag versions the models for both sides.
# Export the repository for a target first, then build one image per target:
#   python -m export medsam_lite --target gpu --repository build/model-repository/gpu
#   docker build -f deploy/docker/models.Dockerfile \
#     --build-arg REPOSITORY=build/model-repository/gpu -t medseg-models:1-79d8c9dc-gpu .
FROM busybox:1.37.0
ARG REPOSITORY=model_repository
COPY ${REPOSITORY} /models
USER 10001:10001
# An init container copies and exits: there is no long-running process to health-check.
HEALTHCHECK NONE
ENTRYPOINT ["cp", "-R", "/models/.", "/repository/"]
