"""Container health check: grpc.health.v1 Check against the gateway in this container.

Exit 0 when the server reports SERVING (models loaded and warm), 1 otherwise. The port is
MEDSEG_HEALTH_PORT when set (the plaintext health-only port, needed when the gRPC port
serves TLS), else MEDSEG_PORT (default 50051); the service name is the first argument
(default "", the whole server). Used by the gateway image's HEALTHCHECK; Kubernetes uses
native gRPC probes.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    service = argv[1] if len(argv) > 1 else ""
    health_port = os.environ.get("MEDSEG_HEALTH_PORT", "").strip()
    port = health_port if health_port and int(health_port) > 0 else os.environ.get("MEDSEG_PORT", "50051")
    target = f"127.0.0.1:{port}"
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=3)
        except grpc.RpcError as exc:
            sys.stderr.write(f"health check of {target} failed: {exc.code().name}\n")
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        sys.stderr.write(f"{target} reports {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}\n")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
