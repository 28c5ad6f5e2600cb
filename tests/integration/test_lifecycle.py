"""Start-up, health, graceful stop and start-up errors of a real gateway process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medseg_client import SegmentationClient, image_from_array
from tests.harness import REPO, GatewayProcess, metric_value, wait_for

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
IMAGE = np.random.default_rng(1).integers(0, 255, (96, 80), dtype=np.uint8)


def _stage_count(metrics: str, stage: str, model: str) -> float:
    return metric_value(metrics, "medseg_stage_duration_seconds_count", default=0.0, stage=stage, model=model)


def test_health_goes_serving_only_after_models_are_warm(model_repository, tmp_path):
    gw = GatewayProcess(tmp_path, "--startup-delay-s", "3")
    try:
        gw.start()
        assert gw.health() == NOT_SERVING
        assert gw.health("medseg.v1.Segmentation") == NOT_SERVING
        with SegmentationClient(gw.target) as client, pytest.raises(grpc.RpcError) as info:
            client.segment(image=image_from_array(IMAGE), boxes=[(10, 10, 50, 50)])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # Poll health as fast as it answers, on one channel; the moment it first says SERVING,
        # scrape the metrics: the warm-up's own encoder and decoder runs (no call has been served
        # yet) must already be counted for every model. A gateway that went SERVING before (or
        # without) warming up shows zero there, since one encoder run alone takes far longer
        # than this poll + scrape.
        with grpc.insecure_channel(gw.target) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check

            def serving() -> bool:
                try:
                    return check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING
                except grpc.RpcError:
                    return False

            wait_for(serving, 120, "health SERVING", interval=0.002)
            at_serving = gw.metrics_text()
        with SegmentationClient(gw.target) as client:
            models = [m.name for m in client.list_models()]
            assert models
            for name in models:
                warmed = {s for s in ("encoder", "mask_decoder", "segmenter") if _stage_count(at_serving, s, name) >= 1}
                assert warmed in ({"encoder", "mask_decoder"}, {"segmenter"}), (
                    f"{name}: health said SERVING before its warm-up ran (stages counted: {sorted(warmed)})")
            assert metric_value(at_serving, "medseg_requests_total", default=0.0, method="Segment", code="OK") == 0
            assert len(client.segment(image=image_from_array(IMAGE), boxes=[(10, 10, 50, 50)]).masks) == 1
    finally:
        assert gw.stop() == 0


def _audit(log: str) -> list[tuple[int, dict]]:
    """(offset in the log, record) of every audit line."""
    out, offset = [], 0
    for line in log.splitlines(keepends=True):
        if line.startswith("{"):
            try:
                out.append((offset, json.loads(line)))
            except ValueError:
                pass
        offset += len(line)
    return out


def test_sigterm_finishes_in_flight_requests(model_repository, tmp_path):
    gw = GatewayProcess(tmp_path)
    outcome: dict = {}
    # A large image and several prompts keep the request busy for a good fraction of a second.
    image = np.random.default_rng(2).integers(0, 255, (1500, 1500), dtype=np.uint8)
    boxes = [(10 + 50 * i, 10, 900 + 50 * i, 900) for i in range(8)]
    stopping = "stopping: health NOT_SERVING, draining in-flight requests"

    def call():
        with SegmentationClient(gw.target) as client:
            try:
                outcome["results"] = client.segment(image=image_from_array(image), boxes=boxes)
            except grpc.RpcError as exc:
                outcome["error"] = (exc.code(), exc.details())
            # The gateway's log as it stood when the answer arrived (it writes unbuffered).
            outcome["log_at_answer"] = gw.log()

    thread = threading.Thread(target=call)
    try:
        gw.start().wait_serving()
        thread.start()
        # SIGTERM once the request is being handled (the in-flight gauge says so), not after a sleep.
        # (The labelled gauge has no sample before the first call: 0 then, but it must be declared.)
        wait_for(lambda: metric_value(gw.metrics_text(), "medseg_inflight_requests", default=0.0,
                                      backend="embedded") >= 1, 30, "the request to be in flight")
        gw.terminate()
        thread.join(60)
        assert not thread.is_alive(), "the in-flight call did not end within 60 s of SIGTERM"
        assert "error" not in outcome, outcome
        assert len(outcome["results"].masks) == 8
        # SIGTERM arrived while the call ran: the gateway had begun stopping before its answer came back ...
        assert stopping in outcome["log_at_answer"], "the call was answered before the gateway saw SIGTERM"
        assert gw.proc.wait(30) == 0
        # ... and on the gateway's side the call ended (audited OK) after stopping began.
        log = gw.log()
        segments = [(at, r) for at, r in _audit(log) if r.get("method") == "Segment"]
        assert [r["status"] for _, r in segments] == ["OK"], segments
        assert log.index(stopping) < segments[0][0]
    finally:
        gw.stop()
        if thread.is_alive():
            thread.join(10)


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
