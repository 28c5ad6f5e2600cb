"""The single-flight encode belongs to no caller (issue 14, finding 4): two callers send the
same image, the first is cancelled or passes its deadline while the shared encode runs, and
the second still gets its answer (or its own DEADLINE_EXCEEDED), never silence or a hang.

The real pipeline, gateway and servicer run over the real LiteMedSAM repository entries with
a fake backend whose encoder waits on a gate (a slow model under the test's control)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import segmentation_pb2_grpc as pb_grpc
from service.core import errors
from service.core.domain import ImageInput, ImageLimits, RawPixels
from service.edge.deadline import DeadlineBoundBackend
from service.edge.server import create_server
from service.inference.cache import ImageCache
from service.inference.gateway import Gateway
from service.inference.observer import NullObserver
from service.inference.pipeline import SamPipeline
from service.observability.metrics import Metrics
from service.security.auth import Authenticator
from service.settings import Settings
from tests.unit.fake_sam import REPOSITORY, FakeSamBackend, sam_model

H, W = 48, 64
PIXELS = (np.arange(H * W) % 251).astype(np.uint8)
IMAGE = ImageInput(raw=RawPixels("uint8", (H, W), PIXELS.tobytes()))


class CountingObserver(NullObserver):
    """Counts cache hits: a caller joining an encode already under way counts one."""

    def __init__(self) -> None:
        self.hits = 0

    def cache_hit(self, model: str) -> None:
        self.hits += 1


def _pipeline(backend: FakeSamBackend) -> SamPipeline:
    return SamPipeline(sam_model(), backend, ImageCache(1 << 30, 600.0), CountingObserver(), ImageLimits(), 8, 30.0)


async def _until(predicate, what: str, tries: int = 500) -> None:
    """Yield to the loop until ``predicate()`` holds (a wait, not a timing assertion)."""
    for _ in range(tries):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def _two_waiting(pipeline: SamPipeline, backend: FakeSamBackend, first_call):
    backend.encoder_gate, backend.encoder_started = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(first_call())
    await asyncio.wait_for(backend.encoder_started.wait(), 10)
    second = asyncio.create_task(pipeline.embed(IMAGE))
    await _until(lambda: pipeline._metrics.hits == 1, "the second caller joins the encode under way")
    return first, second


@pytest.mark.parametrize("how", ["cancelled", "deadline"])
def test_the_second_caller_gets_its_answer_when_the_first_leaves_mid_encode(how):
    async def main():
        backend = FakeSamBackend()
        pipeline = _pipeline(backend)

        async def first_call():
            if how == "deadline":
                async with asyncio.timeout(0.2):
                    return await pipeline.embed(IMAGE)
            return await pipeline.embed(IMAGE)

        first, second = await _two_waiting(pipeline, backend, first_call)
        if how == "cancelled":
            first.cancel()
        with pytest.raises(asyncio.CancelledError if how == "cancelled" else TimeoutError):
            await first
        backend.encoder_gate.set()
        image_id, entry, cached = await asyncio.wait_for(second, 10)
        assert entry.output.shape == (1, 256, 64, 64) and (entry.frame.height, entry.frame.width) == (H, W)
        assert cached  # it joined the first caller's encode
        assert backend.calls[backend.encoder.name] == 1
        assert not pipeline._pending
        # the result is cached for everyone: a third call costs no encoder run
        assert (await pipeline.embed(IMAGE))[2] and backend.calls[backend.encoder.name] == 1

    asyncio.run(main())


def test_the_second_caller_gets_its_own_deadline_and_the_first_its_answer():
    async def main():
        backend = FakeSamBackend()
        pipeline = _pipeline(backend)
        backend.encoder_gate, backend.encoder_started = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(pipeline.embed(IMAGE))
        await asyncio.wait_for(backend.encoder_started.wait(), 10)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pipeline.embed(IMAGE), 0.3)
        assert pipeline._pending  # the first still waits, the work goes on
        backend.encoder_gate.set()
        _, entry, cached = await asyncio.wait_for(first, 10)
        assert not cached and entry.output.shape == (1, 256, 64, 64)

    asyncio.run(main())


def test_when_every_waiter_has_left_the_shared_encode_stops_and_the_next_call_starts_afresh():
    async def main():
        backend = FakeSamBackend()
        pipeline = _pipeline(backend)
        first, second = await _two_waiting(pipeline, backend, lambda: pipeline.embed(IMAGE))
        (shared,) = pipeline._pending.values()
        first.cancel()
        second.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        await _until(shared.task.done, "the shared encode stops")
        assert shared.task.cancelled() and shared.work.abandoned and not pipeline._pending
        backend.encoder_gate.set()
        _, entry, cached = await asyncio.wait_for(pipeline.embed(IMAGE), 10)
        assert not cached and backend.calls[backend.encoder.name] == 2

    asyncio.run(main())


def test_an_encoder_error_reaches_every_waiter_and_is_not_cached():
    async def main():
        backend = FakeSamBackend()
        pipeline = _pipeline(backend)
        first, second = await _two_waiting(pipeline, backend, lambda: pipeline.embed(IMAGE))
        backend.fail = errors.Unavailable("backend down")
        backend.encoder_gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 10)
        assert [type(r) for r in results] == [errors.Unavailable] * 2, results
        assert not pipeline._pending
        backend.fail = None
        assert not (await asyncio.wait_for(pipeline.embed(IMAGE), 10))[2]  # encoded afresh, now cached
        assert backend.calls[backend.encoder.name] == 2

    asyncio.run(main())


def test_shared_work_stopped_under_its_waiters_gives_them_a_status_not_silence():
    async def main():
        backend = FakeSamBackend()
        pipeline = _pipeline(backend)
        first, second = await _two_waiting(pipeline, backend, lambda: pipeline.embed(IMAGE))
        (shared,) = pipeline._pending.values()
        shared.task.cancel()  # e.g. shutdown: not one of the waiters leaving
        results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 10)
        assert [type(r) for r in results] == [errors.Unavailable] * 2, results

    asyncio.run(main())


# --------------------------------------------------------------------------- over gRPC
def _request() -> pb.SegmentRequest:
    image = pb.Image(raw=pb.RawArray(dtype=pb.DTYPE_UINT8, shape=[H, W], data=PIXELS.tobytes()))
    return pb.SegmentRequest(image=image, prompts=[pb.Prompt(box=pb.Box(x0=8, y0=8, x1=40, y1=30))])


def test_over_grpc_a_caller_whose_deadline_passes_mid_encode_leaves_the_other_its_answer(audit_lines):
    async def main():
        backend = FakeSamBackend()
        settings = Settings(port=0, model_repository=REPOSITORY, default_model="medsam_lite", cache_bytes=1 << 28)
        gateway = Gateway(settings, DeadlineBoundBackend(backend), Metrics("fake"))
        await gateway.start()
        server, port, checker, _ = await create_server(settings, gateway, Authenticator())
        await checker.set_serving(True)
        backend.encoder_gate, backend.encoder_started = asyncio.Event(), asyncio.Event()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.SegmentationStub(channel)
                first = asyncio.ensure_future(stub.Segment(_request(), timeout=1.0))
                await asyncio.wait_for(backend.encoder_started.wait(), 10)
                second = asyncio.ensure_future(stub.Segment(_request(), timeout=30))
                hits = gateway.metrics.registry.get_sample_value
                await _until(lambda: hits("medseg_embedding_cache_hits_total", {"model": "medsam_lite"}) == 1,
                             "the second call joins the encode under way")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await first
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                backend.encoder_gate.set()
                answer = await asyncio.wait_for(second, 20)
                return answer, backend.calls[backend.encoder.name]
        finally:
            await server.stop(0)

    answer, encoder_runs = asyncio.run(main())
    assert len(answer.masks) == 1 and (answer.height, answer.width) == (H, W) and answer.masks[0].area > 0
    assert encoder_runs == 2  # warm-up + the one shared encode
    segment = [line["status"] for line in audit_lines if line["method"] == "Segment"]
    assert sorted(segment) == ["DEADLINE_EXCEEDED", "OK"]
