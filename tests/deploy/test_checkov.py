"""checkov on what is applied (the rendered overlays) and on the Dockerfiles: no failed
check, and every skip carries its reason in the manifest."""

from __future__ import annotations

import json
import re

from tests.deploy.conftest import DEPLOY, OVERLAYS, output, run, venv_tool

SKIP = re.compile(r"^(CKV2?_[A-Z0-9_]+)=(.{20,})$")


def _checkov(*args: str) -> list[dict]:
    proc = run([venv_tool("checkov"), "--skip-download", "--quiet", "--output", "json", *args], timeout=300)
    assert proc.returncode in (0, 1), output(proc)
    reports = json.loads(proc.stdout)
    return reports if isinstance(reports, list) else [reports]


def _failures(reports: list[dict]) -> list[str]:
    return [f"{c['check_id']} {c['resource']} ({c.get('file_path')}): {c['check_name']}"
            for r in reports for c in r.get("results", {}).get("failed_checks", [])]


def test_rendered_manifests_pass_checkov_kubernetes(rendered_files):
    folder = next(iter(rendered_files.values())).parent
    reports = _checkov("--framework", "kubernetes", "-d", str(folder))
    assert not _failures(reports), "\n".join(_failures(reports))
    passed = sum(r["summary"]["passed"] for r in reports)
    assert passed > 100, f"checkov passed only {passed} checks: did it scan the manifests?"
    for r in reports:
        for skipped in r["results"].get("skipped_checks", []):
            assert len(skipped.get("suppress_comment") or "") >= 20, f"skip without a reason: {skipped['check_id']}"


def test_every_checkov_skip_annotation_states_its_reason(rendered):
    for overlay in OVERLAYS:
        for doc in rendered[overlay].docs:
            for key, value in (doc["metadata"].get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    assert SKIP.match(value), f"{doc['kind']}/{doc['metadata']['name']}: {key}={value!r}"


def test_dockerfiles_pass_checkov_dockerfile():
    files = sorted(DEPLOY.glob("docker/*.Dockerfile"))
    assert len(files) == 3
    args = [a for f in files for a in ("-f", str(f))]
    reports = _checkov("--framework", "dockerfile", *args)
    assert not _failures(reports), "\n".join(_failures(reports))
    assert sum(r["summary"]["passed"] for r in reports) > 30
