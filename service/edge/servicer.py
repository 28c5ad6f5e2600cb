"""The Segmentation servicer and its :func:`rpc` decorator: the one error mapping, auth,
admission, the call's deadline, metrics and the audit line.

Where the cross-cutting checks live, and why: authentication, per-model authorisation,
admission (overload control), the call's deadline and the audit line all sit in the
:func:`rpc` decorator around each Segmentation method, not in grpc.aio server interceptors.
An interceptor sees only the method name and metadata, before the request is read: it could
check a token, but not the model named inside the request (authorisation), not the prompt
count and image size (audit), and not the final status code the decorator decides (audit,
metrics). Splitting the work would put status decisions in two places; the decorator keeps
exactly one place where exceptions become status codes, in a fixed order:
undecodable request -> authenticate -> resolve and authorise the model -> admit (bounded
queue) -> run under the client's deadline -> map errors -> metrics + one audit line. The
single interceptor (:class:`service.edge.health.ProbeGate`) only guards grpc.health.v1 and
reflection, which the decorator does not wrap, when they are configured to need a token; it
maps errors with the same :func:`service.edge.status.status_for`.

Protobuf messages are read and built only in :mod:`service.edge.convert`; the model a call
means is resolved only by :meth:`service.inference.gateway.Gateway.model_name`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from dataclasses import dataclass

import grpc

from medseg_client._generated import segmentation_pb2_grpc as pb_grpc
from service.core import errors
from service.edge import convert
from service.edge import deadline
from service.edge.admission import Admission
from service.edge.status import client_message, status_for
from service.inference.gateway import Gateway
from service.observability import audit
from service.security.auth import Authenticator, Principal
from service.security.tls import peer_common_name

log = logging.getLogger(__name__)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# The gateway's own deadline for a call ends this much before the client's.
DEADLINE_MARGIN_S = 0.05


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Call:
    """What the decorator hands each method: the authenticated caller, and the model the call
    means (resolved by ``Gateway.model_name``, already authorised; ``None`` for methods that
    name no model)."""

    principal: Principal
    model: str | None = None


def rpc(method: str, *, admitted: bool = True):
    """The one place where exceptions become gRPC statuses, with auth, admission, deadline,
    metrics, an audit line and a request id.

    Domain errors keep their message; anything unexpected is INTERNAL with a generic
    message and the request id, and its traceback is logged under that id. ``admitted``
    calls (model work) take an admission slot; cheap ones (ListModels) do not. The wrapped
    method receives a :class:`Call` as its third argument.
    """

    def decorate(fn):
        @functools.wraps(fn)
        async def wrapper(self: "SegmentationServicer", request, context: grpc.aio.ServicerContext):
            gateway = self.gateway
            metrics = gateway.metrics
            request_id = _request_id(context)
            context.set_trailing_metadata((("x-request-id", request_id),))
            record = audit.AuditRecord(request_id, method, metrics.backend, peer=context.peer() or "")
            code = grpc.StatusCode.OK
            start = time.perf_counter()
            metrics.inflight.labels(metrics.backend).inc()
            try:
                if isinstance(request, convert.Undecodable):
                    raise errors.InvalidArgument(f"the request is not a valid {request.type_name} message")
                principal = self.authenticator.authenticate(context.invocation_metadata())
                record.caller, record.auth = principal.caller, principal.scheme
                record.client_cert = peer_common_name(context)
                summary = convert.request_summary(request)
                model = None if summary.model is None else gateway.model_name(summary.model)
                if model is not None:  # no request text in the audit line but a name we serve
                    record.model = model if gateway.serves(model) else audit.UNKNOWN_MODEL
                record.prompts = summary.prompts
                if summary.image_size is not None:
                    record.image_height, record.image_width = summary.image_size
                if model is not None:
                    self.authenticator.authorize(principal, model)
                response = await self._run(fn, request, context, Call(principal, model), admitted)
                size = convert.response_size(response)
                if size is not None:
                    record.image_height, record.image_width = size
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
    """Each method: convert the request (:mod:`service.edge.convert`), call the gateway,
    convert the result. Requests and responses are ``medseg.v1`` messages, handled only by
    convert (this module does not import the message classes)."""

    def __init__(self, gateway: Gateway, authenticator: Authenticator | None = None,
                 admission: Admission | None = None) -> None:
        self.gateway = gateway
        self.authenticator = authenticator or Authenticator()
        settings = gateway.settings
        self.admission = admission or Admission(settings.max_inflight, settings.max_queue)

    async def _run(self, fn, request, context: grpc.aio.ServicerContext, call: Call, admitted: bool):
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
                        return await fn(self, request, context, call)
                    wait = remaining if remaining is not None else self.gateway.settings.backend_timeout_s
                    async with self.admission.slot(wait):
                        return await fn(self, request, context, call)
            except TimeoutError as exc:
                if limit.expired():
                    raise errors.DeadlineExceeded("the call's deadline passed before it finished") from exc
                raise

    @rpc("Segment")
    async def Segment(self, request, context, call: Call):
        req = convert.segment_request_from_proto(request, call.model)
        result = await self.gateway.segment(req)
        return await asyncio.to_thread(convert.segment_response_to_proto, result, req.encoding)

    @rpc("EmbedImage")
    async def EmbedImage(self, request, context, call: Call):
        result = await self.gateway.embed(call.model, convert.embed_image_from_proto(request))
        return convert.embed_response_to_proto(result)

    @rpc("ListModels", admitted=False)
    async def ListModels(self, request, context, call: Call):
        """Only the models this caller may use."""
        return convert.list_models_response(m for m in self.gateway.list_models() if call.principal.may_use(m.name))

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register like the generated ``add_SegmentationServicer_to_server``, but with request
        parsers that never raise (see :class:`service.edge.convert.Undecodable`)."""
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(getattr(self, name), request_deserializer=parse,
                                                      response_serializer=serialize)
            for name, (parse, serialize) in convert.segmentation_codecs().items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(convert.SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(convert.SERVICE_NAME, handlers)
