"""What a connection may hold before its request is even read: the intake gate.

gRPC starts an RPC when its HTTP/2 headers arrive; the request message may follow much later,
or never. Left alone, a few dozen such streams on one connection, without a token, held every
``maximum_concurrent_rpcs`` slot (gRPC's own limit covers every method, health included, and
has no notion of a connection), so health, ListModels and real Segment calls waited behind
them. This interceptor replaces that limit:

* **Probes stay outside the pool**: grpc.health.v1 and reflection never take a slot (they are
  cheap; kubelet also has its own ``--health-port`` server), so no client can starve them.
* **Authentication first** (when it is on): a Segmentation call without a valid token is
  refused with UNAUTHENTICATED from its headers, before it takes a slot and before its
  request is read; the servicer checks again (and authorises) once the request is there.
* **A pool and a per-connection share**: at most ``pool`` Segmentation calls are open at
  once (the admission bounds plus headroom: what bounds request memory), and at most
  ``per_connection`` of them on one connection (one HTTP/2 connection = one peer address
  with its port); beyond either, RESOURCE_EXHAUSTED at once. The transport's
  ``grpc.max_concurrent_streams`` caps a connection's streams of every kind a little above
  that (see :func:`service.edge.server.server_options`), so probes on a full connection still
  find a stream and a client that ignores the setting gets its extra streams refused by gRPC.
* **A bound on receiving**: a unary request must arrive within ``receive_timeout_s`` of the
  call's start, else the call ends with DEADLINE_EXCEEDED and frees its slot.
* **Draining at shutdown** (:meth:`IntakeGate.drain`, then :meth:`IntakeGate.quiet`): new
  calls get UNAVAILABLE (retryable: another replica answers) while the open ones finish; the
  server is stopped only once every call has ended and its last answer had time to leave.
  gRPC's own graceful stop counts a call as done when its answer is handed to the transport,
  then closes the connections: with bytes of a large answer still unsent (or the peer's
  flow-control frames unread), the client got UNAVAILABLE "connection reset" for a call the
  gateway had answered OK.
* **Client-streaming calls** (``Volumes.UploadVolume``: a header, then file parts) take a slot
  and count against the pool and their connection's share like any other call, but are exempt
  from that whole-message bound: an upload of hundreds of MiB may take longer than
  ``receive_timeout_s`` and is bounded by the client's deadline instead. It must keep moving,
  though: each message must arrive within ``receive_timeout_s`` of the previous one (of the
  call's start, for the first), else the call ends with DEADLINE_EXCEEDED (raised to the
  servicer as :class:`errors.DeadlineExceeded`, which reports it) and frees its slot.
  Reflection streams by design and stays outside the pool.

Unary-request handlers are served as request-streaming ones (the same bytes on the wire: one
length-prefixed message) so the gate, not gRPC, waits for the message, with a timeout; the
wrapped handler then runs exactly as before with the request object.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections import Counter
from typing import Callable

import grpc

from service.core import errors
from service.edge.health import HEALTH_PREFIX, REFLECTION_PREFIXES
from service.edge.status import client_message, status_for
from service.security.auth import Authenticator, Principal

# (method name, context, status code, principal or None) of every call the gate ends itself
Rejected = Callable[[str, grpc.aio.ServicerContext, grpc.StatusCode, Principal | None], None]


def is_probe(method: str) -> bool:
    return method.startswith(HEALTH_PREFIX) or method.startswith(REFLECTION_PREFIXES)


class IntakeGate(grpc.aio.ServerInterceptor):
    def __init__(self, *, pool: int | None, per_connection: int | None, receive_timeout_s: float,
                 authenticator: Authenticator | None = None, on_reject: Rejected | None = None) -> None:
        """``pool``/``per_connection``: ``None`` = no bound (the health-only server)."""
        self.pool, self.per_connection = pool, per_connection
        self.receive_timeout_s = receive_timeout_s
        self.authenticator = authenticator
        self.on_reject = on_reject
        self.open = 0  # Segmentation calls holding a slot
        self.by_connection: Counter[str] = Counter()
        self.draining = False
        self.unfinished = 0  # pooled calls gRPC has not yet ended (their answer may still be leaving)
        self.last_ended = 0.0  # time.monotonic() when the last of them ended
        self._ended = asyncio.Event()

    def drain(self) -> None:
        """From now on refuse new pooled calls with UNAVAILABLE; open ones go on."""
        self.draining = True

    async def quiet(self, timeout_s: float, settle_s: float) -> bool:
        """Wait until every pooled call has ended (at most ``timeout_s``), then until ``settle_s``
        have passed since the last one ended, so its answer leaves before the connections close.
        False when calls were still open at the timeout."""
        deadline = time.monotonic() + timeout_s
        while self.unfinished > 0:
            self._ended.clear()
            try:
                await asyncio.wait_for(self._ended.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return False
        wait = min(self.last_ended + settle_s, deadline) - time.monotonic()
        if self.last_ended > 0 and wait > 0:
            await asyncio.sleep(wait)
        return True

    def _track(self, context: grpc.aio.ServicerContext) -> None:
        """Count the call until gRPC ends it (answer sent, or the call cancelled)."""
        self.unfinished += 1

        def ended(_context) -> None:
            self.unfinished -= 1
            self.last_ended = time.monotonic()
            self._ended.set()

        context.add_done_callback(ended)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        pooled = not is_probe(method)
        name = method.rsplit("/", 1)[-1]
        if handler.request_streaming:
            if not pooled:
                return handler  # reflection: streams by design, and never pooled
            return self._client_streaming(handler, name)
        behaviour = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
            return handler  # a synchronous handler would need the sync context: none is registered here
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(behaviour, name, pooled), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.stream_unary_rpc_method_handler(
            self._unary(behaviour, name, pooled), request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _unary(self, behaviour, name: str, pooled: bool):
        async def serve(request_iterator, context: grpc.aio.ServicerContext):
            connection, principal = await self._enter(name, context, pooled)
            try:
                request = await self._receive(name, context, pooled, principal)
                return await behaviour(request, context)
            finally:
                self._leave(connection, pooled)

        return serve

    def _streaming(self, behaviour, name: str, pooled: bool):
        async def serve(request_iterator, context: grpc.aio.ServicerContext):
            connection, principal = await self._enter(name, context, pooled)
            try:
                request = await self._receive(name, context, pooled, principal)
                if inspect.isasyncgenfunction(behaviour):
                    async for response in behaviour(request, context):
                        await context.write(response)
                else:
                    await behaviour(request, context)
            finally:
                self._leave(connection, pooled)

        return serve

    def _client_streaming(self, handler, name: str):
        """A client-streaming handler, pooled, each message bounded by the receive timeout."""
        behaviour = handler.stream_stream if handler.response_streaming else handler.stream_unary
        if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
            return handler

        async def serve(request_iterator, context: grpc.aio.ServicerContext):
            connection, _ = await self._enter(name, context, True)
            try:
                async with contextlib.aclosing(self._paced(request_iterator)) as requests:
                    if inspect.isasyncgenfunction(behaviour):
                        async for response in behaviour(requests, context):
                            await context.write(response)
                        return None
                    return await behaviour(requests, context)
            finally:
                self._leave(connection, True)

        factory = grpc.stream_stream_rpc_method_handler if handler.response_streaming \
            else grpc.stream_unary_rpc_method_handler
        return factory(serve, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    async def _paced(self, request_iterator):
        """The call's messages, each of which must arrive within ``receive_timeout_s`` of the
        previous one (the stream as a whole may take longer: the client's deadline bounds it)."""
        messages = aiter(request_iterator)
        received = 0
        while True:
            try:
                message = await asyncio.wait_for(anext(messages), self.receive_timeout_s)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise errors.DeadlineExceeded(
                    f"message {received + 1} of the stream did not arrive within {self.receive_timeout_s:g} s of "
                    "the previous one (--request-receive-timeout-s): keep the stream moving") from None
            received += 1
            yield message

    async def _enter(self, name: str, context: grpc.aio.ServicerContext,
                     pooled: bool) -> tuple[str | None, Principal | None]:
        """Take a slot (pooled calls), or end the call: UNAUTHENTICATED, RESOURCE_EXHAUSTED.
        Returns the connection holding the slot and the caller, when known."""
        if not pooled:
            return None, None
        self._track(context)
        if self.draining:
            await self._end(name, context, grpc.StatusCode.UNAVAILABLE,
                            "the gateway is shutting down; retry (another replica answers)", None)
        principal = None
        if self.authenticator is not None and self.authenticator.enabled:
            try:
                principal = self.authenticator.authenticate(context.invocation_metadata())
            except errors.ServiceError as exc:
                await self._end(name, context, status_for(exc), client_message(exc, "-"), None)
        connection = context.peer() or "-"
        if self.pool is not None and self.open >= self.pool:
            await self._end(name, context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"the gateway has {self.pool} calls open, its limit; retry with backoff", principal)
        if self.per_connection is not None and self.by_connection[connection] >= self.per_connection:
            await self._end(name, context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"this connection has {self.per_connection} calls open, the limit per connection "
                            "(--max-rpcs-per-connection); retry with backoff or open another channel", principal)
        self.open += 1
        self.by_connection[connection] += 1
        return connection, principal

    def _leave(self, connection: str | None, pooled: bool) -> None:
        if not pooled or connection is None:
            return
        self.open -= 1
        self.by_connection[connection] -= 1
        if self.by_connection[connection] <= 0:
            del self.by_connection[connection]

    async def _receive(self, name: str, context: grpc.aio.ServicerContext, pooled: bool,
                       principal: Principal | None):
        """The call's one request message, if it arrives within the bound."""
        try:
            request = await asyncio.wait_for(context.read(), self.receive_timeout_s)
        except TimeoutError:
            await self._end(name, context, grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"the request message did not arrive within {self.receive_timeout_s:g} s "
                            "(--request-receive-timeout-s)", principal, pooled)
        if request is grpc.aio.EOF:
            # No message: the client half-closed without one, or gRPC already failed the call
            # (a message over --max-request-bytes: the client has RESOURCE_EXHAUSTED). The two
            # look alike here, so no audit line claims a status the client may not have got.
            await self._end(name, context, grpc.StatusCode.INVALID_ARGUMENT,
                            "the call ended without a request message", principal, reported=False)
        return request

    async def _end(self, name: str, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                   principal: Principal | None, reported: bool = True) -> None:
        """End the call with ``code``; Segmentation calls are reported (audit line, metrics)."""
        if self.on_reject is not None and reported:
            self.on_reject(name, context, code, principal)
        await context.abort(code, message)
