"""The Segmentation servicer and the :func:`rpc` decorator (with its streaming forms
:func:`rpc_stream` and :func:`rpc_client_stream`, used by the Volumes servicer,
:mod:`service.edge.volume_servicer`): the one error mapping, auth, admission, the call's
deadline, metrics and the audit line.

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

The three decorators share one body, :meth:`GuardedServicer._guard` (request id, auth, model,
errors -> status, metrics, audit) around :meth:`GuardedServicer._within` (deadline, admission,
the call's work), so unary, server-streaming and client-streaming calls behave alike.

Protobuf messages are read and built only in :mod:`service.edge.convert` (and, for volumes,
:mod:`service.edge.volume_convert`); the model a call means is resolved only by
:meth:`service.inference.gateway.Gateway.model_name`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from medseg_client._generated import segmentation_pb2_grpc as pb_grpc
from service.core import errors, request_memory
from service.edge import convert
from service.edge import deadline
from service.edge.admission import Admission, Refused
from service.inference import work
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
    name no model). :meth:`describe` notes the size of what the call is about in its audit line."""

    principal: Principal
    model: str | None = None
    record: audit.AuditRecord | None = field(default=None, compare=False, repr=False)

    def describe(self, size: tuple[int, ...] | None) -> None:
        """The image's ``(height, width)`` or the volume's ``(depth, height, width)``, for the audit line."""
        if size is None or self.record is None:
            return
        if len(size) == 3:
            self.record.image_depth = int(size[0])
        self.record.image_height, self.record.image_width = int(size[-2]), int(size[-1])


def _decorated(method: str, admitted: bool, prepare, fn, *, streaming_request: bool = False):
    """The unary-answer wrapper of :func:`rpc` and :func:`rpc_client_stream`."""

    @functools.wraps(fn)
    async def wrapper(self: "GuardedServicer", request, context: grpc.aio.ServicerContext):
        async with self._guard(method, None if streaming_request else request, context) as call:
            prepared, estimate = (request, None) if prepare is None else prepare(self, request, call)
            serialize = self._serializers[fn.__name__]
            async with self._within(context, call, admitted, estimate):
                payload, size = await self._answer(await fn(self, prepared, context, call), serialize, admitted)
            call.describe(size)
            return payload

    return wrapper


def rpc(method: str, *, admitted: bool = True, prepare=None):
    """The one place where exceptions become gRPC statuses, with auth, admission, deadline,
    metrics, an audit line and a request id (unary request, unary answer).

    Domain errors keep their message; anything unexpected is INTERNAL with a generic
    message and the request id, and its traceback is logged under that id. ``admitted``
    calls (model work) take an admission slot; cheap ones (ListModels) do not. The wrapped
    method receives a :class:`Call` as its third argument.

    ``prepare(self, request, call) -> (what the method receives, MemoryEstimate or None)`` runs
    before admission (cheap: converting the request, reading the image header): the estimate is
    what admission charges the call, and an answer that cannot fit the send limit is refused
    there, before any work. The method's answer is serialised here, inside the admission slot, and
    refused (RESOURCE_EXHAUSTED, the limit named) when over --max-request-bytes, so the
    status in the audit line is the one the client gets, also when the answer cannot be sent.
    A RESOURCE_EXHAUSTED with a retry hint sends it as trailing metadata ``retry-after-ms``.

    The body is :meth:`GuardedServicer._guard` (request id, auth, model, errors -> status,
    metrics, audit) around :meth:`GuardedServicer._within` (deadline, admission slot, the call's
    work); :func:`rpc_stream` and :func:`rpc_client_stream` wrap the same two.
    """

    def decorate(fn):
        return _decorated(method, admitted, prepare, fn)

    return decorate


def rpc_client_stream(method: str, *, admitted: bool = False):
    """:func:`rpc` for a client-streaming method (a stream of requests, one answer): the guard
    runs from the call's metadata before any message is read (no model, no summary), then the
    method reads the request iterator itself (converting each message through its convert
    module). Its answer is serialised and checked like :func:`rpc`'s."""

    def decorate(fn):
        return _decorated(method, admitted, None, fn, streaming_request=True)

    return decorate


def rpc_stream(method: str, *, to_message: Callable[[object], object], admitted: bool = True, prepare=None):
    """:func:`rpc` for a server-streaming method: the wrapped method returns (or is a coroutine
    returning) an async iterator of domain items, e.g. the volume service's; each item is
    converted by ``to_message`` (a convert function), serialised, checked against
    --max-request-bytes and written as soon as the iterator yields it.

    The whole stream runs inside the guard, the deadline and (``admitted``) the admission slot,
    which is held until the stream ends. An error raised mid-stream ends the call with its
    mapped status after the messages already written (one audit line, with the final status).
    When the client goes away or the deadline passes, the cancel reaches the service's iterator
    itself: as :class:`asyncio.CancelledError` where it is awaiting, or thrown in at its
    ``yield`` when it is suspended there (the call was writing its last item); it is then
    closed. So its work stops before the next slice."""

    def decorate(fn):
        @functools.wraps(fn)
        async def wrapper(self: "GuardedServicer", request, context: grpc.aio.ServicerContext):
            async with self._guard(method, request, context) as call:
                prepared, estimate = (request, None) if prepare is None else prepare(self, request, call)
                serialize = self._serializers[fn.__name__]
                async with self._within(context, call, admitted, estimate):
                    stream = fn(self, prepared, context, call)
                    if inspect.isawaitable(stream):
                        stream = await stream
                    await self._relay(stream, context, to_message, serialize)

        return wrapper

    return decorate


_END = object()


async def _cancel_stream(stream) -> None:
    """Throw a cancel into ``stream`` where it is suspended (its ``yield``); it should stop."""
    athrow = getattr(stream, "athrow", None)
    if athrow is None:
        return
    try:
        await athrow(asyncio.CancelledError())
    except (asyncio.CancelledError, StopAsyncIteration):
        pass
    except Exception as exc:  # noqa: BLE001 - it failed while stopping; the call ends anyway
        log.info("a cancelled stream raised %s while stopping", type(exc).__name__)


async def _close_stream(stream) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception as exc:  # noqa: BLE001 - e.g. it ignored GeneratorExit; nothing more to do
        log.info("a stream raised %s while closing", type(exc).__name__)


def _already_serialised(serialize):
    """gRPC's response serializer: the handlers return bytes they serialised themselves."""
    def passthrough(response) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)

    return passthrough


class GuardedServicer:
    """What the gateway's servicers share: the guard of every call (:meth:`_guard`), its
    deadline and admission (:meth:`_within`), answers serialised and checked (:meth:`_answer`,
    :meth:`_relay`), and the caller's cache scope. A subclass names its convert functions:
    ``codecs`` (method -> (tolerant parser, serializer)), ``summarize`` (what the guard reads of
    a request) and ``response_size`` (the audit line's size of an answer)."""

    codecs: Callable[[], dict] = staticmethod(convert.segmentation_codecs)
    summarize: Callable[[object], convert.RequestSummary] = staticmethod(convert.request_summary)
    response_size: Callable[[object], tuple[int, ...] | None] = staticmethod(convert.response_size)

    def __init__(self, gateway: Gateway, authenticator: Authenticator | None = None,
                 admission: Admission | None = None) -> None:
        self.gateway = gateway
        self.authenticator = authenticator or Authenticator()
        settings = gateway.settings
        self.admission = admission or Admission.from_settings(settings)
        self._serializers = {name: serialize for name, (_, serialize) in self.codecs().items()}

    @contextlib.asynccontextmanager
    async def _guard(self, method: str, request, context: grpc.aio.ServicerContext) -> AsyncIterator[Call]:
        """Request id, authentication, the model (resolved, authorised), then the body; every
        exception of the body becomes the call's status here; metrics and one audit line at the
        end. ``request``: the request message, or ``None`` for a client-streaming call (the
        guard then runs on the metadata alone)."""
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
            summary = convert.RequestSummary() if request is None else self.summarize(request)
            model = None if summary.model is None else gateway.model_name(summary.model)
            if model is not None:  # no request text in the audit line but a name we serve
                record.model = model if gateway.serves(model) else audit.UNKNOWN_MODEL
            record.prompts = summary.prompts
            if summary.image_size is not None:
                record.image_height, record.image_width = summary.image_size
            if model is not None:
                self.authenticator.authorize(principal, model)
            yield Call(principal, model, record)
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
            trailing = [("x-request-id", request_id)]
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                record.reason = getattr(exc, "reason", None) or "limit"
                if not isinstance(exc, Refused) and getattr(exc, "reason", None):
                    self.admission.count_rejection(exc.reason)  # admission counts its own
                retry_after_s = getattr(exc, "retry_after_s", None)
                if retry_after_s is not None:
                    trailing.append(("retry-after-ms", str(max(1, math.ceil(retry_after_s * 1000)))))
            context.set_trailing_metadata(tuple(trailing))
            await context.abort(code, client_message(exc, request_id), tuple(trailing))
        finally:
            elapsed = time.perf_counter() - start
            metrics.inflight.labels(metrics.backend).dec()
            metrics.requests.labels(method, code.name, metrics.backend).inc()
            metrics.request_latency.labels(method, metrics.backend).observe(elapsed)
            record.status, record.latency_ms = code.name, elapsed * 1000.0
            audit.write(record)

    @contextlib.asynccontextmanager
    async def _within(self, context: grpc.aio.ServicerContext, call: Call, admitted: bool,
                      estimate=None) -> AsyncIterator[None]:
        """The body under the client's deadline (also handed to the backend, see
        service.edge.deadline), inside an admission slot when ``admitted`` (charged ``estimate``,
        a MemoryEstimate or ``None``). A call without a deadline waits for a slot at most
        --backend-timeout-s.

        Admitted calls run with a :class:`work.CallWork` (the deadline, the send limit, memory
        growth through the admission grant): their threads stop at the next stage once the
        call is abandoned, and the slot is given back when the last of them has ended."""
        remaining = context.time_remaining()
        if remaining is not None:  # finish (with DEADLINE_EXCEEDED) just before the client gives up
            remaining = max(0.0, remaining - DEADLINE_MARGIN_S)
        settings = self.gateway.settings
        with deadline.bounded(remaining):
            try:
                async with asyncio.timeout(remaining) as limit:
                    if not admitted:
                        yield
                        return
                    wait = remaining if remaining is not None else settings.backend_timeout_s
                    calls = work.CallWork(None if remaining is None else time.monotonic() + remaining,
                                          answer_limit=settings.max_request_bytes)
                    async with self.admission.slot(wait, caller=call.principal.caller,
                                                   memory=0 if estimate is None else estimate.total,
                                                   work=calls) as grant:
                        calls.use_reserve(grant.grow)
                        with work.bound(calls):
                            yield
            except TimeoutError as exc:
                if limit.expired():
                    raise errors.DeadlineExceeded("the call's deadline passed before it finished") from exc
                raise

    async def _answer(self, message, serialize, in_thread: bool) -> tuple[bytes, tuple[int, ...] | None]:
        """The answer's bytes (serialised here, not by gRPC after the handler returned, so a
        failure is this call's status) and its size for the audit line, refused over the send
        limit."""
        size = self.response_size(message)
        payload = await work.run_in_thread(serialize, message) if in_thread else serialize(message)
        del message
        limit = self.gateway.settings.max_request_bytes
        if len(payload) > limit:
            raise request_memory.AnswerTooLarge(f"the answer is {len(payload)} bytes; the gateway sends at most "
                                                f"{limit} bytes (--max-request-bytes): send fewer prompts or a "
                                                "smaller image, or ask for PNG or COCO RLE masks")
        return payload, size

    async def _relay(self, stream, context: grpc.aio.ServicerContext, to_message, serialize) -> None:
        """Write each item of ``stream`` (an async iterator) as soon as it comes: converted,
        serialised and checked by :meth:`_answer` (on the event loop: one slice's message is
        small). A cancel while ``stream`` is suspended at its yield (we were writing) is thrown
        into it; it is closed however the call ends."""
        iterator = aiter(stream)
        try:
            while True:
                item = await anext(iterator, _END)  # a cancel here is raised inside the stream itself
                if item is _END:
                    return
                try:
                    payload, _ = await self._answer(to_message(item), serialize, False)
                    del item
                    await context.write(payload)
                except asyncio.CancelledError:
                    await _cancel_stream(iterator)
                    raise
        finally:
            await _close_stream(iterator)

    def _cache_scope(self, call: Call) -> str:
        """Whose cached images and ids this call sees (tenant isolation, ``--cache-scope``)."""
        principal = call.principal
        return self.gateway.cache_scope(None if principal.scheme == "none" else principal.caller)

    def _register(self, server: grpc.aio.Server, service_name: str, kinds: dict[str, tuple[bool, bool]]) -> None:
        """Register this servicer's methods like the generated ``add_*_to_server``, but with
        request parsers that never raise (see :class:`service.edge.convert.Undecodable`) and
        answers the methods serialised themselves. ``kinds``: method -> (client streaming,
        server streaming)."""
        factories = {(False, False): grpc.unary_unary_rpc_method_handler,
                     (False, True): grpc.unary_stream_rpc_method_handler,
                     (True, False): grpc.stream_unary_rpc_method_handler,
                     (True, True): grpc.stream_stream_rpc_method_handler}
        handlers = {
            name: factories[kinds.get(name, (False, False))](
                getattr(self, name), request_deserializer=parse, response_serializer=_already_serialised(serialize))
            for name, (parse, serialize) in self.codecs().items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
        server.add_registered_method_handlers(service_name, handlers)


class SegmentationServicer(GuardedServicer, pb_grpc.SegmentationServicer):
    """Each method: convert the request (:mod:`service.edge.convert`), call the gateway,
    convert the result. Requests and responses are ``medseg.v1`` messages, handled only by
    convert (this module does not import the message classes)."""

    def _limits(self):
        settings = self.gateway.settings
        return settings.image_limits, settings.max_request_bytes

    def _prepare_segment(self, request, call: Call):
        """Before admission: the domain request and its memory estimate (refuses, before any
        work, an answer that cannot fit the send limit)."""
        req = convert.segment_request_from_proto(request, call.model)
        limits, answer_limit = self._limits()
        return req, request_memory.segment_estimate(req, limits, answer_limit)

    def _prepare_embed(self, request, call: Call):
        image = convert.embed_image_from_proto(request)
        return image, request_memory.embed_estimate(image, self._limits()[0])

    @rpc("Segment", prepare=_prepare_segment)
    async def Segment(self, req, context, call: Call):
        """``req``: the domain request (see :meth:`_prepare_segment`)."""
        result = await self.gateway.segment(req, self._cache_scope(call))
        return await work.run_in_thread(convert.segment_response_to_proto, result, req.encoding)

    @rpc("EmbedImage", prepare=_prepare_embed)
    async def EmbedImage(self, image, context, call: Call):
        """``image``: the domain image (see :meth:`_prepare_embed`)."""
        result = await self.gateway.embed(call.model, image, self._cache_scope(call))
        return convert.embed_response_to_proto(result)

    @rpc("ListModels", admitted=False)
    async def ListModels(self, request, context, call: Call):
        """Only the models this caller may use."""
        return convert.list_models_response(m for m in self.gateway.list_models() if call.principal.may_use(m.name))

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register like the generated ``add_SegmentationServicer_to_server``, but with request
        parsers that never raise (see :class:`service.edge.convert.Undecodable`)."""
        self._register(server, convert.SERVICE_NAME, {})
