"""Start-up, health, graceful stop and start-up errors of a real gateway process."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from medseg_client import SegmentationClient, image_from_array
from tests.harness import REPO, GatewayProcess, wait_for

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
IMAGE = np.random.default_rng(1).integers(0, 255, (96, 80), dtype=np.uint8)


def test_health_goes_serving_only_after_models_are_warm(model_repository, tmp_path):
    gw = GatewayProcess(tmp_path, "--startup-delay-s", "3").start()
    try:
        assert gw.health() == NOT_SERVING
        assert gw.health("medseg.v1.Segmentation") == NOT_SERVING
        with SegmentationClient(gw.target) as client, pytest.raises(grpc.RpcError) as info:
            client.segment(image=image_from_array(IMAGE), boxes=[(10, 10, 50, 50)])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        gw.wait_serving()
        with SegmentationClient(gw.target) as client:
            assert len(client.segment(image=image_from_array(IMAGE), boxes=[(10, 10, 50, 50)]).masks) == 1
    finally:
        assert gw.stop() == 0


def test_sigterm_finishes_in_flight_requests(model_repository, tmp_path):
    gw = GatewayProcess(tmp_path).start().wait_serving()
    outcome: dict = {}
    # A large image and several prompts keep the request busy for a good fraction of a second.
    image = np.random.default_rng(2).integers(0, 255, (1500, 1500), dtype=np.uint8)
    boxes = [(10 + 50 * i, 10, 900 + 50 * i, 900) for i in range(8)]

    def call():
        with SegmentationClient(gw.target) as client:
            try:
                outcome["results"] = client.segment(image=image_from_array(image), boxes=boxes)
            except grpc.RpcError as exc:
                outcome["error"] = exc.code()

    before = gw.metrics_text()
    thread = threading.Thread(target=call)
    thread.start()
    # SIGTERM once the request is being handled (the in-flight gauge says so), not after a sleep.
    wait_for(lambda: "medseg_inflight_requests{backend=\"embedded\"} 1.0" in gw.metrics_text(), 30,
             "the request to be in flight")
    gw.terminate()
    thread.join(60)
    assert "error" not in outcome, outcome
    assert len(outcome["results"].masks) == 8
    assert gw.proc.wait(30) == 0
    assert before  # metrics were reachable while serving


def test_missing_model_files_are_a_clear_startup_error(tmp_path):
    empty = tmp_path / "repo"
    empty.mkdir()
    done = subprocess.run([sys.executable, "-m", "service", "--port", "0", "--metrics-port", "0",
                           "--model-repository", str(empty)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "no servable models" in done.stderr and "python -m export" in done.stderr
    assert "Traceback" not in done.stderr


def test_corrupt_model_file_is_a_clear_startup_error(model_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(model_repository, repo)
    (repo / "medsam_lite_encoder" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    done = subprocess.run([sys.executable, "-m", "service", "--port", "0", "--metrics-port", "0",
                           "--model-repository", str(repo)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "cannot be loaded by ONNX Runtime" in done.stderr
