"""Real processes for integration tests (the gateway, tritonserver, an Orthanc PACS) on
ephemeral loopback ports: the harness is :mod:`bench.harness` (and :mod:`bench.orthanc`),
shared with the benchmarks (tests may import bench; bench never imports tests), re-exported
here under its old name."""

from __future__ import annotations

import grpc

from bench.harness import (MODEL_REPOSITORY, REPO, GatewayProcess, MetricMissing, TritonProcess, ensure_models,
                           fp32_repository, free_port, free_ports, metric_value, proc_status, reset_peak, wait_for)
from bench.orthanc import OrthancProcess

__all__ = ["MODEL_REPOSITORY", "REPO", "GatewayProcess", "MetricMissing", "OrthancProcess", "TritonProcess",
           "code_of", "ensure_models", "sampled_dev_cases", "fp32_repository", "free_port", "free_ports", "metric_value", "proc_status", "reset_peak",
           "status_of", "wait_for"]


def sampled_dev_cases(cases: list, step: int = 4) -> list:
    """Every ``step``-th dev case, plus the first of any structure that leaves out (14 of the 40
    with step 4, all 11 structures): the cases the served-vs-PyTorch and Triton-vs-embedded tests
    share, so the session gateway's embedding cache answers the second for free (`make models`
    guards the variants on all 40)."""
    sample = list(cases[::step])
    left_out = sorted({c.structure for c in cases} - {c.structure for c in sample})
    return sample + [next(c for c in cases if c.structure == s) for s in left_out]


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
