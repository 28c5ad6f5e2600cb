"""Memory and threads of a real gateway process under the worst admitted request shape and
under abandoned work (issue 14, findings 3 and 6), read from ``/proc/PID/status`` (``VmHWM``
reset through ``/proc/PID/clear_refs`` before each measured step, ``VmRSS``, ``Threads``).

* 40 megapixels with 32 box prompts: masks are upsampled and encoded one prompt at a time and
  the call is charged its estimate, so its peak stays within that estimate (it was +6.6 GiB:
  every prompt's float32 logits at full size at once) and memory returns to the baseline;
* many calls with tiny deadlines on a large image: an abandoned call keeps its slot and its
  memory charge until its thread stops at the next stage boundary, so the worker threads and
  the peak RSS stay within the admission bounds (it was a thread and a decode per call), and
  the gateway answers the next normal call.
"""

from __future__ import annotations

import io
import os
import threading

import grpc
import numpy as np
import pytest
from PIL import Image

from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import segmentation_pb2_grpc as pb_grpc
from service.core.domain import Box, ImageInput, MaskEncoding, Prompt, RawPixels, SegmentRequest
from service.core.request_memory import segment_estimate
from tests.harness import GatewayProcess, proc_status, reset_peak, wait_for

pytestmark = pytest.mark.slow
MIB = 1 << 20
H, W = 5000, 8000  # 40 megapixels: the default --max-image-pixels
BUDGET = 2 << 30   # the default --memory-budget-bytes


class ThreadWatch:
    """The most threads process ``pid`` had while the body ran (polled every 10 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.most = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, proc_status(self.pid)["Threads"])
            self._stop.wait(0.01)

    def __enter__(self) -> "ThreadWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _boxes(n: int) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(14)
    out = []
    for _ in range(n):
        x0, y0 = int(rng.integers(0, W - 2000)), int(rng.integers(0, H - 2000))
        out.append((x0, y0, x0 + int(rng.integers(200, 2000)), y0 + int(rng.integers(200, 2000))))
    return out


def _pixels() -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    return ((np.sin(xx / 300.0) + np.cos(yy / 200.0) + 2.0) * 60.0).astype(np.uint8)


@pytest.fixture(scope="module")
def big_gateway(model_repository, tmp_path_factory):
    proc = GatewayProcess(tmp_path_factory.mktemp("gateway-memory"), "--backend", "embedded",
                          "--default-model", "medsam_lite", "--max-inflight", "2", "--max-queue", "4",
                          "--max-abandoned", "2", "--cache-bytes", str(64 * MIB))
    proc.start().wait_serving()
    yield proc
    proc.stop()


def _stub(gateway: GatewayProcess):
    channel = grpc.insecure_channel(gateway.target, options=[("grpc.max_send_message_length", 64 * MIB),
                                                             ("grpc.max_receive_message_length", 64 * MIB)])
    return channel, pb_grpc.SegmentationStub(channel)


def _small_call(stub) -> pb.SegmentResponse:
    image = pb.Image(raw=pb.RawArray(dtype=pb.DTYPE_UINT8, shape=[64, 64], data=bytes(range(64)) * 64))
    return stub.Segment(pb.SegmentRequest(image=image, prompts=[pb.Prompt(box=pb.Box(x0=8, y0=8, x1=40, y1=40))]),
                        timeout=60)


def test_the_worst_admitted_shape_stays_within_its_estimate_and_memory_returns(big_gateway):
    pixels = _pixels()
    boxes = _boxes(32)
    request = pb.SegmentRequest(image=pb.Image(raw=pb.RawArray(dtype=pb.DTYPE_UINT8, shape=[H, W],
                                                               data=pixels.tobytes())),
                                prompts=[pb.Prompt(box=pb.Box(x0=a, y0=b, x1=c, y1=d)) for a, b, c, d in boxes],
                                encoding=pb.MASK_ENCODING_PNG)
    domain = SegmentRequest("medsam_lite", tuple(Prompt(box=Box(*b)) for b in boxes),
                            ImageInput(raw=RawPixels("uint8", (H, W), b"\0" * (H * W))), encoding=MaskEncoding.PNG)
    estimate = segment_estimate(domain, answer_limit=64 * MIB)
    assert estimate.total <= BUDGET  # admitted under the default budget
    pid = big_gateway.proc.pid
    channel, stub = _stub(big_gateway)
    with channel:
        _small_call(stub)  # warm
        before = proc_status(pid)
        if not reset_peak(pid):
            pytest.skip("cannot reset VmHWM of the gateway (/proc/PID/clear_refs)")
        answer = stub.Segment(request, timeout=600)
        peak = proc_status(pid)["VmHWM"]
        after = proc_status(pid)
        assert len(answer.masks) == 32 and all(m.height == H and m.width == W and m.area > 0 for m in answer.masks)
        assert _small_call(stub).masks  # still serving
    delta = peak - before["VmRSS"]
    print(f"\n40 MP x 32 boxes: peak RSS +{delta / MIB:.0f} MiB (estimate {estimate.total / MIB:.0f} MiB, "
          f"budget {BUDGET / MIB:.0f} MiB), RSS after {after['VmRSS'] / MIB:.0f} MiB "
          f"(before {before['VmRSS'] / MIB:.0f} MiB)")
    assert delta <= estimate.total, (delta / MIB, estimate.describe())
    assert after["VmRSS"] <= before["VmRSS"] + 256 * MIB  # back to the baseline


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def test_abandoned_calls_keep_threads_and_memory_bounded_and_the_next_call_is_served(big_gateway):
    encoded = _png(np.full((H, W), 90, np.uint8))  # a few KB in, 40 MP to decode
    request = pb.SegmentRequest(image=pb.Image(encoded=encoded), prompts=[pb.Prompt(box=pb.Box(x0=10, y0=10,
                                                                                              x1=900, y1=700))])
    pid = big_gateway.proc.pid
    channel, stub = _stub(big_gateway)
    with channel:
        _small_call(stub)
        before = proc_status(pid)
        if not reset_peak(pid):
            pytest.skip("cannot reset VmHWM of the gateway (/proc/PID/clear_refs)")
        codes: list[grpc.StatusCode] = []
        with ThreadWatch(pid) as threads:
            for _ in range(12):  # waves of calls, each new one sent when the previous gave up
                futures = [stub.Segment.future(request, timeout=0.3) for _ in range(2)]
                for future in futures:
                    try:
                        future.result()
                        codes.append(grpc.StatusCode.OK)
                    except grpc.RpcError as exc:
                        codes.append(exc.code())
            # every abandoned thread stops at its next stage boundary and gives its slot back
            wait_for(lambda: "medseg_admission_abandoned 0.0" in big_gateway.metrics_text()
                     and "medseg_admission_running 0.0" in big_gateway.metrics_text(), 120, "abandoned work to end")
        peak = proc_status(pid)["VmHWM"]
        assert _small_call(stub).masks  # the next normal call is served
    assert set(codes) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    extra_threads = threads.most - before["Threads"]
    delta = peak - before["VmRSS"]
    print(f"\n{len(codes)} abandoned calls: +{extra_threads} threads at most, peak RSS +{delta / MIB:.0f} MiB, "
          f"statuses {sorted(c.name for c in codes)}")
    assert extra_threads <= 2  # at most --max-inflight work threads, abandoned ones included
    assert delta <= BUDGET
    assert os.path.exists(f"/proc/{pid}")
