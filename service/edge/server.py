"""gRPC server: servicer, the one error mapping, auth, admission, audit, health, reflection,
TLS, metrics, graceful stop.

Where the cross-cutting checks live, and why: authentication, per-model authorisation,
admission (overload control), the call's deadline and the audit line all sit in the
:func:`rpc` decorator around each Segmentation method, not in grpc.aio server interceptors.
An interceptor sees only the method name and metadata, before the request is read: it could
check a token, but not the model named inside the request (authorisation), not the prompt
count and image size (audit), and not the final status code the decorator decides (audit,
metrics). Splitting the work would put status decisions in two places; the decorator keeps
exactly one place where exceptions become status codes, in a fixed order:
undecodable request -> authenticate -> authorise model -> admit (bounded queue) -> run under
the client's deadline -> map errors -> metrics + one audit line. The single interceptor
(:class:`ProbeGate`) only guards grpc.health.v1 and reflection, which the decorator does not
wrap, when they are configured to need a token; it maps errors with the same
:func:`service.edge.status.status_for`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import signal
import time
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import segmentation_pb2_grpc as pb_grpc
from service.edge import convert as api
from service.observability import audit
from service.edge import deadline
from service.core import errors
from service.edge.admission import Admission
from service.security.auth import Authenticator, Principal
from service.backends import create_backend
from service.edge.deadline import DeadlineBoundBackend
from service.core.errors import StartupError
from service.inference.gateway import Gateway
from service.edge.health import SERVICE_NAME, Health, ProbeGate, create_health_server
from service.observability.metrics import Metrics
from service.settings import Settings
from service.edge.status import client_message, status_for
from service.security.tls import ReloadingCredentials, check_exposure, peer_common_name, tls_enabled

log = logging.getLogger(__name__)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# The gateway's own deadline for a call ends this much before the client's.
DEADLINE_MARGIN_S = 0.05


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex


class Undecodable:
    """Stands in for a request whose bytes are not a valid message of its type.

    gRPC would answer a deserializer exception with UNKNOWN; the decorator turns this into
    INVALID_ARGUMENT instead (a client error, not ours).
    """

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _tolerant_parser(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception:  # noqa: BLE001 - protobuf DecodeError and friends: a client error
            return Undecodable(message_class.DESCRIPTOR.full_name)

    return parse


def _served_model(request, gateway: Gateway) -> str:
    return getattr(request, "model", "") or gateway.settings.default_model


def _audit_request(record: audit.AuditRecord, request, gateway: Gateway) -> None:
    """Copy the audit fields that the request itself carries (no free text except a served model name)."""
    if not hasattr(request, "model"):
        return
    model = _served_model(request, gateway)
    record.model = model if model in gateway.pipelines else audit.UNKNOWN_MODEL
    if hasattr(request, "prompts"):
        record.prompts = len(request.prompts)
    image = getattr(request, "image", None)
    if image is not None and image.WhichOneof("source") == "raw" and len(image.raw.shape) >= 2:
        record.image_height, record.image_width = int(image.raw.shape[0]), int(image.raw.shape[1])


def rpc(method: str, *, admitted: bool = True):
    """The one place where exceptions become gRPC statuses, with auth, admission, deadline,
    metrics, an audit line and a request id.

    Domain errors keep their message; anything unexpected is INTERNAL with a generic
    message and the request id, and its traceback is logged under that id. ``admitted``
    calls (model work) take an admission slot; cheap ones (ListModels) do not. The wrapped
    method receives the authenticated :class:`Principal` as a third argument.
    """

    def decorate(fn):
        @functools.wraps(fn)
        async def wrapper(self: "SegmentationServicer", request, context: grpc.aio.ServicerContext):
            metrics = self.gateway.metrics
            request_id = _request_id(context)
            context.set_trailing_metadata((("x-request-id", request_id),))
            record = audit.AuditRecord(request_id, method, metrics.backend, peer=context.peer() or "")
            code = grpc.StatusCode.OK
            start = time.perf_counter()
            metrics.inflight.labels(metrics.backend).inc()
            try:
                if isinstance(request, Undecodable):
                    raise errors.InvalidArgument(f"the request is not a valid {request.type_name} message")
                principal = self.authenticator.authenticate(context.invocation_metadata())
                record.caller, record.auth = principal.caller, principal.scheme
                record.client_cert = peer_common_name(context)
                _audit_request(record, request, self.gateway)
                if hasattr(request, "model"):
                    self.authenticator.authorize(principal, _served_model(request, self.gateway))
                response = await self._run(fn, request, context, principal, admitted)
                if getattr(response, "height", 0):
                    record.image_height, record.image_width = int(response.height), int(response.width)
                return response
            except asyncio.CancelledError:
                # grpc cancels the handler when the client goes away or its deadline passes
                # (the client's clock runs a little ahead of ours: its deadline cancels us just before)
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 2 * DEADLINE_MARGIN_S
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 - mapped right here
                code = status_for(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.error("request %s %s failed: %s", request_id, method, type(exc).__name__,
                              exc_info=exc)
                else:
                    log.info("request %s %s -> %s", request_id, method, code.name)
                await context.abort(code, client_message(exc, request_id))
            finally:
                elapsed = time.perf_counter() - start
                metrics.inflight.labels(metrics.backend).dec()
                metrics.requests.labels(method, code.name, metrics.backend).inc()
                metrics.request_latency.labels(method, metrics.backend).observe(elapsed)
                record.status, record.latency_ms = code.name, elapsed * 1000.0
                audit.write(record)

        return wrapper

    return decorate


class SegmentationServicer(pb_grpc.SegmentationServicer):
    def __init__(self, gateway: Gateway, authenticator: Authenticator | None = None,
                 admission: Admission | None = None) -> None:
        self.gateway = gateway
        self.authenticator = authenticator or Authenticator()
        settings = gateway.settings
        self.admission = admission or Admission(settings.max_inflight, settings.max_queue)

    async def _run(self, fn, request, context: grpc.aio.ServicerContext, principal: Principal, admitted: bool):
        """``fn`` under the client's deadline (also handed to the backend, see service.edge.deadline),
        inside an admission slot when ``admitted``. A call without a deadline waits for a slot
        at most --backend-timeout-s."""
        remaining = context.time_remaining()
        if remaining is not None:  # finish (with DEADLINE_EXCEEDED) just before the client gives up
            remaining = max(0.0, remaining - DEADLINE_MARGIN_S)
        with deadline.bounded(remaining):
            try:
                async with asyncio.timeout(remaining) as limit:
                    if not admitted:
                        return await fn(self, request, context, principal)
                    wait = remaining if remaining is not None else self.gateway.settings.backend_timeout_s
                    async with self.admission.slot(wait):
                        return await fn(self, request, context, principal)
            except TimeoutError as exc:
                if limit.expired():
                    raise errors.DeadlineExceeded("the call's deadline passed before it finished") from exc
                raise

    @rpc("Segment")
    async def Segment(self, request: pb.SegmentRequest, context, principal: Principal) -> pb.SegmentResponse:
        req = api.segment_request_from_proto(request, self.gateway.settings.default_model)
        result = await self.gateway.segment(req)
        return await asyncio.to_thread(api.segment_response_to_proto, result, req.encoding)

    @rpc("EmbedImage")
    async def EmbedImage(self, request: pb.EmbedImageRequest, context, principal: Principal) -> pb.EmbedImageResponse:
        if not request.HasField("image"):
            raise errors.InvalidImage("EmbedImage needs an image")
        image = api.image_from_proto(request.image)
        result = await self.gateway.embed(request.model or self.gateway.settings.default_model, image)
        return api.embed_response_to_proto(result)

    @rpc("ListModels", admitted=False)
    async def ListModels(self, request: pb.ListModelsRequest, context, principal: Principal) -> pb.ListModelsResponse:
        """Only the models this caller may use."""
        return pb.ListModelsResponse(models=[api.model_info_to_proto(m) for m in self.gateway.list_models()
                                             if principal.may_use(m.name)])

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register like the generated ``add_SegmentationServicer_to_server``, but with request
        parsers that never raise (see :class:`Undecodable`)."""
        service = pb.DESCRIPTOR.services_by_name["Segmentation"]
        handlers = {}
        for m in service.methods:
            request_class, response_class = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                getattr(self, m.name), request_deserializer=_tolerant_parser(request_class),
                response_serializer=response_class.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
        server.add_registered_method_handlers(service.full_name, handlers)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Message limits, and a per-connection stream cap well above the admission bounds (so
    overload shows as a fast RESOURCE_EXHAUSTED from admission, not as client-side queueing)."""
    return [("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", settings.max_request_bytes),
            ("grpc.max_concurrent_streams", max(100, 4 * concurrent_rpc_limit(settings))),
            ("grpc.so_reuseport", 0)]


CHEAP_RPC_HEADROOM = 16


def concurrent_rpc_limit(settings: Settings) -> int:
    """Backstop for RPCs alive at once, enforced by gRPC before a request is read: the
    admission bounds plus headroom for cheap calls (ListModels, health, calls being rejected).
    Each live RPC may hold one request of up to --max-request-bytes, so request memory is at
    most this many times --max-request-bytes, whatever the offered load."""
    return settings.max_inflight + settings.max_queue + CHEAP_RPC_HEADROOM


async def create_server(settings: Settings, gateway: Gateway, authenticator: Authenticator | None = None,
                        credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.aio.Server, int, Health]:
    """Bind the gRPC server (port 0 picks a free port) with health (NOT_SERVING) and reflection;
    TLS when ``credentials`` are given, else plaintext."""
    authenticator = authenticator or Authenticator()
    gate = ProbeGate(authenticator, settings.auth_exempt_health, settings.auth_exempt_reflection)
    server = grpc.aio.server(options=server_options(settings), interceptors=[gate],
                             maximum_concurrent_rpcs=concurrent_rpc_limit(settings))
    admission = Admission(settings.max_inflight, settings.max_queue, gateway.metrics.registry)
    SegmentationServicer(gateway, authenticator, admission).add_to_server(server)
    checker = Health()
    await checker.set_serving(False)
    health_pb2_grpc.add_HealthServicer_to_server(checker.servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise StartupError(f"cannot bind gRPC to {address}")
    await server.start()
    return server, port, checker


def _security(settings: Settings) -> tuple[Authenticator, grpc.ServerCredentials | None]:
    """Authentication and TLS from the settings; StartupError on anything missing or unsafe."""
    check_exposure(settings)
    credentials = ReloadingCredentials(settings).credentials if tls_enabled(settings) else None
    return Authenticator.from_settings(settings), credentials


async def serve(settings: Settings) -> int:
    audit.configure(settings.audit_log)
    metrics = Metrics(settings.backend)
    health_server, health_port = None, None
    try:
        authenticator, credentials = _security(settings)
        gateway = Gateway(settings, DeadlineBoundBackend(create_backend(settings)), metrics)
        server, port, checker = await create_server(settings, gateway, authenticator, credentials)
        if settings.health_port >= 0:
            health_server, health_port = await create_health_server(settings, checker)
            log.info("plaintext health-only port on %s:%d", settings.health_host, health_port)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 2
    gateway.on_ready_change(checker.set_serving)
    http, _ = metrics.serve_http(settings.metrics_host, settings.metrics_port)
    metrics_port = http.server_port
    log.info("gRPC%s on %s:%d (health NOT_SERVING until warm), metrics on http://%s:%d/metrics, backend %s",
             " (TLS)" if credentials else "", settings.host, port, settings.metrics_host, metrics_port,
             settings.backend)
    if settings.port_file:
        port_file = Path(settings.port_file)
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"grpc": port, "metrics": metrics_port, "health": health_port, "pid": os.getpid()}))
        tmp.replace(port_file)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    rc = 0
    watcher = None
    try:
        starting = asyncio.ensure_future(gateway.start())
        done, _ = await asyncio.wait({starting, asyncio.ensure_future(stop.wait())},
                                     return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            starting.result()
            watcher = asyncio.ensure_future(gateway.watch_backend())
            await stop.wait()
        else:
            starting.cancel()
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        rc = 1
    finally:
        log.info("stopping: health NOT_SERVING, draining in-flight requests for up to %.0f s", settings.grace_s)
        if watcher is not None:
            watcher.cancel()
        await checker.servicer.enter_graceful_shutdown()
        await server.stop(settings.grace_s)
        if health_server is not None:
            await health_server.stop(0)
        await gateway.close()
        http.shutdown()
        log.info("stopped")
    return rc
