"""The PromQL the kit ships outside rules.yaml (dashboard, prometheus-adapter), in a form
promtool and a live Prometheus can evaluate, and the metric names it may use."""

from __future__ import annotations

import json
import re

import yaml

from service.observability.metrics import Metrics
from tests.deploy.conftest import DEPLOY

RULES = DEPLOY / "prometheus" / "rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "rules.test.yaml"
DASHBOARD = DEPLOY / "k8s" / "components" / "monitoring" / "dashboards" / "medseg-overview.json"
ADAPTER = DEPLOY / "prometheus-adapter" / "values.yaml"
# Triton's metric names used here (Triton metrics docs; checked live by the Triton half of
# tests/deploy/test_prometheus_scrape.py once the harness starts a tritonserver).
TRITON_METRICS = {"nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                  "nv_inference_exec_count", "nv_inference_queue_duration_us",
                  "nv_inference_compute_infer_duration_us", "nv_inference_pending_request_count",
                  "nv_gpu_utilization"}


def gateway_metric_names() -> set[str]:
    """Every sample name the gateway's registry can expose (counter _total, histogram _bucket...)."""
    names = set()
    for family in Metrics("embedded").registry.collect():
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                    "gauge": ("",)}[family.type]
        names.update(family.name + s for s in suffixes)
    return names


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def adapter_queries() -> list[str]:
    """metricsQuery templates of prometheus-adapter, filled the way the adapter fills them."""
    rules = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    out = []
    for rule in rules:
        series = re.match(r"^(\w+)", rule["seriesQuery"]).group(1)
        out.append(rule["metricsQuery"].replace("<<.Series>>", series)
                   .replace("<<.LabelMatchers>>", 'namespace="medseg",pod=~"p-1|p-2"')
                   .replace("<<.GroupBy>>", "pod"))
    return out


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace('=~"$namespace"', '=~".*"')
