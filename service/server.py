"""gRPC server: servicer, error mapping, health, reflection, metrics, graceful stop."""

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
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from medseg.v1 import segmentation_pb2 as pb
from medseg.v1 import segmentation_pb2_grpc as pb_grpc
from service import api, errors
from service.backends import create_backend
from service.gateway import Gateway, StartupError
from service.metrics import Metrics
from service.settings import Settings
from service.status import client_message, status_for

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Segmentation"].full_name
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex


def rpc(method: str):
    """The one place where exceptions become gRPC statuses, with metrics and a request id.

    Domain errors keep their message; anything unexpected is INTERNAL with a generic
    message and the request id, and its traceback is logged under that id.
    """

    def decorate(fn):
        @functools.wraps(fn)
        async def wrapper(self: "SegmentationServicer", request, context: grpc.aio.ServicerContext):
            metrics = self.gateway.metrics
            request_id = _request_id(context)
            context.set_trailing_metadata((("x-request-id", request_id),))
            code = grpc.StatusCode.OK
            start = time.perf_counter()
            metrics.inflight.labels(metrics.backend).inc()
            try:
                return await fn(self, request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
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
                metrics.inflight.labels(metrics.backend).dec()
                metrics.requests.labels(method, code.name, metrics.backend).inc()
                metrics.request_latency.labels(method, metrics.backend).observe(time.perf_counter() - start)

        return wrapper

    return decorate


class SegmentationServicer(pb_grpc.SegmentationServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @rpc("Segment")
    async def Segment(self, request: pb.SegmentRequest, context) -> pb.SegmentResponse:
        req = api.segment_request_from_proto(request, self.gateway.settings.default_model)
        result = await self.gateway.segment(req)
        return await asyncio.to_thread(api.segment_response_to_proto, result, req.encoding)

    @rpc("EmbedImage")
    async def EmbedImage(self, request: pb.EmbedImageRequest, context) -> pb.EmbedImageResponse:
        if not request.HasField("image"):
            raise errors.InvalidImage("EmbedImage needs an image")
        image = api.image_from_proto(request.image)
        result = await self.gateway.embed(request.model or self.gateway.settings.default_model, image)
        return api.embed_response_to_proto(result)

    @rpc("ListModels")
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[api.model_info_to_proto(m) for m in self.gateway.list_models()])


class Health:
    """grpc.health.v1 for the whole server ("") and for the Segmentation service."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.servicer.set(name, status)


async def create_server(settings: Settings, gateway: Gateway) -> tuple[grpc.aio.Server, int, Health]:
    """Bind the gRPC server (port 0 picks a free port) with health (NOT_SERVING) and reflection."""
    options = [("grpc.max_receive_message_length", settings.max_request_bytes),
               ("grpc.max_send_message_length", settings.max_request_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    pb_grpc.add_SegmentationServicer_to_server(SegmentationServicer(gateway), server)
    checker = Health()
    await checker.set_serving(False)
    health_pb2_grpc.add_HealthServicer_to_server(checker.servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise StartupError(f"cannot bind gRPC to {settings.host}:{settings.port}")
    await server.start()
    return server, port, checker


async def serve(settings: Settings) -> int:
    metrics = Metrics(settings.backend)
    try:
        gateway = Gateway(settings, create_backend(settings), metrics)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 2
    server, port, checker = await create_server(settings, gateway)
    gateway.on_ready_change(checker.set_serving)
    http, _ = metrics.serve_http(settings.metrics_host, settings.metrics_port)
    metrics_port = http.server_port
    log.info("gRPC on %s:%d (health NOT_SERVING until warm), metrics on http://%s:%d/metrics, backend %s",
             settings.host, port, settings.metrics_host, metrics_port, settings.backend)
    if settings.port_file:
        port_file = Path(settings.port_file)
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"grpc": port, "metrics": metrics_port, "pid": os.getpid()}))
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
        await gateway.close()
        http.shutdown()
        log.info("stopped")
    return rc
