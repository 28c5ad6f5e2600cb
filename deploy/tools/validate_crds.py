"""Validate prometheus-operator objects (ServiceMonitor, PodMonitor, PrometheusRule) offline.

kubernetes-validate knows only the core API. These custom resources are checked against the
prometheus-operator API types as published in `cloudcoil-models-prometheus-operator`
(pydantic models generated from the operator's CRDs, v0.80), strictly: a field the API does
not define is an error (the API server would prune it silently), as are wrong types and
values that break the CRD's patterns (durations like "15s"). PrometheusRule groups are
further checked by `promtool check rules` in tests/deploy.

Run with the deployment venv (scripts/bootstrap_deploy.sh):
    .venv-deploy/bin/python deploy/tools/validate_crds.py rendered.yaml [...]
Prints one line per problem and exits 1 if there is any; other kinds are ignored.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pydantic
import yaml
from cloudcoil.models.prometheus_operator import v1

API_VERSION = "monitoring.coreos.com/v1"
MODELS = {"ServiceMonitor": v1.ServiceMonitor, "PodMonitor": v1.PodMonitor, "PrometheusRule": v1.PrometheusRule}


def unknown_fields(given: Any, kept: Any, path: str = "") -> list[str]:
    """Paths present in ``given`` that the model dropped (fields the API does not define)."""
    found: list[str] = []
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in kept:
                found.append(where)
            else:
                found.extend(unknown_fields(value, kept[key], where))
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (a, b) in enumerate(zip(given, kept, strict=False)):
            found.extend(unknown_fields(a, b, f"{path}[{i}]"))
    return found


def check(doc: dict[str, Any]) -> list[str]:
    model = MODELS[doc["kind"]]
    try:
        obj = model.model_validate(doc)
    except pydantic.ValidationError as exc:
        return [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
    kept = obj.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [f"{p}: field not defined by the {doc['kind']} API" for p in unknown_fields(doc, kept)]


def main(argv: list[str]) -> int:
    problems = checked = 0
    for name in argv[1:]:
        for doc in yaml.safe_load_all(Path(name).read_text()):
            if not doc or doc.get("apiVersion") != API_VERSION:
                continue
            kind, obj_name = doc.get("kind"), doc.get("metadata", {}).get("name", "?")
            if kind not in MODELS:
                print(f"{name}: {kind}/{obj_name}: no model for this kind")
                problems += 1
                continue
            checked += 1
            for problem in check(doc):
                print(f"{name}: {kind}/{obj_name}: {problem}")
                problems += 1
    print(f"validate_crds: {checked} objects checked, {problems} problems")
    return 1 if problems or not checked else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
