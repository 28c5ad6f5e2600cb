"""A real gateway (``python -m service``, embedded ONNX Runtime backend, real LiteMedSAM
export) on an ephemeral loopback port, shared by the integration tests of one session."""

from __future__ import annotations

import pytest

from medseg_client import SegmentationClient
from tests.harness import GatewayProcess, TritonProcess, ensure_models, fp32_repository
from tests.sam_models import tiny_sam_repository

# Small enough to test RESOURCE_EXHAUSTED cheaply, large enough for every real test image.
MAX_REQUEST_BYTES = 8 * 1024 * 1024


@pytest.fixture(scope="session")
def model_repository():
    return ensure_models()


@pytest.fixture(scope="session")
def gateway(model_repository, tmp_path_factory):
    # fp32 pinned (--default-model auto may choose a faster variant): these tests check the
    # fp32 model's answers against PyTorch; tests/integration/test_default_model.py tests auto.
    proc = GatewayProcess(tmp_path_factory.mktemp("gateway"), "--backend", "embedded", "--default-model", "medsam_lite",
                          "--max-request-bytes", str(MAX_REQUEST_BYTES), "--max-prompts", "8")
    try:  # a start or warm-up that fails still stops the process
        proc.start().wait_serving()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def client(gateway):
    with SegmentationClient(gateway.target, timeout=60.0, max_message_mb=32) as c:
        yield c


@pytest.fixture(scope="session")
def triton(model_repository, tmp_path_factory):
    """A real tritonserver (nvidia-pytriton wheel, python backend + ONNX Runtime) on loopback,
    serving the fp32 LiteMedSAM entries (``proc.repository``; the variants have their own Triton
    tests: test_encoder_variants.py, test_sam_checkpoint.py)."""
    tmp = tmp_path_factory.mktemp("triton")
    proc = TritonProcess(tmp, fp32_repository(tmp))
    try:  # start() kills what it started when it fails; stop() covers everything after
        proc.start()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def triton_gateway(triton, tmp_path_factory):
    """A second real gateway, ``--backend triton``, in front of the ``triton`` fixture."""
    proc = GatewayProcess(tmp_path_factory.mktemp("gateway-triton"), "--backend", "triton",
                          "--triton-url", triton.grpc_target, "--model-repository", str(triton.repository),
                          "--max-prompts", "8", "--default-model", "medsam_lite",
                          "--backend-timeout-s", "120")
    try:
        proc.start().wait_serving()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def tiny_sam(model_repository, tmp_path_factory):
    """(repository, checkpoint, export output): a tiny random SAM exported once per session by
    ``python -m export sam`` (its PyTorch parity check on one image), LiteMedSAM linked beside it."""
    return tiny_sam_repository(tmp_path_factory.mktemp("tiny-sam"), check_cases=1)
