"""Slow or stalled clients cannot starve anyone (issue 14, finding 5): a real gateway process;
one HTTP/2 connection opens a few dozen streams on the Segment method and never sends their
request message. Health (main port and health port), ListModels and a normal authenticated
Segment from another connection must still answer, and the stalled streams are cut at the
receive bound. The stalled calls are client-streaming calls on the unary Segment path (the same
frames on the wire as a unary call whose message never comes).

Before the intake gate, gRPC's ``maximum_concurrent_rpcs`` (36 here) was filled by such a
connection and everything else waited behind it, health included."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medseg_client import SegmentationClient, image_from_array
from tests.harness import GatewayProcess, wait_for
from tests.pki import tokens_line

TOKEN = "slow-client-test-token-3f9e"
RECEIVE_BOUND_S = 3.0
PER_CONNECTION = 8
STALLED = 40  # more than the whole pool (4 + 16 + 16 = 36) and than a connection's share
SERVING = health_pb2.HealthCheckResponse.SERVING
# A stream the client reopens before the server has freed the previous one is refused by gRPC's
# HTTP/2 transport (REFUSED_STREAM, counted with grpc.http.overload_protection): UNAVAILABLE.
TRANSPORT_REFUSED = {"UNAVAILABLE"}
IMAGE = image_from_array(np.random.default_rng(5).integers(0, 255, (64, 64), dtype=np.uint8))


@pytest.fixture(scope="module")
def guarded_gateway(model_repository, tmp_path_factory):
    folder = tmp_path_factory.mktemp("slow-gw")
    tokens = folder / "tokens"
    tokens.write_text(tokens_line(TOKEN, "pacs-router", "*") + "\n")
    gw = GatewayProcess(folder, "--backend", "embedded", "--auth-tokens-file", str(tokens), "--health-port", "0",
                        "--request-receive-timeout-s", str(RECEIVE_BOUND_S),
                        "--max-rpcs-per-connection", str(PER_CONNECTION))
    with gw.serving():
        gw.health_port = json.loads(gw.port_file.read_text())["health"]
        yield gw


class Stalled:
    """``count`` calls on ``method`` over one new connection whose request never comes."""

    def __init__(self, target: str, method: str, count: int, metadata=None) -> None:
        # a local subchannel pool: this channel's connection is its own, shared with no other channel
        self.channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.release = threading.Event()
        call = self.channel.stream_unary(method)
        self.started = time.monotonic()
        self.futures = [call.future(self._never(), metadata=metadata, timeout=60) for _ in range(count)]
        self.ended: dict[int, float] = {}
        for i, future in enumerate(self.futures):
            future.add_done_callback(lambda f, i=i: self.ended.setdefault(i, time.monotonic() - self.started))

    def _never(self):
        self.release.wait(60)
        return
        yield  # a generator that sends nothing

    def codes(self) -> list[str]:
        return sorted(f.code().name for f in self.futures if f.done())

    def close(self) -> None:
        self.release.set()
        for future in self.futures:
            future.cancel()
        self.channel.close()


def _health(target: str) -> int:
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _everyone_else_is_served(gw) -> None:
    assert _health(gw.target) == SERVING
    assert _health(f"127.0.0.1:{gw.health_port}") == SERVING
    with SegmentationClient(gw.target, token=TOKEN, timeout=30) as client:
        assert [m.name for m in client.list_models()]
        assert client.segment(image=IMAGE, boxes=[(8, 8, 40, 40)]).masks[0].shape == (64, 64)


def test_streams_without_a_token_are_refused_before_they_hold_anything(guarded_gateway):
    stalled = Stalled(guarded_gateway.target, "/medseg.v1.Segmentation/Segment", STALLED)
    try:
        wait_for(lambda: len(stalled.codes()) == STALLED, 10, "every tokenless stream to be answered")
        codes = stalled.codes()
        assert set(codes) <= {"UNAUTHENTICATED", *TRANSPORT_REFUSED} and "UNAUTHENTICATED" in codes, codes
        assert max(stalled.ended.values()) < RECEIVE_BOUND_S  # at once, not at the receive bound
        _everyone_else_is_served(guarded_gateway)
    finally:
        stalled.close()


def test_a_stalled_connection_takes_only_its_share_and_is_cut_at_the_receive_bound(guarded_gateway):
    """Even with a valid token (the worst case): PER_CONNECTION streams are held, the others are
    refused at once, everyone else is served meanwhile, and the held ones end at the bound."""
    stalled = Stalled(guarded_gateway.target, "/medseg.v1.Segmentation/Segment", STALLED,
                      metadata=(("authorization", f"Bearer {TOKEN}"),))
    try:
        wait_for(lambda: len(stalled.codes()) == STALLED - PER_CONNECTION, 10,
                 "the streams beyond the connection's share to be refused")
        assert set(stalled.codes()) <= {"RESOURCE_EXHAUSTED", *TRANSPORT_REFUSED}, stalled.codes()
        assert max(stalled.ended.values()) < RECEIVE_BOUND_S - 0.5
        _everyone_else_is_served(guarded_gateway)  # while the connection still holds its share
        assert len(stalled.codes()) == STALLED - PER_CONNECTION, "the held streams ended too early"
        wait_for(lambda: len(stalled.codes()) == STALLED, RECEIVE_BOUND_S + 10, "the held streams to be cut")
        held = sorted(stalled.ended[i] for i, f in enumerate(stalled.futures)
                      if f.code() == grpc.StatusCode.DEADLINE_EXCEEDED)
        assert len(held) == PER_CONNECTION, stalled.codes()
        assert RECEIVE_BOUND_S - 0.5 <= held[0] and held[-1] <= RECEIVE_BOUND_S + 5, held
    finally:
        stalled.close()
    log = guarded_gateway.log()
    assert '"status": "DEADLINE_EXCEEDED"' in log and '"caller": "pacs-router"' in log
    assert "Traceback" not in log
    _everyone_else_is_served(guarded_gateway)


def test_stalled_probes_on_the_health_port_do_not_block_other_probes(guarded_gateway):
    health_target = f"127.0.0.1:{guarded_gateway.health_port}"
    stalled = Stalled(health_target, "/grpc.health.v1.Health/Check", STALLED)
    try:
        time.sleep(0.5)
        assert _health(health_target) == SERVING and _health(guarded_gateway.target) == SERVING
        wait_for(lambda: len(stalled.codes()) == STALLED, 60, "the stalled probes to be cut")
        codes = stalled.codes()
        assert set(codes) <= {"DEADLINE_EXCEEDED", *TRANSPORT_REFUSED} and codes.count("DEADLINE_EXCEEDED") >= 8, codes
    finally:
        stalled.close()
    assert _health(health_target) == SERVING


# --- a raw HTTP/2 client that ignores the server's SETTINGS_MAX_CONCURRENT_STREAMS ----------------

REFUSED_STREAM = 0x7


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: str, value: str) -> bytes:  # HPACK: literal header field without indexing, new name
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


def _read_frames(sock: socket.socket, seconds: float) -> list[tuple[float, int, int, int, bytes]]:
    sock.settimeout(0.1)
    buffer, frames, end = b"", [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
        except socket.timeout:
            pass
        while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
            length = int.from_bytes(buffer[:3], "big")
            frames.append((time.monotonic(), buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF,
                           buffer[9:9 + length]))
            buffer = buffer[9 + length:]
    return frames


def _raw_stalled_streams(port: int, path: str, count: int, seconds: float):
    """Open ``count`` streams at once on one connection (HEADERS only, never a DATA frame),
    whatever the server advertised; returns (advertised limit, refused stream ids, seconds
    until each other stream was answered with its trailers)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0))
        advertised = None
        for _, kind, flags, _, payload in _read_frames(sock, 0.5):
            if kind == 4 and not flags & 1:
                for i in range(0, len(payload), 6):
                    ident, value = struct.unpack(">HI", payload[i:i + 6])
                    advertised = value if ident == 3 else advertised
        sock.sendall(_frame(4, 1, 0))  # acknowledge the server's settings... then ignore them
        time.sleep(0.2)
        block = b"".join(_literal(k, v) for k, v in (
            (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"), ("te", "trailers"), ("authorization", f"Bearer {TOKEN}")))
        start = time.monotonic()
        sock.sendall(b"".join(_frame(1, 0x4, 2 * i + 1, block) for i in range(count)))  # END_HEADERS only
        frames = _read_frames(sock, seconds)
    refused = sorted({stream for _, kind, _, stream, payload in frames
                      if kind == 3 and int.from_bytes(payload, "big") == REFUSED_STREAM})
    answered: dict[int, float] = {}
    for at, kind, flags, stream, _ in frames:
        if kind == 1 and flags & 0x1:  # HEADERS with END_STREAM: the call's status
            answered.setdefault(stream, at - start)
    return advertised, refused, answered


def test_a_client_ignoring_the_stream_limit_gets_its_extra_streams_refused_by_the_transport(guarded_gateway):
    """gRPC's HTTP/2 server itself refuses streams above --max-rpcs-per-connection + 8 on a
    connection (REFUSED_STREAM), also from a client that does not honour the setting; of the
    accepted ones the gate holds the connection's share and answers the rest at once."""
    done = {}

    def hog():
        done["result"] = _raw_stalled_streams(guarded_gateway.grpc_port, "/medseg.v1.Segmentation/Segment",
                                              STALLED, RECEIVE_BOUND_S + 3)

    thread = threading.Thread(target=hog)
    thread.start()
    try:
        time.sleep(1.0)
        _everyone_else_is_served(guarded_gateway)
    finally:
        thread.join(30)
    advertised, refused, answered = done["result"]
    streams = PER_CONNECTION + 8
    assert advertised == streams
    assert len(refused) == STALLED - streams, (refused, answered)
    times = sorted(answered.values())
    assert len(times) == streams  # every accepted stream got a status
    quick, held = times[:streams - PER_CONNECTION], times[streams - PER_CONNECTION:]
    assert max(quick) < 1.0 and min(held) >= RECEIVE_BOUND_S - 0.5, times
