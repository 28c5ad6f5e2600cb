"""The protoc output in the tree (client/medseg_client/_generated/, git-ignored, written by
`make protos`) is what scripts/gen_protos.sh makes from protos/ now: a .proto changed without
regenerating fails here (the Makefile regenerates when the .proto is newer).

Also: client/pyproject.toml's grpcio/protobuf floors are at least what that generated code
refuses to import without, and the project's pins (requirements/constraints.txt) are inside them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "client" / "medseg_client" / "_generated"
PROTOS = REPO / "protos"
GEN_SCRIPT = REPO / "scripts" / "gen_protos.sh"


def _generate(out: Path, proto_dir: Path = PROTOS) -> Path:
    """Run scripts/gen_protos.sh (with this interpreter's grpc_tools) into ``out``."""
    env = {**os.environ, "PY": sys.executable, "OUT": str(out), "PROTO_DIR": str(proto_dir)}
    done = subprocess.run(["bash", str(GEN_SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"gen_protos.sh failed:\n{done.stderr}"
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.suffix != ".pyc"}


def _stale(fresh: Path) -> list[str]:
    """What differs between ``fresh`` and the folder in the tree (empty: up to date)."""
    new, committed = _files(fresh), _files(GENERATED)
    problems = [f"{name}: missing from {GENERATED.relative_to(REPO)}" for name in sorted(new.keys() - committed.keys())]
    problems += [f"{name}: committed but no longer generated" for name in sorted(committed.keys() - new.keys())]
    problems += [f"{name}: content differs" for name in sorted(new.keys() & committed.keys())
                 if new[name] != committed[name]]
    return problems


def test_generated_code_in_the_tree_is_current(tmp_path: Path) -> None:
    problems = _stale(_generate(tmp_path / "gen"))
    assert not problems, (
        "client/medseg_client/_generated/ is stale; run `make protos`:\n  "
        + "\n  ".join(problems)
    )


def test_the_check_fails_when_a_proto_changes(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(PROTOS, protos)
    proto = protos / "medseg" / "v1" / "segmentation.proto"
    proto.write_text(proto.read_text(encoding="utf-8") + "\nmessage StalenessProbe { int32 x = 1; }\n",
                     encoding="utf-8")
    problems = _stale(_generate(tmp_path / "gen", protos))
    assert "segmentation_pb2.py: content differs" in problems
    assert "segmentation_pb2.pyi: content differs" in problems


def _floor(requirement: Requirement) -> Version:
    floors = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "~=", "==")]
    assert floors, f"{requirement} has no lower bound"
    return max(floors)


@pytest.fixture(scope="module")
def client_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "client" / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}


def test_pyproject_floors_cover_the_generated_code(client_requirements) -> None:
    grpc_text = (GENERATED / "segmentation_pb2_grpc.py").read_text(encoding="utf-8")
    grpc_needs = Version(re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_text).group(1))
    pb_text = (GENERATED / "segmentation_pb2.py").read_text(encoding="utf-8")
    major, minor, patch = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", pb_text
    ).groups()
    protobuf_needs = Version(f"{major}.{minor}.{patch}")
    assert _floor(client_requirements["grpcio"]) >= grpc_needs
    assert _floor(client_requirements["protobuf"]) >= protobuf_needs
    # protobuf gencode works on runtimes of the same major version only.
    assert Version(f"{int(major) + 1}") not in client_requirements["protobuf"].specifier


def test_project_pins_satisfy_the_client_requirements(client_requirements) -> None:
    pins = {}
    for line in (REPO / "requirements" / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    for name, requirement in client_requirements.items():
        assert name in pins, f"{name} is not pinned in requirements/constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"
