"""Real processes for integration tests (the gateway, tritonserver, an Orthanc PACS) on
ephemeral loopback ports: the harness is :mod:`bench.harness` (and :mod:`bench.orthanc`),
shared with the benchmarks (tests may import bench; bench never imports tests), re-exported
here under its old name."""

from __future__ import annotations

import grpc

from bench.harness import (MODEL_REPOSITORY, REPO, GatewayProcess, MetricMissing, TritonProcess, ensure_models,
                           free_port, free_ports, metric_value, proc_status, reset_peak, wait_for)
from bench.orthanc import OrthancProcess

__all__ = ["MODEL_REPOSITORY", "REPO", "GatewayProcess", "MetricMissing", "OrthancProcess", "TritonProcess",
           "code_of", "ensure_models", "free_port", "free_ports", "metric_value", "proc_status", "reset_peak",
           "status_of", "wait_for"]


def status_of(fn) -> tuple[grpc.StatusCode, str]:
    """Run one gRPC call: (its status code, its details); (OK, "") when it succeeds."""
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def code_of(fn) -> grpc.StatusCode:
    """The status code of one gRPC call (OK when it succeeds)."""
    return status_of(fn)[0]
