"""The rendered Kubernetes manifests: strict schema validation and the properties a
platform team reviews (security context, probes, resources, GPUs, network isolation)."""

from __future__ import annotations

import copy
import ipaddress
import os
from urllib.parse import urlsplit

import pytest

from service.settings import Settings
from tests.deploy.conftest import (CRD_KINDS, K8S, KUBERNETES_VERSIONS, OVERLAYS, Rendered, container, dump_all,
                                   output, run, venv_tool)

CORE_KINDS = {"Namespace", "ServiceAccount", "ConfigMap", "Service", "Deployment", "HorizontalPodAutoscaler",
              "PodDisruptionBudget", "NetworkPolicy"}


def _validate(files: list, version: str):
    return run([venv_tool("kubernetes-validate"), "--strict", "--quiet", "--no-warn", "-k", version,
                *map(str, files)])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_strictly(rendered, tmp_path, overlay, version):
    path = tmp_path / f"{overlay}-core.yaml"
    path.write_text(dump_all(rendered[overlay].core()))
    proc = _validate([path], version)
    assert proc.returncode == 0, output(proc)


def test_strict_validation_rejects_a_misspelt_field(rendered, tmp_path):
    """Guards the check itself: an unknown field must fail, not be ignored."""
    docs = copy.deepcopy(rendered["gpu"].core())
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    path = tmp_path / "bad.yaml"
    path.write_text(dump_all(docs))
    proc = _validate([path], KUBERNETES_VERSIONS[0])
    assert proc.returncode != 0 and "periodSecond" in proc.stdout + proc.stderr, output(proc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_kind_is_covered_by_a_validator(rendered, overlay):
    kinds = {d["kind"] for d in rendered[overlay].docs}
    assert kinds <= CORE_KINDS | CRD_KINDS, f"no validator for {kinds - CORE_KINDS - CRD_KINDS}"
    assert CORE_KINDS <= kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_lives_in_the_medseg_namespace(rendered, overlay):
    for doc in rendered[overlay].docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "medseg", doc["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_non_root_read_only_capability_free_and_tokenless(rendered, overlay):
    r = rendered[overlay]
    for sa in r.of_kind("ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    for name, pod in r.pod_specs():
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["serviceAccountName"] in {sa["metadata"]["name"] for sa in r.of_kind("ServiceAccount")}
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] >= 10000, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], c["name"]
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), (c["name"], bound)
            assert ":" in c["image"] and "/" in c["image"], f"{c['image']} has no registry or tag"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_settings_parse_and_point_at_the_triton_service(rendered, overlay):
    """The container args and the ConfigMap are read by the real Settings parser."""
    r = rendered[overlay]
    pod = r.get("Deployment", "medseg-gateway")["spec"]["template"]["spec"]
    gw = container(pod, "gateway")
    config = next(c for c in r.of_kind("ConfigMap") if c["metadata"]["name"].startswith("medseg-gateway-config"))
    assert gw["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    known = {"MEDSEG_" + f.upper() for f in Settings.__dataclass_fields__}
    assert set(config["data"]) <= known, f"unknown settings {set(config['data']) - known}"
    settings = Settings.from_args(gw["args"], environ=config["data"])
    assert settings.backend == "triton" and settings.host == "0.0.0.0" and settings.metrics_host == "0.0.0.0"
    assert str(settings.model_repository) == "/models"
    triton_host, _, triton_port = settings.triton_url.rpartition(":")
    triton_svc = r.get("Service", "medseg-triton")
    assert triton_host == triton_svc["metadata"]["name"]
    assert int(triton_port) in {p["port"] for p in triton_svc["spec"]["ports"]}
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert ports == {"grpc": settings.port, "metrics": settings.metrics_port, "health": settings.health_port}
    env = {e["name"]: e["value"] for e in gw["env"]}
    tls = Settings.from_args(gw["args"], environ={**config["data"], **env})
    assert tls.tls_cert_file and tls.tls_key_file and tls.tls_client_ca_file and tls.auth_tokens_file
    assert not tls.insecure
    mounts = {m["mountPath"] for m in gw["volumeMounts"]}
    assert "/models" in mounts and "/tmp" in mounts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_probes_are_native_grpc_health_checks_that_wait_for_warm_up(rendered, overlay):
    pod = rendered[overlay].get("Deployment", "medseg-gateway")["spec"]["template"]["spec"]
    gw = container(pod, "gateway")
    # kubelet gRPC probes speak neither TLS nor tokens: they use the plaintext health-only port
    port = Settings.from_args(gw["args"], environ={}).health_port
    service_targets = {p["targetPort"] for p in rendered[overlay].get("Service", "medseg-gateway")["spec"]["ports"]}
    assert port > 0 and not service_targets & {port, "health"}, "the health-only port must not be in the Service"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gw[probe]["grpc"]["port"] == port, probe
    assert gw["readinessProbe"]["grpc"]["service"] == "medseg.v1.Segmentation"
    startup = gw["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "warm-up budget under 5 minutes"
    live = gw["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 120, "liveness would restart on a short Triton outage"
    # the drain fits in the termination grace period
    grace = Settings.from_args([], environ=_config(rendered[overlay])).grace_s
    assert pod["terminationGracePeriodSeconds"] > grace + 5


def _config(r):
    return next(c for c in r.of_kind("ConfigMap") if c["metadata"]["name"].startswith("medseg-gateway-config"))["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_probes_wait_for_model_readiness(rendered, overlay):
    triton = container(rendered[overlay].get("Deployment", "medseg-triton")["spec"]["template"]["spec"], "triton")
    assert "--strict-readiness=true" in triton["args"]
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["grpc"]["port"] == 8001


def test_gpu_overlay_puts_one_gpu_per_triton_pod_on_gpu_nodes(rendered):
    pod = rendered["gpu"].get("Deployment", "medseg-triton")["spec"]["template"]["spec"]
    triton = container(pod, "triton")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "--allow-gpu-metrics=true" in triton["args"]
    cpu_pod = rendered["cpu"].get("Deployment", "medseg-triton")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(cpu_pod)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_and_triton_load_the_same_model_image_for_the_overlay_target(rendered, overlay):
    r = rendered[overlay]
    images = {name: container(pod, "model-repository")["image"] for name, pod in r.pod_specs()}
    assert len(set(images.values())) == 1, images
    assert next(iter(images.values())).endswith(f"-{overlay}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tls_and_token_secrets_are_mounted_optional_and_read_only(rendered, overlay):
    pod = rendered[overlay].get("Deployment", "medseg-gateway")["spec"]["template"]["spec"]
    gw = container(pod, "gateway")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in gw["volumeMounts"]}
    for name, path in (("tls", "/etc/medseg/tls"), ("auth", "/etc/medseg/auth")):
        assert volumes[name]["secret"]["optional"] is True
        assert mounts[name]["mountPath"] == path and mounts[name]["readOnly"] is True
    env = {e["name"]: e["value"] for e in gw["env"]}
    assert env["MEDSEG_TLS_CERT_FILE"] == "/etc/medseg/tls/tls.crt"
    assert env["MEDSEG_TLS_KEY_FILE"] == "/etc/medseg/tls/tls.key"
    assert env["MEDSEG_TLS_CLIENT_CA_FILE"] == "/etc/medseg/tls/ca.crt"
    assert env["MEDSEG_AUTH_TOKENS_FILE"].startswith("/etc/medseg/auth/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_admit_clients_to_the_gateway_only_and_triton_from_the_gateway_only(rendered, overlay):
    r = rendered[overlay]
    policies = {p["metadata"]["name"]: p["spec"] for p in r.of_kind("NetworkPolicy")}
    deny = policies["medseg-default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    gateway_labels = {"app.kubernetes.io/name": "medseg-gateway"}
    triton = policies["medseg-triton"]
    for rule in triton["ingress"]:
        ports = [p["port"] for p in rule["ports"]]
        peers = rule["from"]
        if ports == [8001]:
            assert peers == [{"podSelector": {"matchLabels": gateway_labels}}]
        else:
            assert ports == [8002] and all("namespaceSelector" in p for p in peers)
    assert triton["egress"] == []
    gateway = policies["medseg-gateway"]
    open_rules = [rule for rule in gateway["ingress"] if "from" not in rule]
    assert [p["port"] for rule in open_rules for p in rule["ports"]] == [50051]
    assert {r["metadata"]["name"] for r in r.of_kind("Service")} == {"medseg-gateway", "medseg-triton"}
    assert all(s["spec"]["type"] == "ClusterIP" for s in r.of_kind("Service"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_an_hpa_and_a_pdb_that_select_it(rendered, overlay):
    r = rendered[overlay]
    for doc in r.of_kind("Deployment"):
        name, labels = doc["metadata"]["name"], doc["spec"]["template"]["metadata"]["labels"]
        hpa = r.get("HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
        pdb = r.get("PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        # a PDB that can never be satisfied would block node drains
        if "minAvailable" in pdb["spec"]:
            assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


# --- PACS (DICOMweb) ------------------------------------------------------------------------

PACS_MOUNT = "/etc/medseg/pacs"
GATEWAY_LABELS = {"app.kubernetes.io/name": "medseg-gateway"}


def _gateway_settings(r: Rendered) -> Settings:
    """The gateway's Settings as its pod gets them: args, then ConfigMap, then env (env wins)."""
    gw = container(r.get("Deployment", "medseg-gateway")["spec"]["template"]["spec"], "gateway")
    env = {e["name"]: e["value"] for e in gw.get("env", [])}
    return Settings.from_args(gw["args"], environ={**_config(r), **env})


def _render_site(kubectl, folder, body: str, overlay: str = "gpu") -> Rendered:
    """A site's own overlay on one of ours (what docs/DEPLOYMENT.md tells sites to keep):
    `body` is the rest of its kustomization.yaml, with {kit} for the path to deploy/k8s."""
    folder.mkdir()
    kit = os.path.relpath(K8S, folder)
    (folder / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {kit}/overlays/{overlay}\n" + body.replace("{kit}", kit))
    proc = run([kubectl, "kustomize", str(folder)])
    assert proc.returncode == 0, output(proc)
    return Rendered(f"{overlay}+{folder.name}", proc.stdout)


@pytest.fixture(scope="module")
def pacs_token(kubectl, tmp_path_factory) -> Rendered:
    return _render_site(kubectl, tmp_path_factory.mktemp("site") / "pacs-token",
                        "components:\n  - {kit}/components/pacs-token\n")


# docs/DEPLOYMENT.md, PACS (DICOMweb): a site's settings and its PACS's address and port
PACS_SITE = """\
configMapGenerator:
  - name: medseg-gateway-config
    behavior: merge
    literals:
      - MEDSEG_PACS_URL=https://pacs.hospital.example:8443/dicom-web
      - MEDSEG_PACS_USERNAME=medseg-ai
patches:
  - target:
      kind: NetworkPolicy
      name: medseg-gateway-pacs
    patch: |-
      - op: replace
        path: /spec/egress
        value:
          - to:
              - ipBlock:
                  cidr: 10.20.30.40/32
            ports:
              - port: 8443
                protocol: TCP
"""


@pytest.fixture(scope="module")
def pacs_site(kubectl, tmp_path_factory) -> Rendered:
    return _render_site(kubectl, tmp_path_factory.mktemp("site") / "pacs-site", PACS_SITE)


def _medseg_names(r: Rendered) -> set[str]:
    names = set()
    for _, pod in r.pod_specs():
        for c in pod["containers"] + pod.get("initContainers", []):
            names.update(e["name"] for e in c.get("env", []))
    for cm in r.of_kind("ConfigMap"):
        if cm["metadata"]["name"].startswith("medseg-gateway-config"):
            names.update(cm["data"])
    return {n for n in names if n.startswith("MEDSEG_")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_medseg_variable_in_the_manifests_is_a_gateway_setting(rendered, pacs_token, overlay):
    """A misspelt MEDSEG_* name would be ignored silently by the gateway; catch it here."""
    known = {"MEDSEG_" + f.upper() for f in Settings.__dataclass_fields__}
    for r in (rendered[overlay], pacs_token):
        names = _medseg_names(r)
        assert {"MEDSEG_PACS_URL", "MEDSEG_PACS_CA_FILE", "MEDSEG_PACS_TIMEOUT_S"} <= names, r.overlay
        assert names <= known, f"{r.overlay}: unknown settings {sorted(names - known)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pacs_is_off_until_configured_and_its_secret_is_mounted_optional_and_read_only(rendered, overlay):
    r = rendered[overlay]
    settings = _gateway_settings(r)
    # empty: no PACS (SegmentStudy answers FAILED_PRECONDITION); a site sets its DICOMweb root
    assert settings.pacs_url == "" or settings.pacs_url.startswith(("https://", "http://"))
    assert 0 < settings.pacs_timeout_s <= 120 and settings.seg_series_description
    # HTTP basic: the account in the ConfigMap, the password (and the CA) as files of the Secret
    assert settings.pacs_username and not settings.pacs_token_file
    assert settings.pacs_password_file == f"{PACS_MOUNT}/password"
    assert settings.pacs_ca_file == f"{PACS_MOUNT}/ca.crt"
    pod = r.get("Deployment", "medseg-gateway")["spec"]["template"]["spec"]
    gw = container(pod, "gateway")
    volume = next(v for v in pod["volumes"] if v["name"] == "pacs")
    assert volume["secret"] == {"secretName": "medseg-gateway-pacs", "optional": True, "defaultMode": 0o440}
    mounts = [m for m in gw["volumeMounts"] if m["name"] == "pacs"]
    # the whole volume, never a subPath: the kubelet never updates subPath mounts (no rotation)
    assert mounts == [{"name": "pacs", "mountPath": PACS_MOUNT, "readOnly": True}]
    # credentials as files only, and no Secret (no secret value) in the kit
    assert all("valueFrom" not in e for e in gw["env"])
    assert not r.of_kind("Secret")


def test_pacs_token_component_swaps_basic_authentication_for_a_token_file(pacs_token):
    """The gateway takes basic credentials or a token, never both: the component must leave
    exactly the token (same Secret, same mount) and keep the CA bundle."""
    settings = _gateway_settings(pacs_token)
    assert settings.pacs_token_file == f"{PACS_MOUNT}/token"
    assert settings.pacs_username == "" and settings.pacs_password_file == ""
    assert settings.pacs_ca_file == f"{PACS_MOUNT}/ca.crt"
    pod = pacs_token.get("Deployment", "medseg-gateway")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "pacs")["secret"]["secretName"] == "medseg-gateway-pacs"
    assert {e["name"] for e in container(pod, "gateway")["env"]} >= {"MEDSEG_TLS_CERT_FILE", "MEDSEG_AUTH_TOKENS_FILE"}


def _narrow_peer(peer: dict) -> bool:
    if "ipBlock" in peer:
        net = ipaddress.ip_network(peer["ipBlock"]["cidr"])
        return net.prefixlen >= (16 if net.version == 4 else 48)
    # an in-cluster PACS: its namespace AND its pods, both by label
    return bool(peer.get("namespaceSelector", {}).get("matchLabels")) and bool(
        peer.get("podSelector", {}).get("matchLabels"))


@pytest.mark.parametrize("overlay", [*OVERLAYS, "site"])
def test_gateway_egress_is_triton_dns_and_one_narrow_rule_to_the_pacs(rendered, pacs_site, overlay):
    """On the kit (placeholder address, PACS off) and on a site overlay that sets both."""
    r = pacs_site if overlay == "site" else rendered[overlay]
    policies = {p["metadata"]["name"]: p["spec"] for p in r.of_kind("NetworkPolicy")}
    pacs = policies["medseg-gateway-pacs"]
    assert pacs["podSelector"] == {"matchLabels": GATEWAY_LABELS}
    assert pacs["policyTypes"] == ["Egress"] and "ingress" not in pacs
    [rule] = pacs["egress"]
    assert rule["to"] and all(_narrow_peer(p) for p in rule["to"]), rule
    assert len(rule["ports"]) == 1 and rule["ports"][0]["protocol"] == "TCP" and "endPort" not in rule["ports"][0]
    url = _gateway_settings(r).pacs_url
    assert bool(url) == (overlay == "site")
    if url:
        parts = urlsplit(url)
        assert rule["ports"][0]["port"] == (parts.port or {"https": 443, "http": 80}[parts.scheme]), url
    # every egress the gateway has, from all policies that select it: Triton, DNS, the PACS
    allowed = set()
    for spec in policies.values():
        if spec["podSelector"] in ({}, {"matchLabels": GATEWAY_LABELS}):
            for egress in spec.get("egress", []):
                assert egress.get("to"), "an egress rule without peers allows every destination"
                allowed.update((p["port"], p["protocol"]) for p in egress["ports"])
    assert allowed == {(8001, "TCP"), (53, "UDP"), (53, "TCP"), (rule["ports"][0]["port"], "TCP")}
