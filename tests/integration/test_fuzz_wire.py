"""Fuzzing over the wire: arbitrary bytes, corrupted and structured requests sent to a real
gateway as raw gRPC payloads. Every call ends with OK or a client-error status (never
INTERNAL, UNKNOWN or UNAVAILABLE), within its deadline, and the gateway keeps serving.

Images of well-formed requests come from a small pool so that most of them hit the
embedding cache (the encoder costs about a second on these CPUs); ``MEDSEG_FUZZ_WIRE_EXAMPLES``
scales the run (CI default 25).
"""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg_client._generated import segmentation_pb2 as pb
from tests.unit.test_fuzz import VALID, chaotic_requests, well_formed_requests

EXAMPLES = int(os.environ.get("MEDSEG_FUZZ_WIRE_EXAMPLES", "25"))
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
POOL = [np.random.default_rng(seed).integers(0, 255, (64, 64), dtype=np.uint8) for seed in range(3)]
SEEN: list[grpc.StatusCode] = []


@st.composite
def pooled_well_formed(draw) -> bytes:
    message = draw(well_formed_requests())
    pixels = POOL[draw(st.integers(0, len(POOL) - 1))]
    message.image.CopyFrom(pb.Image(raw=pb.RawArray(dtype=pb.DTYPE_UINT8, shape=[64, 64], data=pixels.tobytes())))
    return message.SerializeToString()


@st.composite
def corrupted_valid(draw) -> bytes:
    data = bytearray(VALID)
    for where, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=6)):
        data[where] = value
    return bytes(data[: draw(st.integers(1, len(data)))])


wire_payloads = st.one_of(st.binary(max_size=300), corrupted_valid(), pooled_well_formed(),
                          chaotic_requests().map(lambda m: m.SerializeToString()))


@pytest.fixture(scope="module")
def raw_segment(gateway):
    channel = grpc.insecure_channel(gateway.target)
    yield channel.unary_unary("/medseg.v1.Segmentation/Segment")
    channel.close()


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(payload=wire_payloads)
def test_any_payload_gets_ok_or_a_client_error_from_the_live_gateway(raw_segment, payload):
    try:
        raw_segment(payload, timeout=60)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
    SEEN.append(code)
    assert code in ALLOWED, code


def test_the_gateway_survived_the_fuzzing_and_logged_no_traceback(gateway):
    assert gateway.proc.poll() is None
    assert gateway.health() == health_pb2.HealthCheckResponse.SERVING
    assert "Traceback" not in gateway.log()
    assert '"status": "INTERNAL"' not in gateway.log() and '"status": "UNKNOWN"' not in gateway.log()
    print(f"wire fuzz: {len(SEEN)} calls, {sorted((c.name, SEEN.count(c)) for c in set(SEEN))}")
