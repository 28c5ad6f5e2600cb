"""The gRPC server: binding, health, reflection, TLS, metrics and graceful stop, around the
:class:`service.edge.servicer.SegmentationServicer` and the
:class:`service.edge.volume_servicer.VolumesServicer` (where auth, admission, deadlines, the
error mapping and the audit line live; see service.edge.servicer). Both share one admission."""

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
from service.edge.intake import IntakeGate, Rejected
from service.edge.servicer import SegmentationServicer, _request_id
from service.edge.volume_convert import SERVICE_NAME as VOLUMES_SERVICE_NAME
from service.edge.volume_servicer import VolumesServicer
from service.inference import work
from service.inference.gateway import Gateway
from service.observability import audit
from service.observability.metrics import Metrics
from service.security.auth import Authenticator, Principal
from service.security.tls import ReloadingCredentials, check_exposure, tls_enabled
from service.settings import Settings

log = logging.getLogger(__name__)


# Streams one connection may open beyond --max-rpcs-per-connection: health and reflection on a
# connection whose Segmentation share is full still find one.
PROBE_STREAMS = 8
# The health-only port: streams per connection, largest request (HealthCheckRequest is tiny),
# and how long a probe may take to send it.
HEALTH_PORT_STREAMS = 8
HEALTH_PORT_MAX_REQUEST_BYTES = 4096
HEALTH_RECEIVE_TIMEOUT_S = 5.0


def connection_options(settings: Settings) -> list[tuple[str, int]]:
    """What any one client connection may hold, and for how long (main and health port alike):
    keepalive pings find dead peers; pings the client sends more often than every 10 s without
    data are strikes (two, and the connection is closed); idle connections are closed after
    --max-connection-idle-s, every connection after --max-connection-age-s (GOAWAY: clients
    reconnect on their own; calls then open get --backend-timeout-s + --request-receive-timeout-s
    to finish). 0 turns the idle or age bound off."""
    options = [("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000),
               ("grpc.http2.min_ping_interval_without_data_ms", 10_000), ("grpc.http2.max_ping_strikes", 2),
               ("grpc.so_reuseport", 0)]
    if settings.max_connection_idle_s > 0:
        options.append(("grpc.max_connection_idle_ms", int(settings.max_connection_idle_s * 1000)))
    if settings.max_connection_age_s > 0:
        grace_s = settings.backend_timeout_s + settings.request_receive_timeout_s
        options += [("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(grace_s * 1000))]
    return options


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Message limits, the per-connection HTTP/2 stream cap (enforced by gRPC's transport: a
    stream above it is refused, REFUSED_STREAM, even from a client that ignores the setting) and
    the connection bounds."""
    return [("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", settings.max_request_bytes),
            ("grpc.max_concurrent_streams", settings.max_rpcs_per_connection + PROBE_STREAMS),
            *connection_options(settings)]


def health_port_options(settings: Settings) -> list[tuple[str, int]]:
    """The health-only port: few streams per connection, tiny requests, the connection bounds."""
    return [("grpc.max_receive_message_length", HEALTH_PORT_MAX_REQUEST_BYTES),
            ("grpc.max_concurrent_streams", HEALTH_PORT_STREAMS), *connection_options(settings)]


CHEAP_RPC_HEADROOM = 16


def concurrent_rpc_limit(settings: Settings) -> int:
    """Segmentation and Volumes RPCs open at once, enforced by the intake gate before a request
    is read (:mod:`service.edge.intake`): the admission bounds plus headroom for cheap calls
    (ListModels, calls being rejected). Each open unary RPC may hold one request of up to
    --max-request-bytes, so their request memory is at most this many times --max-request-bytes,
    whatever the offered load; an open UploadVolume holds what it has received so far (at most
    --max-volume-bytes, checked by the volume service as it arrives). Health and reflection are
    outside this pool."""
    return settings.max_inflight + settings.max_queue + CHEAP_RPC_HEADROOM


def _report_rejection(gateway: Gateway) -> Rejected:
    """The audit line and metrics of a call the intake gate ended before the servicer saw it."""
    metrics = gateway.metrics

    def report(method: str, context: grpc.aio.ServicerContext, code: grpc.StatusCode,
               principal: Principal | None) -> None:
        request_id = _request_id(context)
        context.set_trailing_metadata((("x-request-id", request_id),))
        record = audit.AuditRecord(request_id, method, metrics.backend, peer=context.peer() or "", status=code.name)
        if principal is not None:
            record.caller, record.auth = principal.caller, principal.scheme
        audit.write(record)
        metrics.requests.labels(method, code.name, metrics.backend).inc()

    return report


async def create_server(settings: Settings, gateway: Gateway, authenticator: Authenticator | None = None,
                        credentials: grpc.ServerCredentials | None = None
                        ) -> tuple[grpc.aio.Server, int, Health, IntakeGate]:
    """Bind the gRPC server (port 0 picks a free port) with health (NOT_SERVING) and reflection;
    TLS when ``credentials`` are given, else plaintext. The intake gate is returned for
    :func:`stop_gracefully`."""
    authenticator = authenticator or Authenticator()
    gate = ProbeGate(authenticator, settings.auth_exempt_health, settings.auth_exempt_reflection)
    # No maximum_concurrent_rpcs: gRPC's limit covers health too and knows no connection; the
    # intake gate bounds calls per server and per connection, and the time to receive them.
    intake = IntakeGate(pool=concurrent_rpc_limit(settings), per_connection=settings.max_rpcs_per_connection,
                        receive_timeout_s=settings.request_receive_timeout_s, authenticator=authenticator,
                        on_reject=_report_rejection(gateway))
    server = grpc.aio.server(options=server_options(settings), interceptors=[intake, gate])
    admission = Admission.from_settings(settings, gateway.metrics.registry)
    SegmentationServicer(gateway, authenticator, admission).add_to_server(server)
    VolumesServicer(gateway, authenticator, admission).add_to_server(server)
    checker = Health((SERVICE_NAME, VOLUMES_SERVICE_NAME))
    await checker.set_serving(False)
    health_pb2_grpc.add_HealthServicer_to_server(checker.servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, VOLUMES_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise StartupError(f"cannot bind gRPC to {address}")
    await server.start()
    return server, port, checker, intake


# How long the connections stay open after the last call ended, for its answer to leave.
ANSWER_SETTLE_S = 1.0


async def stop_gracefully(server: grpc.aio.Server, checker: Health, intake: IntakeGate, grace_s: float) -> None:
    """Health NOT_SERVING, new calls UNAVAILABLE, open calls finish (at most ``grace_s``) and
    their answers leave; then the server stops, cancelling what is still open."""
    start = asyncio.get_running_loop().time()
    await checker.servicer.enter_graceful_shutdown()
    intake.drain()
    if not await intake.quiet(grace_s, ANSWER_SETTLE_S):
        log.warning("%d call(s) still open after the %.0f s grace: cancelled", intake.unfinished, grace_s)
    await server.stop(max(0.0, grace_s - (asyncio.get_running_loop().time() - start)))


def _security(settings: Settings) -> tuple[Authenticator, grpc.ServerCredentials | None]:
    """Authentication and TLS from the settings; StartupError on anything missing or unsafe."""
    check_exposure(settings)
    credentials = ReloadingCredentials(settings).credentials if tls_enabled(settings) else None
    return Authenticator.from_settings(settings), credentials


async def serve(settings: Settings) -> int:
    audit.configure(settings.audit_log)
    work.return_large_blocks()  # freed image buffers go back to the system (service/inference/work.py)
    metrics = Metrics(settings.backend)
    health_server, health_port = None, None
    try:
        authenticator, credentials = _security(settings)
        gateway = Gateway(settings, DeadlineBoundBackend(create_backend(settings)), metrics)
        server, port, checker, intake = await create_server(settings, gateway, authenticator, credentials)
        if settings.health_port >= 0:
            health_server, health_port = await create_health_server(
                settings, checker, health_port_options(settings),
                [IntakeGate(pool=None, per_connection=None, authenticator=None,
                            receive_timeout_s=min(HEALTH_RECEIVE_TIMEOUT_S, settings.request_receive_timeout_s))])
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
        await stop_gracefully(server, checker, intake, settings.grace_s)
        if health_server is not None:
            await health_server.stop(0)
        await gateway.close()
        http.shutdown()
        log.info("stopped")
    return rc
