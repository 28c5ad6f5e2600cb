"""Shared pieces of the deployment checks: tool lookup, rendered overlays, YAML helpers.

The tools live outside the project venv (see scripts/bootstrap_deploy.sh): checkov,
kubernetes-validate, hadolint and kubectl in .venv-deploy/bin, promtool and prometheus on
PATH (Debian's `prometheus` package). A missing tool FAILS its test with the command that
installs it: these checks must never pass by not running.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
DEPLOY_VENV = REPO / os.environ.get("DEPLOY_VENV", ".venv-deploy")
SETUP = "run scripts/bootstrap_deploy.sh (CI runs it before the tests; needs root for apt-get)"

# The Kubernetes versions the manifests are validated against: the oldest and the newest
# supported (docs/DEPLOYMENT.md). Native gRPC probes are GA since 1.27.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def venv_tool(name: str) -> str:
    path = DEPLOY_VENV / "bin" / name
    if not path.exists():
        pytest.fail(f"{name} not found at {path}: {SETUP}", pytrace=False)
    return str(path)


def system_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH (Debian package 'prometheus'): {SETUP}", pytrace=False)
    return path


def run(cmd: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, **kwargs)


def output(proc: subprocess.CompletedProcess) -> str:
    return f"$ {' '.join(map(str, proc.args))}\n(exit {proc.returncode})\n{proc.stdout}\n{proc.stderr}"


def load_all(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def dump_all(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


class Rendered:
    """The objects of one overlay as `kubectl kustomize` renders them (what gets applied)."""

    def __init__(self, overlay: str, text: str) -> None:
        self.overlay, self.text, self.docs = overlay, text, load_all(text)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for doc in self.of_kind(kind):
            if doc["metadata"]["name"] == name:
                return doc
        raise KeyError(f"{kind}/{name} not in overlay {self.overlay}")

    def core(self) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] not in CRD_KINDS]

    def pod_specs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for doc in self.of_kind("Deployment"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    for c in pod_spec["containers"] + pod_spec.get("initContainers", []):
        if c["name"] == name:
            return c
    raise KeyError(name)


@pytest.fixture(scope="session")
def kubectl() -> str:
    return venv_tool("kubectl")


@pytest.fixture(scope="session")
def rendered(kubectl) -> dict[str, Rendered]:
    out = {}
    for overlay in OVERLAYS:
        proc = run([kubectl, "kustomize", str(K8S / "overlays" / overlay)])
        assert proc.returncode == 0, output(proc)
        out[overlay] = Rendered(overlay, proc.stdout)
    return out


@pytest.fixture(scope="session")
def rendered_files(rendered, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("rendered")
    files = {}
    for overlay, r in rendered.items():
        files[overlay] = folder / f"{overlay}.yaml"
        files[overlay].write_text(r.text)
    return files
