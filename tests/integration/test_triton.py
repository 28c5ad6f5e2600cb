"""The gateway in front of a real tritonserver: same masks, concurrency, crash and recovery."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from export.dev_cases import iou, load_cases, reference_box
from medseg_client import SegmentationClient, image_from_array
from tests.harness import GatewayProcess, TritonProcess, fp32_repository, sampled_dev_cases, metric_value, wait_for

pytestmark = pytest.mark.slow
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def test_triton_masks_equal_the_embedded_backend_on_sampled_dev_cases(client, triton_gateway, shared_data):
    worst = 1.0
    cases = sampled_dev_cases(load_cases(shared_data / "dev"))  # those test_dev_cases.py sends: cached
    with SegmentationClient(triton_gateway.target, timeout=120) as via_triton:
        for case in cases:
            b = reference_box(case.mask)
            box = [(b.x0, b.y0, b.x1, b.y1)]
            image = image_from_array(case.image)
            embedded = client.segment(image=image, boxes=box)
            served = via_triton.segment(image=image, boxes=box)
            assert served.model_version == embedded.model_version
            case_iou = iou(served.masks[0], embedded.masks[0])
            worst = min(worst, case_iou)
            assert case_iou >= 0.999, case.case_id
    print(f"worst mask IoU triton vs embedded over {len(cases)} dev cases: {worst:.6f}")


def test_eight_concurrent_clients_complete_through_the_dynamic_batcher(triton, triton_gateway):
    before = triton.metrics_text()
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 255, (128, 128), dtype=np.uint8) for _ in range(16)]

    def work(worker: int) -> int:
        done = 0
        with SegmentationClient(triton_gateway.target, timeout=120) as c:
            for image in images[worker::8]:
                result = c.segment(image=image_from_array(image), boxes=[(10, 10, 100, 100)])
                done += len(result.masks)
        return done

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(work, range(8))) == 16
    after = triton.metrics_text()
    enc = {"model": "medsam_lite_encoder"}
    requests = (metric_value(after, "nv_inference_count", **enc)
                - metric_value(before, "nv_inference_count", default=0.0, **enc))
    executions = (metric_value(after, "nv_inference_exec_count", **enc)
                  - metric_value(before, "nv_inference_exec_count", default=0.0, **enc))
    print(f"encoder: {requests:.0f} inferences in {executions:.0f} executions")
    assert requests == 16 and 1 <= executions <= 16


def test_gateway_metrics_carry_the_triton_backend_label_and_triton_metrics_are_reachable(triton, triton_gateway):
    with SegmentationClient(triton_gateway.target) as c:
        c.segment(image=image_from_array(np.full((64, 64), 7, np.uint8)), boxes=[(4, 4, 40, 40)])
    text = triton_gateway.metrics_text()
    assert metric_value(text, "medseg_requests_total", method="Segment", code="OK", backend="triton") >= 1
    assert metric_value(text, "medseg_backend_ready", backend="triton") == 1
    assert metric_value(triton.metrics_text(), "nv_inference_request_success", model="medsam_lite_decoder") >= 1


def test_triton_crash_gives_unavailable_fast_and_the_gateway_recovers_without_restart(model_repository, tmp_path):
    repository = fp32_repository(tmp_path)
    server, gw = TritonProcess(tmp_path / "triton", repository), None
    try:  # started inside: whatever fails, both are stopped by PID
        server.start()  # may move to fresh ports if one was taken: build the gateway's target after
        gw = GatewayProcess(tmp_path / "gw", "--backend", "triton", "--triton-url", server.grpc_target,
                            "--model-repository", str(repository))
        gw.start().wait_serving()
        rng = np.random.default_rng(3)
        with SegmentationClient(gw.target, timeout=30) as c:
            c.segment(image=image_from_array(rng.integers(0, 255, (96, 96), dtype=np.uint8)), boxes=[(5, 5, 60, 60)])
            server.kill()
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                c.segment(image=image_from_array(rng.integers(0, 255, (96, 96), dtype=np.uint8)),
                          boxes=[(5, 5, 60, 60)])
            failed_after = time.monotonic() - start
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert failed_after < 2.0
            wait_for(lambda: gw.health() == NOT_SERVING, 5, "health NOT_SERVING after the crash")
            server.start()  # same ports, fresh process
            wait_for(lambda: gw.health() == SERVING, 60, "health SERVING after Triton is back")
            result = c.segment(image=image_from_array(rng.integers(0, 255, (96, 96), dtype=np.uint8)),
                               boxes=[(5, 5, 60, 60)])
            assert len(result.masks) == 1
        assert gw.proc.poll() is None  # the same gateway process throughout
    finally:
        try:
            if gw is not None:
                gw.stop()
        finally:
            server.stop()
