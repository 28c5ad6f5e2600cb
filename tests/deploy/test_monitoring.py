"""Monitoring objects: the prometheus-operator custom resources, the alert rules (one
source, promtool-checked and unit-tested), the dashboard and the autoscaling queries."""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, OVERLAYS, REPO, container, dump_all, output, run, system_tool, venv_tool
from tests.deploy.queries import (ADAPTER, DASHBOARD, RULE_TESTS, RULES, TRITON_METRICS, adapter_queries,
                                  dashboard_queries, gateway_metric_names, grafana_to_promql)


# --- prometheus-operator custom resources ------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitoring_resources_validate_against_the_prometheus_operator_api(rendered_files, overlay):
    proc = run([venv_tool("python"), str(DEPLOY / "tools" / "validate_crds.py"), str(rendered_files[overlay])])
    assert proc.returncode == 0, output(proc)
    assert "3 objects checked, 0 problems" in proc.stdout


def test_crd_validation_rejects_unknown_fields_and_bad_durations(rendered, tmp_path):
    docs = copy.deepcopy(rendered["gpu"].docs)
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    pod_monitor = next(d for d in docs if d["kind"] == "PodMonitor")
    pod_monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    path = tmp_path / "bad.yaml"
    path.write_text(dump_all(docs))
    proc = run([venv_tool("python"), str(DEPLOY / "tools" / "validate_crds.py"), str(path)])
    assert proc.returncode == 1, output(proc)
    assert "intervall" in proc.stdout and "podMetricsEndpoints.0.interval" in proc.stdout, output(proc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitors_select_the_gateway_service_and_the_triton_pods_by_named_ports(rendered, overlay):
    r = rendered[overlay]
    monitor = r.get("ServiceMonitor", "medseg-gateway")
    service = r.get("Service", "medseg-gateway")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    pod_monitor = r.get("PodMonitor", "medseg-triton")
    template = r.get("Deployment", "medseg-triton")["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in container(template["spec"], "triton")["ports"]}
    assert {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]} <= ports
    # the job labels the alert rules use: Service name, and the pod label named by jobLabel
    rules_text = RULES.read_text()
    assert f'job="{service["metadata"]["name"]}"' in rules_text
    assert f'job="{labels[pod_monitor["spec"]["jobLabel"]]}"' in rules_text


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_ships_as_a_grafana_sidecar_configmap(rendered, overlay):
    cm = rendered[overlay].get("ConfigMap", "medseg-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["medseg-overview.json"]) == json.loads(DASHBOARD.read_text())


# --- alert rules ---------------------------------------------------------------------------

def test_prometheusrule_embeds_exactly_the_groups_of_rules_yaml(rendered):
    proc = run([venv_tool("python"), str(DEPLOY / "tools" / "render_prometheusrule.py"), "--check"])
    assert proc.returncode == 0, output(proc)
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for overlay in OVERLAYS:
        assert rendered[overlay].get("PrometheusRule", "medseg")["spec"]["groups"] == groups


def test_rules_pass_promtool_check():
    proc = run([system_tool("promtool"), "check", "rules", str(RULES)])
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, output(proc)


def test_rules_pass_their_promtool_unit_tests():
    proc = run([system_tool("promtool"), "test", "rules", str(RULE_TESTS)])
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, output(proc)


def test_every_alert_is_tested_firing_and_silent():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    fired, silent = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    assert alerts - fired == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested silent"
    assert {"MedsegGatewayErrorRatioHigh", "MedsegGatewayLatencyP99High", "MedsegBackendUnavailable",
            "MedsegEmbeddingCacheHitRatioCollapse", "MedsegTritonQueueTimeHigh"} <= alerts


def test_every_alert_has_a_severity_and_a_runbook_documented_in_the_deployment_guide():
    guide = (REPO / "docs" / "DEPLOYMENT.md").read_text()
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in {"critical", "warning"}
                assert len(rule["annotations"]["runbook"]) > 80 and rule["annotations"]["summary"]
                assert f"### {rule['alert']}" in guide, f"no runbook section for {rule['alert']}"


# --- dashboard and autoscaling queries -----------------------------------------------------

def test_dashboard_and_autoscaling_queries_are_valid_promql(tmp_path):
    queries = [grafana_to_promql(q) for q in dashboard_queries()] + adapter_queries()
    assert len(queries) > 15
    rules = {"groups": [{"name": "syntax", "rules": [{"record": f"medseg:check_{i}", "expr": q}
                                                       for i, q in enumerate(queries)]}]}
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    proc = run([system_tool("promtool"), "check", "rules", str(path)])
    assert proc.returncode == 0, output(proc)


def test_queries_name_only_metrics_the_gateway_and_triton_export(rendered):
    hpa_metrics = {m["pods"]["metric"]["name"] for o in OVERLAYS for h in rendered[o].of_kind("HorizontalPodAutoscaler")
                   for m in h["spec"]["metrics"] if m["type"] == "Pods"}
    adapter = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    assert hpa_metrics == {rule["name"]["as"] for rule in adapter}, "every HPA metric comes from the adapter"
    rule_exprs = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    text = "\n".join([*rule_exprs, *dashboard_queries(), *adapter_queries()])
    used = set(re.findall(r"\b((?:medseg|nv)_[a-z0-9_]+)\b", text))
    assert {"medseg_requests_total", "medseg_request_duration_seconds_bucket", "nv_inference_queue_duration_us"} <= used
    known = gateway_metric_names() | TRITON_METRICS
    assert used <= known, f"unknown metric names: {sorted(used - known)}"
