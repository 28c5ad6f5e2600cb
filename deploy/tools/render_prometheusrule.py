"""Write the PrometheusRule of the monitoring component from deploy/prometheus/rules.yaml.

rules.yaml is the one source of the alert rules (promtool checks and unit-tests it); the
PrometheusRule embeds the same groups. Run after editing rules.yaml:

    python deploy/tools/render_prometheusrule.py          # rewrite the file
    python deploy/tools/render_prometheusrule.py --check  # exit 1 if it is stale (tests do this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1]
RULES = DEPLOY / "prometheus" / "rules.yaml"
TARGET = DEPLOY / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"
HEADER = (
    "# GENERATED from deploy/prometheus/rules.yaml by deploy/tools/render_prometheusrule.py;\n"
    "# do not edit: change rules.yaml and re-run the script (a test fails when this is stale).\n"
)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as literal blocks, so the generated file stays readable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def render(rules_path: Path = RULES) -> str:
    groups = yaml.safe_load(rules_path.read_text())["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "medseg",
            "labels": {"app.kubernetes.io/name": "medseg", "app.kubernetes.io/component": "monitoring"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(doc, Dumper=_BlockDumper, sort_keys=False, width=120, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the generated file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not TARGET.is_file() or TARGET.read_text() != text:
            sys.stderr.write(f"{TARGET} is stale: run python deploy/tools/render_prometheusrule.py\n")
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
