"""The intake gate (service/edge/intake.py), in process over real gRPC with a fake gateway:
stalled streams (headers sent, request message never) are bounded per connection, cut at
the receive bound, refused before they hold anything when they carry no token, and never
keep health from answering; the caller's cache scope reaches the gateway."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import segmentation_pb2_grpc as pb_grpc
from service.edge.server import ANSWER_SETTLE_S, concurrent_rpc_limit, create_server, stop_gracefully
from service.security.auth import Authenticator
from service.settings import Settings
from tests.unit.test_server_guard import AUTH, REQUEST, FakeGateway, tokens_file  # noqa: F401

SEGMENT = "/medseg.v1.Segmentation/Segment"
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # a channel whose connection no other channel shares
REFUSED = {"RESOURCE_EXHAUSTED", "UNAVAILABLE"}


async def _outcome(call) -> tuple[str, float]:
    start = time.monotonic()
    try:
        await call
        return "OK", time.monotonic() - start
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, time.monotonic() - start


class Stalled:
    """``count`` calls on ``method`` over ``channel`` that send their headers and nothing else."""

    def __init__(self, channel: grpc.aio.Channel, count: int, metadata=None, method: str = SEGMENT) -> None:
        self.release = asyncio.Event()
        call = channel.stream_unary(method)
        self.tasks = [asyncio.ensure_future(_outcome(call(self._never(), metadata=metadata, timeout=30)))
                      for _ in range(count)]

    async def _never(self):
        await self.release.wait()
        return
        yield  # an async generator that sends nothing

    def done(self) -> list[tuple[str, float]]:
        return [t.result() for t in self.tasks if t.done()]

    async def wait(self, timeout: float) -> list[tuple[str, float]]:
        await asyncio.wait(self.tasks, timeout=timeout)
        return self.done()

    async def close(self) -> None:
        self.release.set()
        await asyncio.wait(self.tasks, timeout=5)


async def _serve(settings: Settings, gateway: FakeGateway):
    server, port, checker, _ = await create_server(settings, gateway, Authenticator.from_settings(settings))
    await checker.set_serving(True)
    return server, f"127.0.0.1:{port}"


def _run(settings: Settings, body, gateway: FakeGateway | None = None):
    """``await body(target, channel)`` against a served fake gateway."""
    async def main():
        server, target = await _serve(settings, gateway or FakeGateway(settings))
        channel = grpc.aio.insecure_channel(target)
        try:
            return await body(target, channel)
        finally:
            await channel.close()
            await server.stop(0)

    return asyncio.run(main())


async def _health(channel) -> str:
    return (await _outcome(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)))[0]


async def _list_models(channel, metadata=None) -> str:
    stub = pb_grpc.SegmentationStub(channel)
    return (await _outcome(stub.ListModels(pb.ListModelsRequest(), timeout=3, metadata=metadata)))[0]


def test_health_answers_while_stalled_streams_fill_the_whole_pool_and_they_are_cut_at_the_bound():
    settings = Settings(port=0, max_inflight=1, max_queue=0, request_receive_timeout_s=1.5)
    pool = concurrent_rpc_limit(settings)  # 17: 16 on one connection (its share), 1 on another

    async def body(target, channel):
        first = grpc.aio.insecure_channel(target, options=OWN_CONNECTION)
        second = grpc.aio.insecure_channel(target, options=OWN_CONNECTION)
        a, b = Stalled(first, 16), Stalled(second, 1)
        await asyncio.sleep(0.5)
        during = (await _health(channel), await _list_models(channel), a.done(), b.done())
        cut = await a.wait(5) + await b.wait(5)
        after = await _list_models(channel)
        for c in (a, b):
            await c.close()
        await first.close()
        await second.close()
        return during, cut, after

    (health, listed, early_a, early_b), cut, after = _run(settings, body)
    assert pool == 17 and early_a == [] and early_b == []  # all 17 held their slot
    assert health == "OK"  # probes are outside the pool
    assert listed == "RESOURCE_EXHAUSTED"  # the pool is what bounds request memory
    assert [code for code, _ in cut] == ["DEADLINE_EXCEEDED"] * 17
    assert all(1.3 <= seconds <= 4.0 for _, seconds in cut), cut
    assert after == "OK"


def test_one_connection_holds_only_its_share_and_others_are_served(audit_lines):  # noqa: F811
    settings = Settings(port=0, max_rpcs_per_connection=4, request_receive_timeout_s=2.0)

    async def body(target, channel):
        hog = grpc.aio.insecure_channel(target, options=OWN_CONNECTION)
        stalled = Stalled(hog, 20)
        refused = await asyncio.wait_for(_until(lambda: len(stalled.done()) >= 16), 3)
        served = (await _health(channel), await _list_models(channel),
                  (await _outcome(pb_grpc.SegmentationStub(channel).Segment(REQUEST, timeout=3)))[0],
                  await _health(hog))  # a probe on the full connection still finds a stream
        held_early = len(stalled.done())
        cut = await stalled.wait(6)
        await stalled.close()
        await hog.close()
        return refused, served, held_early, cut

    refused, served, held_early, cut = _run(settings, body)
    assert served == ("OK", "OK", "OK", "OK")
    codes = [code for code, _ in cut]
    assert codes.count("DEADLINE_EXCEEDED") == 4 and len(codes) == 20
    # the rest at once: by the gate, or (a stream reopened before the server freed the last
    # one) refused by the HTTP/2 transport, which the client reports as UNAVAILABLE
    assert set(codes) - {"DEADLINE_EXCEEDED"} <= REFUSED
    assert held_early == 16  # the 4 held ones were still open while the others were served
    assert max(s for code, s in cut if code != "DEADLINE_EXCEEDED") < 1.0
    statuses = [line["status"] for line in audit_lines if line["method"] == "Segment"]
    assert statuses.count("RESOURCE_EXHAUSTED") == codes.count("RESOURCE_EXHAUSTED") >= 8
    assert statuses.count("DEADLINE_EXCEEDED") == 4


async def _until(predicate, interval: float = 0.02):
    while not predicate():
        await asyncio.sleep(interval)
    return True


def test_streams_without_a_valid_token_are_refused_from_their_headers(tokens_file, audit_lines):  # noqa: F811
    settings = Settings(port=0, auth_tokens_file=str(tokens_file), request_receive_timeout_s=5.0)

    async def body(target, channel):
        hog = grpc.aio.insecure_channel(target, options=OWN_CONNECTION)
        none, wrong = Stalled(hog, 20), Stalled(hog, 20, metadata=(("authorization", "Bearer nope"),))
        answered = await none.wait(3) + await wrong.wait(3)
        served = (await _health(channel), await _list_models(channel, AUTH))
        await none.close()
        await wrong.close()
        await hog.close()
        return answered, served

    answered, served = _run(settings, body)
    codes = [code for code, _ in answered]
    assert len(codes) == 40 and set(codes) <= {"UNAUTHENTICATED", "UNAVAILABLE"} and codes.count("UNAUTHENTICATED") >= 24
    assert max(seconds for _, seconds in answered) < 2.0  # at once, not at the 5 s receive bound
    assert served == ("OK", "OK")
    refused = [line for line in audit_lines if line["status"] == "UNAUTHENTICATED"]
    assert len(refused) == codes.count("UNAUTHENTICATED")
    assert all(line["method"] == "Segment" and line["request_id"] for line in refused)


def test_the_callers_cache_scope_reaches_the_gateway(tokens_file):  # noqa: F811
    scopes = {}
    for mode in ("caller", "shared"):
        settings = Settings(port=0, auth_tokens_file=str(tokens_file), cache_scope=mode)
        gateway = FakeGateway(settings)

        async def body(target, channel):
            stub = pb_grpc.SegmentationStub(channel)
            await stub.Segment(REQUEST, timeout=5, metadata=AUTH)
            await stub.EmbedImage(pb.EmbedImageRequest(image=REQUEST.image), timeout=5, metadata=AUTH)

        _run(settings, body, gateway)
        scopes[mode] = gateway.scopes_seen
    anonymous = FakeGateway(Settings(port=0))
    assert scopes == {"caller": ["caller:pacs-router"] * 2, "shared": ["", ""]}
    assert anonymous.cache_scope(None) == ""


def test_a_stopping_gateway_refuses_new_calls_finishes_open_ones_and_waits_for_their_answers():
    """stop_gracefully: the open call is answered OK, a call that starts while it drains gets
    UNAVAILABLE at once, and the server stops only after the open call has ended and settled."""
    settings = Settings(port=0)

    async def main():
        server, port, checker, intake = await create_server(settings, FakeGateway(settings, delay_s=1.0),
                                                            Authenticator.from_settings(settings))
        await checker.set_serving(True)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.SegmentationStub(channel)
        try:
            open_call = asyncio.ensure_future(_outcome(stub.Segment(REQUEST, timeout=10)))
            while intake.open == 0:
                await asyncio.sleep(0.01)
            stopping = asyncio.ensure_future(stop_gracefully(server, checker, intake, grace_s=10))
            await asyncio.sleep(0.1)
            late = await _outcome(stub.Segment(REQUEST, timeout=5))
            answered = await open_call
            ended_at = intake.last_ended
            await stopping
            return late, answered, time.monotonic() - ended_at, stopping.done()
        finally:
            await channel.close()
            await server.stop(0)

    late, answered, since_end, stopped = asyncio.run(main())
    assert late[0] == "UNAVAILABLE" and late[1] < 1.0, late  # refused at once, retryable
    assert answered[0] == "OK", answered
    assert stopped and since_end >= 0.9 * ANSWER_SETTLE_S  # the connections stayed open after the last answer
