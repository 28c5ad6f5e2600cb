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


def test_well_formed_payloads_are_served_by_the_live_gateway(raw_segment):
    """The fuzz property above also holds for a gateway that refuses everything: requests a
    careful client would send must come back OK (with one mask per prompt)."""
    refused: list[str] = []
    served = []

    @settings(max_examples=max(8, EXAMPLES // 3), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(payload=pooled_well_formed())
    def run(payload):
        try:
            reply = pb.SegmentResponse.FromString(raw_segment(payload, timeout=60))
        except grpc.RpcError as exc:
            refused.append(f"{exc.code().name}: {exc.details()}")
            return
        assert len(reply.masks) == len(pb.SegmentRequest.FromString(payload).prompts)
        served.append(reply)

    run()
    assert served and not refused, refused[:5]


def test_the_gateway_survived_the_fuzzing_and_logged_no_traceback(gateway):
    assert gateway.proc.poll() is None
    assert gateway.health() == health_pb2.HealthCheckResponse.SERVING
    assert "Traceback" not in gateway.log()
    assert '"status": "INTERNAL"' not in gateway.log() and '"status": "UNKNOWN"' not in gateway.log()
    print(f"wire fuzz: {len(SEEN)} calls, {sorted((c.name, SEEN.count(c)) for c in set(SEEN))}")


def test_codec_cases_over_the_wire_get_the_in_process_outcome(raw_segment):
    """Compressed DICOM, TIFF and deflate cases (bench/fuzz_cases.py) sent to the live gateway
    with a box far outside any image: a file that decodes is refused by the prompt check
    (INVALID_ARGUMENT, "outside"), before the encoder runs; one that does not gets the client
    error its decoding gives in process. Some must decode."""
    from bench.fuzz_cases import KINDS, make_case
    from service.core.domain import ImageInput, ImageLimits
    from service.core.errors import ServiceError
    from tests.integration.conftest import MAX_REQUEST_BYTES
    from service.core.imageio import decode_image
    from service.edge.status import status_for

    decoded, seen = 0, []
    for seed in range(max(len(KINDS) * 2, EXAMPLES)):
        case = make_case(seed, KINDS[seed % len(KINDS)])
        try:
            decode_image(ImageInput(encoded=case.data), ImageLimits(max_encoded_bytes=MAX_REQUEST_BYTES))
            local = "decoded"
        except ServiceError as exc:
            local = status_for(exc).name
        far = pb.Box(x0=1e6, y0=1e6, x1=1e6 + 5, y1=1e6 + 5)
        payload = pb.SegmentRequest(image=pb.Image(encoded=case.data), prompts=[pb.Prompt(box=far)])
        try:
            raw_segment(payload.SerializeToString(), timeout=60)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        SEEN.append(code)
        seen.append((case.kind, case.mutation, local, code.name))
        assert code in ALLOWED, (case.kind, case.mutation, code, details)
        if local == "decoded":
            decoded += 1
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside" in details, (case.kind, details)
        else:
            assert code.name == local, (case.kind, case.mutation, local, code, details)
    assert decoded, seen
