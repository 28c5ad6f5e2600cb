"""grpc.health.v1 of the gateway: serving status, a plaintext health-only port for kubelet
probes, and the token gate for health and reflection when they are not exempt."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.observability import audit
from service.core import errors
from service.security.auth import Authenticator
from service.core.errors import StartupError
from service.settings import Settings
from service.edge.convert import SERVICE_NAME
from service.edge.status import client_message, status_for


class Health:
    """grpc.health.v1 for the whole server ("") and for each of ``services`` (default: the
    Segmentation service; the server adds medseg.v1.Volumes)."""

    def __init__(self, services: tuple[str, ...] = (SERVICE_NAME,)) -> None:
        self.servicer = health.aio.HealthServicer()
        self.services = services

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.services):
            await self.servicer.set(name, status)


HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")


class ProbeGate(grpc.aio.ServerInterceptor):
    """Bearer-token check for grpc.health.v1 and reflection when they are not exempt
    (``--no-auth-exempt-health`` / ``--no-auth-exempt-reflection``). Segmentation methods pass
    through untouched: the :func:`service.edge.servicer.rpc` decorator authenticates them."""

    def __init__(self, authenticator: Authenticator, exempt_health: bool, exempt_reflection: bool) -> None:
        self.authenticator = authenticator
        self.exempt_health, self.exempt_reflection = exempt_health, exempt_reflection

    def _guarded(self, method: str) -> bool:
        if method.startswith(HEALTH_PREFIX):
            return not self.exempt_health
        return method.startswith(REFLECTION_PREFIXES) and not self.exempt_reflection

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not self._guarded(handler_call_details.method):
            return handler
        try:
            self.authenticator.authenticate(handler_call_details.invocation_metadata)
        except errors.ServiceError as exc:
            code, message = status_for(exc), client_message(exc, "-")
            record = audit.AuditRecord("-", handler_call_details.method.rsplit("/", 1)[-1], "-",
                                       status=code.name)
            audit.write(record)
            return _denying(handler, code, message)
        return handler


def _denying(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only aborts with ``code``."""

    async def deny(request_or_iterator, context):
        await context.abort(code, message)

    kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return kind[(handler.request_streaming, handler.response_streaming)](
        deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


async def create_health_server(settings: Settings, checker: Health, options: list[tuple[str, int]],
                               interceptors: list[grpc.aio.ServerInterceptor]) -> tuple[grpc.aio.Server, int]:
    """A plaintext port with grpc.health.v1 only, for kubelet gRPC probes (no TLS, no token).

    It has no pool that clients could fill (no ``maximum_concurrent_rpcs``): ``options`` bound
    each connection (streams, message size, age) and ``interceptors`` the time to receive a
    request (see :func:`service.edge.server.serve`)."""
    server = grpc.aio.server(options=options, interceptors=interceptors)
    health_pb2_grpc.add_HealthServicer_to_server(checker.servicer, server)
    address = f"{settings.health_host}:{settings.health_port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise StartupError(f"cannot bind the health port to {address}")
    await server.start()
    return server, port
