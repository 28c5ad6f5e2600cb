"""Real processes for integration tests (the gateway, tritonserver) on ephemeral loopback
ports: the harness is :mod:`bench.harness`, shared with the benchmarks (tests may import
bench; bench never imports tests), re-exported here under its old name."""

from __future__ import annotations

from bench.harness import (MODEL_REPOSITORY, REPO, GatewayProcess, MetricMissing, TritonProcess, ensure_models,
                           free_port, free_ports, metric_value, proc_status, reset_peak, wait_for)

__all__ = ["MODEL_REPOSITORY", "REPO", "GatewayProcess", "MetricMissing", "TritonProcess", "ensure_models",
           "free_port", "free_ports", "metric_value", "proc_status", "reset_peak", "wait_for"]
