"""Triton hangs (SIGSTOP): calls end within the client's deadline, health goes NOT_SERVING,
later calls fail fast, and everything recovers when Triton resumes, without a restart."""

from __future__ import annotations

import json
import os
import signal
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from medseg_client import SegmentationClient, image_from_array
from tests.harness import wait_for

pytestmark = pytest.mark.slow
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
BOX = [(5, 5, 60, 60)]


def _image(seed: int):
    return image_from_array(np.random.default_rng(seed).integers(0, 255, (96, 96), dtype=np.uint8))


def _timed_code(fn) -> tuple[grpc.StatusCode, float]:
    start = time.monotonic()
    try:
        fn()
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
    return code, time.monotonic() - start


def test_triton_hang_ends_calls_by_their_deadline_and_recovers_without_restart(triton, triton_gateway):
    """The gateway's backend timeout is 120 s here: only the client's 3 s deadline, passed
    down as Triton's client_timeout, can end the hung call that quickly."""
    gw_pid = triton_gateway.proc.pid
    with SegmentationClient(triton_gateway.target, timeout=60) as client:
        client.segment(image=_image(100), boxes=BOX)  # warm and serving
        os.kill(triton.proc.pid, signal.SIGSTOP)
        try:
            code, elapsed = _timed_code(lambda: client.segment(image=_image(101), boxes=BOX, timeout=3.0))
            assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
            assert elapsed < 3.8, elapsed
            start = time.monotonic()
            wait_for(lambda: triton_gateway.health() == NOT_SERVING, 10, "health NOT_SERVING while Triton hangs")
            detected_after = time.monotonic() - start
            code, elapsed = _timed_code(lambda: client.segment(image=_image(102), boxes=BOX, timeout=30))
            assert code == grpc.StatusCode.UNAVAILABLE and elapsed < 1.0, (code, elapsed)
        finally:
            os.kill(triton.proc.pid, signal.SIGCONT)
        wait_for(lambda: triton_gateway.health() == SERVING, 60, "health SERVING after Triton resumes")
        assert len(client.segment(image=_image(103), boxes=BOX).masks) == 1
    assert triton_gateway.proc.pid == gw_pid and triton_gateway.proc.poll() is None
    print(f"health NOT_SERVING at most {detected_after:.1f} s after the hung call ended")
    audit = [json.loads(line) for line in triton_gateway.log().splitlines() if line.startswith("{")]
    hung = [line for line in audit if line["status"] == "DEADLINE_EXCEEDED" and line["method"] == "Segment"]
    assert hung and hung[-1]["latency_ms"] < 3800  # the gateway itself gave up at the client's deadline
