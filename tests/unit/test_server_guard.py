"""The rpc decorator's guard, in process over real gRPC with a fake gateway: status codes for
authentication, authorisation, overload, deadlines and undecodable requests; probes; audit."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import segmentation_pb2_grpc as pb_grpc
from service.observability import audit
from service.edge import deadline
from service.core import errors
from service.security.auth import Authenticator
from service.core.domain import EmbedResult, MaskResult, ModelInfo, PromptKind, SegmentResult
from service.inference.gateway import Gateway
from service.observability.metrics import Metrics
from service.edge.server import create_server
from service.settings import Settings
from tests.pki import tokens_line

TOKEN = "guard-test-token-1"
BOX = frozenset({PromptKind.BOX})
MODELS = {name: ModelInfo(name, "1", 256, BOX, BOX, is_default=name == "medsam_lite")
          for name in ("medsam_lite", "other")}
IMAGE = pb.Image(raw=pb.RawArray(dtype=pb.DTYPE_UINT8, shape=[8, 10], data=bytes(80)))
REQUEST = pb.SegmentRequest(image=IMAGE, prompts=[pb.Prompt(box=pb.Box(x0=1, y0=1, x1=5, y1=5))])
OTHER_MODEL = pb.SegmentRequest(model="other", image=IMAGE, prompts=REQUEST.prompts)


class FakeGateway:
    """What the servicer needs of :class:`service.inference.gateway.Gateway`, with a controllable delay."""

    def __init__(self, settings: Settings, delay_s: float = 0.0, fail: Exception | None = None) -> None:
        self.settings, self.delay_s, self.fail = settings, delay_s, fail
        self.metrics = Metrics("fake")
        self.pipelines = dict(MODELS)
        self.backend_timeouts: list[float | None] = []
        self.models_seen: list[str] = []  # the model of each call that reached the gateway
        self.scopes_seen: list[str] = []  # and its cache scope

    async def segment(self, request, scope: str = "") -> SegmentResult:
        self.models_seen.append(request.model)
        self.scopes_seen.append(scope)
        if request.model not in MODELS:
            raise errors.ModelNotFound(f"model {request.model!r} is not served here")
        self.backend_timeouts.append(deadline.backend_timeout(30.0))
        await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return SegmentResult(MODELS[request.model], "id", 8, 10, (MaskResult(np.zeros((8, 10), bool), 0.5),))

    async def embed(self, model: str, image, scope: str = "") -> EmbedResult:
        self.models_seen.append(model)
        self.scopes_seen.append(scope)
        return EmbedResult(MODELS[model], "id", 8, 10, False)

    def list_models(self) -> list[ModelInfo]:
        return list(MODELS.values())

    model_name = Gateway.model_name  # the real resolution of the default model (it reads default_model)
    serves = Gateway.serves
    cache_scope = Gateway.cache_scope  # the real caller -> cache scope rule (it reads settings)

    @property
    def default_model(self) -> str:
        """What Gateway.default_model is here: --default-model, or for auto the model marked default."""
        if self.settings.default_model != "auto":
            return self.settings.default_model
        return next(m.name for m in MODELS.values() if m.is_default)


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(tokens_line(TOKEN, "pacs-router", "medsam_lite") + "\n")
    return path


async def _serve(settings: Settings, gateway: FakeGateway):
    server, port, checker, _ = await create_server(settings, gateway, Authenticator.from_settings(settings))
    await checker.set_serving(True)
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def _run(settings: Settings, gateway: FakeGateway, body):
    async def main():
        server, channel = await _serve(settings, gateway)
        try:
            return await body(channel)
        finally:
            await channel.close()
            await server.stop(0)

    return asyncio.run(main())


async def _code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


AUTH = (("authorization", f"Bearer {TOKEN}"),)


def test_credentials_and_allow_list_give_their_status_codes(tokens_file, audit_lines):
    settings = Settings(port=0, auth_tokens_file=str(tokens_file))

    async def body(channel):
        stub = pb_grpc.SegmentationStub(channel)
        codes = {
            "none": await _code(stub.Segment(REQUEST, timeout=5)),
            "wrong": await _code(stub.Segment(REQUEST, timeout=5, metadata=(("authorization", "Bearer nope"),))),
            "allowed": await _code(stub.Segment(REQUEST, timeout=5, metadata=AUTH)),
            "forbidden": await _code(stub.Segment(OTHER_MODEL, timeout=5, metadata=AUTH)),
            "embed_forbidden": await _code(stub.EmbedImage(pb.EmbedImageRequest(model="x", image=IMAGE), timeout=5,
                                                           metadata=AUTH)),
            "list_without_token": await _code(stub.ListModels(pb.ListModelsRequest(), timeout=5)),
        }
        listed = await stub.ListModels(pb.ListModelsRequest(), timeout=5, metadata=AUTH)
        return codes, [m.name for m in listed.models]

    codes, listed = _run(settings, FakeGateway(settings), body)
    assert codes == {"none": grpc.StatusCode.UNAUTHENTICATED, "wrong": grpc.StatusCode.UNAUTHENTICATED,
                     "allowed": grpc.StatusCode.OK, "forbidden": grpc.StatusCode.PERMISSION_DENIED,
                     "embed_forbidden": grpc.StatusCode.PERMISSION_DENIED,
                     "list_without_token": grpc.StatusCode.UNAUTHENTICATED}
    assert listed == ["medsam_lite"]  # only what this caller may use
    ok = next(line for line in audit_lines if line["status"] == "OK" and line["method"] == "Segment")
    assert (ok["caller"], ok["auth"], ok["model"], ok["prompts"], ok["image_height"], ok["image_width"]) == \
        ("pacs-router", "token", "medsam_lite", 1, 8, 10)
    assert ok["latency_ms"] >= 0 and ok["request_id"] and ok["backend"] == "fake" and ok["time"].endswith("Z")
    assert all(TOKEN not in json.dumps(line) for line in audit_lines)


def test_a_call_naming_no_model_means_the_default_for_authorisation_audit_and_request(tokens_file, audit_lines):
    """The token allows only medsam_lite: with --default-model other, the same model-less calls
    are refused, audited as "other" and never reach the gateway; with the usual default they
    reach it as medsam_lite."""
    results = {}
    for default in ("medsam_lite", "other"):
        settings = Settings(port=0, auth_tokens_file=str(tokens_file), default_model=default)
        gateway = FakeGateway(settings)

        async def body(channel):
            stub = pb_grpc.SegmentationStub(channel)
            return (await _code(stub.Segment(REQUEST, timeout=5, metadata=AUTH)),
                    await _code(stub.EmbedImage(pb.EmbedImageRequest(image=IMAGE), timeout=5, metadata=AUTH)))

        codes = _run(settings, gateway, body)
        results[default] = (codes, gateway.models_seen, [line["model"] for line in audit_lines[-2:]])
    ok, denied = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
    assert results["medsam_lite"] == ((ok, ok), ["medsam_lite"] * 2, ["medsam_lite"] * 2)
    assert results["other"] == ((denied, denied), [], ["other"] * 2)


@pytest.mark.parametrize("exempt", [True, False])
def test_health_and_reflection_need_a_token_only_when_not_exempt(tokens_file, exempt):
    settings = Settings(port=0, auth_tokens_file=str(tokens_file), auth_exempt_health=exempt,
                        auth_exempt_reflection=exempt)

    async def reflect(channel, metadata):
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                         metadata=metadata, timeout=5)
        try:
            async for reply in call:
                return {s.name for s in reply.list_services_response.service}
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    async def body(channel):
        health = health_pb2_grpc.HealthStub(channel)
        return (await _code(health.Check(health_pb2.HealthCheckRequest(), timeout=5)),
                await _code(health.Check(health_pb2.HealthCheckRequest(), timeout=5, metadata=AUTH)),
                await reflect(channel, None), await reflect(channel, AUTH))

    settings_gateway = FakeGateway(settings)
    anonymous_health, token_health, anonymous_reflection, token_reflection = _run(settings, settings_gateway, body)
    assert token_health == grpc.StatusCode.OK and "medseg.v1.Segmentation" in token_reflection
    if exempt:
        assert anonymous_health == grpc.StatusCode.OK and "medseg.v1.Segmentation" in anonymous_reflection
    else:
        assert anonymous_health == anonymous_reflection == grpc.StatusCode.UNAUTHENTICATED


def test_overload_is_a_fast_resource_exhausted_and_accepted_calls_complete(audit_lines):
    settings = Settings(port=0, max_inflight=1, max_queue=1)
    gateway = FakeGateway(settings, delay_s=0.5)

    async def body(channel):
        stub = pb_grpc.SegmentationStub(channel)

        async def timed():
            start = time.perf_counter()
            code = await _code(stub.Segment(REQUEST, timeout=10))
            return code, time.perf_counter() - start

        return await asyncio.gather(*(timed() for _ in range(6)))

    results = _run(settings, gateway, body)
    codes = sorted(code.name for code, _ in results)
    assert codes == ["OK", "OK"] + ["RESOURCE_EXHAUSTED"] * 4
    assert max(t for code, t in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED) < 0.4
    assert sum(line["status"] == "RESOURCE_EXHAUSTED" for line in audit_lines) == 4


def test_client_deadline_reaches_the_backend_and_ends_as_deadline_exceeded(audit_lines):
    settings = Settings(port=0)
    gateway = FakeGateway(settings, delay_s=1.0)

    async def body(channel):
        stub = pb_grpc.SegmentationStub(channel)
        start = time.perf_counter()
        code = await _code(stub.Segment(REQUEST, timeout=0.4))
        return code, time.perf_counter() - start

    code, elapsed = _run(settings, gateway, body)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and elapsed < 0.9
    assert gateway.backend_timeouts and gateway.backend_timeouts[0] <= 0.4  # not the configured 30 s
    assert audit_lines[-1]["status"] == "DEADLINE_EXCEEDED"


def test_undecodable_request_bytes_are_invalid_argument_not_unknown():
    settings = Settings(port=0)

    async def body(channel):
        raw = channel.unary_unary("/medseg.v1.Segmentation/Segment")
        return await _code(raw(b"\xff\xff\xff\xff\x0f not protobuf", timeout=5))

    assert _run(settings, FakeGateway(settings), body) == grpc.StatusCode.INVALID_ARGUMENT


def test_audit_line_holds_no_request_text_and_no_error_message(audit_lines):
    settings = Settings(port=0)
    secret = "Doe^Jane 1960-01-01 MRN-123456"
    gateway = FakeGateway(settings, fail=RuntimeError(secret))

    async def body(channel):
        stub = pb_grpc.SegmentationStub(channel)
        unknown = await _code(stub.Segment(pb.SegmentRequest(model=secret, image=IMAGE, prompts=REQUEST.prompts),
                                           timeout=5))
        internal = await _code(stub.Segment(REQUEST, timeout=5))
        return unknown, internal

    unknown, internal = _run(settings, gateway, body)
    assert (unknown, internal) == (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL)
    text = "\n".join(json.dumps(line) for line in audit_lines)
    assert secret not in text and "MRN" not in text
    assert [line["model"] for line in audit_lines[-2:]] == [audit.UNKNOWN_MODEL, "medsam_lite"]
    assert audit_lines[-1]["status"] == "INTERNAL"


def test_audit_configure_writes_one_json_line_per_record_to_a_file(tmp_path):
    path = tmp_path / "audit.log"
    logger = audit.configure(str(path))
    try:
        audit.write(audit.AuditRecord("r1", "Segment", "embedded", caller="c", status="OK", latency_ms=1.26))
        logging.getLogger("service").warning("not an audit line")
    finally:
        audit.configure("-")
    (line,) = path.read_text().splitlines()
    record = json.loads(line)
    assert record["request_id"] == "r1" and record["latency_ms"] == 1.3 and not logger.propagate
