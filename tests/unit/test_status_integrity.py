"""Status and audit integrity (issue 14, finding 7) and per-caller quotas (finding 11), over
real gRPC in process: the real gateway, pipeline and servicer on the real LiteMedSAM entries
with a fake backend (counted calls), or a fake gateway where the test needs an answer the
pipeline would not produce.

* echoed request text (model names, image ids) is cut short, so a long one is still the
  status the client gets (not a transport RESOURCE_EXHAUSTED) and the audit line agrees;
* an answer over the send limit is refused before any model work, naming the limit; one that
  only turns out too large when serialised is refused by the gateway itself, and the audit
  line says RESOURCE_EXHAUSTED, not OK;
* per-caller concurrency and rate limits answer RESOURCE_EXHAUSTED with ``retry-after-ms``,
  in the audit line (``reason``) and ``medseg_admission_rejected_total{reason}``, without
  touching other callers; without authentication every call is the one ``anonymous`` caller.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import segmentation_pb2_grpc as pb_grpc
from service.core.domain import EmbedResult, MaskResult, ModelInfo, PromptKind, SegmentResult
from service.edge.deadline import DeadlineBoundBackend
from service.edge.server import create_server
from service.inference.gateway import Gateway
from service.observability.metrics import Metrics
from service.security.auth import Authenticator
from service.settings import Settings
from tests.pki import tokens_line
from tests.unit.fake_sam import REPOSITORY, FakeSamBackend

LONG = "x" * 20_000  # far over the client's 8 KiB metadata bound if echoed whole
BOX = pb.Prompt(box=pb.Box(x0=4, y0=4, x1=60, y1=40))
SMALL = pb.Image(raw=pb.RawArray(dtype=pb.DTYPE_UINT8, shape=[48, 64], data=bytes(48 * 64)))
TOKENS = {"pacs": "status-test-token-pacs", "research": "status-test-token-research"}


def _png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), 90).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("".join(tokens_line(token, caller, "medsam_lite") + "\n" for caller, token in TOKENS.items()))
    return path


def _auth(caller: str):
    return (("authorization", f"Bearer {TOKENS[caller]}"),)


async def _outcome(call):
    """(code, details, trailing metadata as a dict) of a finished call."""
    try:
        await call
        code, details = grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
    trailing = {key: value for key, value in (await call.trailing_metadata() or ())}
    return code, details, trailing


def _serve(settings: Settings, body, gateway=None, backend: FakeSamBackend | None = None):
    async def main():
        nonlocal gateway
        if gateway is None:
            gateway = Gateway(settings, DeadlineBoundBackend(backend or FakeSamBackend()), Metrics("fake"))
            await gateway.start()
        server, port, checker, _ = await create_server(settings, gateway, Authenticator.from_settings(settings))
        await checker.set_serving(True)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                                 options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
                return await body(pb_grpc.SegmentationStub(channel), gateway)
        finally:
            await server.stop(0)

    return asyncio.run(main())


def _settings(**kw) -> Settings:
    return Settings(port=0, model_repository=REPOSITORY, default_model="medsam_lite", **kw)


def _rejected(gateway, reason: str) -> float:
    return gateway.metrics.registry.get_sample_value("medseg_admission_rejected_total", {"reason": reason})


# --------------------------------------------------------------------------- echoed input
def test_long_model_names_and_image_ids_come_back_short_with_their_own_status(audit_lines):
    async def body(stub, gateway):
        return (await _outcome(stub.Segment(pb.SegmentRequest(model=LONG, image=SMALL, prompts=[BOX]), timeout=10)),
                await _outcome(stub.Segment(pb.SegmentRequest(image_id=LONG, prompts=[BOX]), timeout=10)),
                await _outcome(stub.EmbedImage(pb.EmbedImageRequest(model=LONG, image=SMALL), timeout=10)))

    results = _serve(_settings(), body)
    for code, details, _ in results:
        assert code == grpc.StatusCode.NOT_FOUND, details
        assert len(details) < 300 and "xxxx" in details and "\u2026" in details, details
    assert [line["status"] for line in audit_lines[-3:]] == ["NOT_FOUND"] * 3


def test_a_long_model_name_outside_the_allow_list_is_a_short_permission_denied(tokens_file, audit_lines):
    async def body(stub, gateway):
        return await _outcome(stub.Segment(pb.SegmentRequest(model=LONG, image=SMALL, prompts=[BOX]), timeout=10,
                                           metadata=_auth("pacs")))

    code, details, _ = _serve(_settings(auth_tokens_file=str(tokens_file)), body)
    assert code == grpc.StatusCode.PERMISSION_DENIED and len(details) < 300, details
    assert audit_lines[-1]["status"] == "PERMISSION_DENIED"


# --------------------------------------------------------------------------- oversize answers
LIMIT = 256 * 1024  # --max-request-bytes: receive and send limit


def test_an_answer_over_the_send_limit_is_refused_before_any_model_work(audit_lines):
    backend = FakeSamBackend()
    image = pb.Image(encoded=_png(2048))  # a few KB in; one bit-packed mask out is 512 KiB

    async def body(stub, gateway):
        before = dict(backend.calls)
        bits = await _outcome(stub.Segment(pb.SegmentRequest(image=image, prompts=[BOX]), timeout=30))
        work_after_refusal = dict(backend.calls) != before
        png = await stub.Segment(pb.SegmentRequest(image=image, prompts=[BOX], encoding=pb.MASK_ENCODING_PNG),
                                 timeout=30)
        return bits, work_after_refusal, png, _rejected(gateway, "answer_size")

    (code, details, trailing), worked, png, rejected = _serve(_settings(max_request_bytes=LIMIT), body,
                                                               backend=backend)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(LIMIT) in details and "--max-request-bytes" in details
    assert not worked  # no encoder, no decoder: refused from the image header
    assert "x-request-id" in trailing
    assert png.masks[0].height == 2048 and png.masks[0].area > 0  # the same work fits as PNG
    assert rejected == 1
    refused = next(line for line in audit_lines if line["status"] == "RESOURCE_EXHAUSTED")
    assert refused["reason"] == "answer_size" and refused["method"] == "Segment"


def test_a_follow_up_on_a_cached_image_is_refused_before_the_mask_decoder():
    backend = FakeSamBackend()

    async def body(stub, gateway):
        embedded = await stub.EmbedImage(pb.EmbedImageRequest(image=pb.Image(encoded=_png(2048))), timeout=30)
        decoder_runs = backend.calls[backend.decoder.name]
        outcome = await _outcome(stub.Segment(pb.SegmentRequest(image_id=embedded.image_id, prompts=[BOX] * 2),
                                              timeout=30))
        return outcome, backend.calls[backend.decoder.name] - decoder_runs

    (code, details, _), decoder_runs = _serve(_settings(max_request_bytes=LIMIT), body, backend=backend)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(LIMIT) in details, details
    assert decoder_runs == 0


MODEL = ModelInfo("medsam_lite", "1", 256, frozenset({PromptKind.BOX}), frozenset({PromptKind.BOX}), is_default=True)


class BigAnswerGateway:
    """Answers every Segment with a mask the request did not announce (2000 x 2000, not encoded
    yet): only serialising the answer shows it is over the send limit."""

    def __init__(self, settings: Settings) -> None:
        self.settings, self.metrics = settings, Metrics("fake")
        self.pipelines = {"medsam_lite": MODEL}

    async def segment(self, request, scope="") -> SegmentResult:
        noise = np.random.default_rng(0).random((2000, 2000)) > 0.5
        return SegmentResult(MODEL, "id", 2000, 2000, (MaskResult(noise, 0.5),))

    async def embed(self, model, image, scope="") -> EmbedResult:
        return EmbedResult(MODEL, "id", 8, 10, False)

    def list_models(self):
        return [MODEL]

    def cache_scope(self, caller):
        return ""

    model_name = Gateway.model_name
    serves = Gateway.serves
    default_model = "medsam_lite"


def test_an_answer_found_too_large_when_serialised_is_the_status_in_the_audit_line(audit_lines):
    settings = _settings(max_request_bytes=LIMIT)

    async def body(stub, gateway):
        return await _outcome(stub.Segment(pb.SegmentRequest(image=SMALL, prompts=[BOX]), timeout=30))

    code, details, _ = _serve(settings, body, gateway=BigAnswerGateway(settings))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(LIMIT) in details, details
    assert audit_lines[-1]["status"] == "RESOURCE_EXHAUSTED" and audit_lines[-1]["reason"] == "answer_size"


# --------------------------------------------------------------------------- per-caller quotas
class SlowGateway(BigAnswerGateway):
    def __init__(self, settings: Settings, delay_s: float) -> None:
        super().__init__(settings)
        self.delay_s = delay_s

    async def segment(self, request, scope="") -> SegmentResult:
        await asyncio.sleep(self.delay_s)
        return SegmentResult(MODEL, "id", 48, 64, (MaskResult(np.zeros((48, 64), bool), 0.5),))


def test_per_caller_concurrency_refuses_the_busy_caller_only_with_a_retry_hint(tokens_file, audit_lines):
    settings = _settings(auth_tokens_file=str(tokens_file), max_inflight=4, max_inflight_per_caller=1)
    request = pb.SegmentRequest(image=SMALL, prompts=[BOX])

    async def body(stub, gateway):
        first = asyncio.ensure_future(_outcome(stub.Segment(request, timeout=10, metadata=_auth("pacs"))))
        registry = gateway.metrics.registry
        for _ in range(500):  # wait until it holds its slot
            if registry.get_sample_value("medseg_admission_running") == 1:
                break
            await asyncio.sleep(0.01)
        second = await _outcome(stub.Segment(request, timeout=10, metadata=_auth("pacs")))
        other = await _outcome(stub.Segment(request, timeout=10, metadata=_auth("research")))
        return await first, second, other, _rejected(gateway, "caller_inflight")

    first, second, other, rejected = _serve(settings, body, gateway=SlowGateway(settings, 1.0))
    assert first[0] == other[0] == grpc.StatusCode.OK
    code, details, trailing = second
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "'pacs'" in details and "--max-inflight-per-caller" in details
    assert int(trailing["retry-after-ms"]) > 0
    assert rejected == 1
    refused = [line for line in audit_lines if line["status"] == "RESOURCE_EXHAUSTED"]
    assert [(line["caller"], line["reason"]) for line in refused] == [("pacs", "caller_inflight")]


def test_per_caller_rate_limit_with_burst_and_retry_hint(tokens_file, audit_lines):
    settings = _settings(auth_tokens_file=str(tokens_file), rate_per_caller=0.5, burst_per_caller=2)
    request = pb.SegmentRequest(image=SMALL, prompts=[BOX])

    async def body(stub, gateway):
        pacs = [await _outcome(stub.Segment(request, timeout=10, metadata=_auth("pacs"))) for _ in range(3)]
        other = await _outcome(stub.Segment(request, timeout=10, metadata=_auth("research")))
        return pacs, other, _rejected(gateway, "caller_rate")

    pacs, other, rejected = _serve(settings, body, gateway=SlowGateway(settings, 0.0))
    assert [code for code, _, _ in pacs] == [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert other[0] == grpc.StatusCode.OK
    _, details, trailing = pacs[2]
    assert "--rate-per-caller" in details and 0 < int(trailing["retry-after-ms"]) <= 2000
    assert rejected == 1 and audit_lines[-2]["reason"] == "caller_rate" and audit_lines[-2]["caller"] == "pacs"


@pytest.mark.parametrize("per_caller", [0, 1])
def test_without_authentication_every_call_is_the_one_anonymous_caller(per_caller, audit_lines):
    settings = _settings(max_inflight=4, max_inflight_per_caller=per_caller)
    request = pb.SegmentRequest(image=SMALL, prompts=[BOX])

    async def body(stub, gateway):
        return await asyncio.gather(*(_outcome(stub.Segment(request, timeout=10)) for _ in range(2)))

    codes = sorted(code.name for code, _, _ in _serve(settings, body, gateway=SlowGateway(settings, 0.5)))
    assert codes == (["OK", "OK"] if per_caller == 0 else ["OK", "RESOURCE_EXHAUSTED"])
    assert {line["caller"] for line in audit_lines} == {"anonymous"}
