"""Container files: hadolint, the gateway's entrypoint, its build context and dependencies."""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, REPO, output, run, venv_tool

DOCKER = DEPLOY / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(dockerfile):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    proc = run([venv_tool("hadolint"), "--failure-threshold", "style", "--no-color", str(dockerfile)])
    assert proc.returncode == 0, output(proc)


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    """Guards the check itself."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM busybox\nRUN apt-get install curl\n")
    proc = run([venv_tool("hadolint"), "--failure-threshold", "style", "--no-color", str(bad)])
    assert proc.returncode != 0 and "DL3006" in proc.stdout, output(proc)


def _makefile_serve_command() -> list[str]:
    """The command of `make serve` (what the README's quick start runs), $(PY) as `python`."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("serve:")))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().rstrip("\\").strip())
    words = " ".join(recipe).split()
    assert words[0] == "$(PY)", f"make serve no longer starts with $(PY): {words}"
    return ["python", *words[1:3]]


def test_gateway_entrypoint_is_the_command_make_serve_and_the_readme_use():
    entry = [rest for keyword, rest in stages(DOCKER / "gateway.Dockerfile")[-1] if keyword == "ENTRYPOINT"]
    assert len(entry) == 1
    entrypoint = json.loads(entry[0])
    assert entrypoint == ["python", "-m", "service"]
    assert _makefile_serve_command() == entrypoint
    readme = REPO / "README.md"
    if readme.is_file():
        text = readme.read_text()
        assert "make serve" in text or "python -m service" in text, "README no longer shows how to serve"


def test_gateway_runtime_stage_runs_as_non_root_on_the_build_stage_base():
    build, runtime = stages(DOCKER / "gateway.Dockerfile")
    assert build[0][1].split()[0] == runtime[0][1].split()[0], "the venv must run on the same Python"
    assert re.match(r"python:3\.11\.\d+-slim", runtime[0][1])
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) >= 10000
    assert any(keyword == "HEALTHCHECK" and "healthcheck.py" in rest for keyword, rest in runtime)
    assert not any(keyword == "RUN" and re.search(r"apt-get|gcc|build-essential", rest) for keyword, rest in runtime)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_is_in_the_build_context(dockerfile):
    """The per-Dockerfile .dockerignore admits every COPY source (else the build fails late)."""
    patterns = [line.strip() for line in (dockerfile.parent / (dockerfile.name + ".dockerignore")).read_text()
                .splitlines() if line.strip() and not line.startswith("#")]

    def admitted(path: str) -> bool:
        ok = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") or fnmatch.fnmatch(path, pat + "/*"):
                ok = negate
        return ok

    args = {}
    for keyword, rest in instructions(dockerfile):
        if keyword == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
        if keyword == "COPY" and "--from" not in rest:
            sources = [w for w in rest.split() if not w.startswith("--")][:-1]
            for src in sources:
                src = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], src)
                assert (REPO / src).exists() or src == "model_repository", f"{src} does not exist"
                assert admitted(src.rstrip("/")), f"{dockerfile.name}: {src} is excluded by its .dockerignore"


def _imports(package: Path) -> set[str]:
    names = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return names


def _closure(requirements: list[str]) -> set[str]:
    """The distributions a requirement list installs (with their dependencies), as installed here."""
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    todo, seen = [norm(re.split(r"[\[=<>; ]", r)[0]) for r in requirements], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" in req and "extra == \"grpc\"" not in req:
                continue
            todo.append(norm(re.split(r"[\[=<>;!~ (]", req)[0]))
    return seen


def test_gateway_image_installs_every_package_the_service_imports():
    listed = [line.strip() for line in (DOCKER / "gateway-requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    installed = _closure(listed)
    providers = metadata.packages_distributions()
    local = {"service", "medseg_client"}
    missing = {}
    for module in _imports(REPO / "service") - local - set(sys.stdlib_module_names):
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        if not dists & installed:
            missing[module] = sorted(dists)
    assert not missing, f"service/ imports modules the gateway image does not install: {missing}"


def test_triton_python_backend_pins_match_the_project_constraints():
    pins = dict(line.split("==") for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for line in (DOCKER / "triton-python-requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            assert pins[name] == version, f"{name}=={version} differs from constraints.txt ({pins[name]})"
