"""The gRPC server: binding, health, reflection, TLS, metrics and graceful stop, around the
:class:`service.edge.servicer.SegmentationServicer` (where auth, admission, deadlines, the
error mapping and the audit line live; see that module)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.backends import create_backend
from service.core.errors import StartupError
from service.edge.admission import Admission
from service.edge.deadline import DeadlineBoundBackend
from service.edge.health import SERVICE_NAME, Health, ProbeGate, create_health_server
from service.edge.servicer import SegmentationServicer
from service.inference.gateway import Gateway
from service.observability import audit
from service.observability.metrics import Metrics
from service.security.auth import Authenticator
from service.security.tls import ReloadingCredentials, check_exposure, tls_enabled
from service.settings import Settings

log = logging.getLogger(__name__)


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
