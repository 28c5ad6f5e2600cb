"""The dependency direction between the project's packages, enforced.

``lint-imports`` (import-linter) checks the contracts in pyproject.toml ``[tool.importlinter]``:
the service's layers (edge > security | observability > inference > backends > settings >
core), what the client SDK, the server, export, training and bench may not import, the pure
core (no gRPC, metrics or inference runtimes) and no cycles between sibling packages. A
grimp test below also refuses every cycle between modules, a package and its own modules
included. Imports inside functions count everywhere. Two more tests prove each checker bites.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
ACYCLIC_PACKAGES = ("service", "export", "training", "medseg_client")


def lint_imports(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    if not LINT_IMPORTS.is_file():
        pytest.fail(f"{LINT_IMPORTS} is missing: pip install -r requirements/test.txt -c requirements/constraints.txt")
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_every_import_contract_is_kept():
    result = lint_imports()
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}\n{result.stderr}"
    assert " broken" in result.stdout and "0 broken" in result.stdout


def forbidden(name: str, source: str, target: str) -> str:
    """One import-linter ``forbidden`` contract as TOML text."""
    return (f'[[tool.importlinter.contracts]]\nname = "{name}"\ntype = "forbidden"\n'
            f'source_modules = ["{source}"]\nforbidden_modules = ["{target}"]\n')


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_lint_imports_reports_each_kind_of_violation(tmp_path):
    """A tiny package breaking a layer (with an import inside a function), a forbidden external
    import and the no-cycle rule: each contract is reported broken with the import that breaks it."""
    _write(tmp_path, {
        "bitepkg/__init__.py": "",
        "bitepkg/edge.py": "import bitepkg.core\n",
        "bitepkg/core/__init__.py": "",
        "bitepkg/core/pure.py": """\
            import grpc


            def late():
                from bitepkg import edge  # upward, and only inside a function
                return edge
            """,
        "bitepkg/core/a.py": "from bitepkg.core import b\n",
        "bitepkg/core/b.py": "from bitepkg.core import a\n",
        "contracts.toml": textwrap.dedent("""\
            [tool.importlinter]
            root_packages = ["bitepkg"]
            include_external_packages = true

            [[tool.importlinter.contracts]]
            name = "layers"
            type = "layers"
            containers = ["bitepkg"]
            layers = ["edge", "core"]

            [[tool.importlinter.contracts]]
            name = "acyclic"
            type = "acyclic_siblings"
            ancestors = ["bitepkg"]
            """) + "\n" + forbidden("pure core", "bitepkg.core", "grpc"),
    })
    result = lint_imports("contracts.toml", cwd=tmp_path)
    report = result.stdout + result.stderr
    assert result.returncode != 0, report
    assert "Contracts: 0 kept, 3 broken." in report, report
    assert "bitepkg.core.pure -> bitepkg.edge" in report  # the function-level import counts
    assert "bitepkg.core.pure -> grpc" in report


def test_lint_imports_sees_function_level_imports_in_this_repository(tmp_path):
    """The repository's own graph: bench.harness imports export.tritonserver only inside
    TritonProcess.start; a contract forbidding it must be reported broken."""
    config = tmp_path / "contracts.toml"
    config.write_text('[tool.importlinter]\nroot_packages = ["bench", "export"]\n\n'
                      + forbidden("known violation", "bench.harness", "export.tritonserver"))
    result = lint_imports(str(config))
    report = result.stdout + result.stderr
    assert result.returncode != 0, report
    assert "bench.harness -> export.tritonserver" in report, report


def import_cycles(*packages: str) -> list[list[str]]:
    """Every cycle of module imports (strongly connected components of two or more modules,
    or a module importing itself) within ``packages``, each as a closed path
    ``[m0, m1, ..., m0]`` along real imports."""
    graph = grimp.build_graph(*packages, cache_dir=None)
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graphs here are a few hundred modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                components.append(component)

    for m in modules:
        if m not in index:
            connect(m)
    return [_closed_path(sorted(c)[0], c, edges) for c in sorted(components, key=lambda c: sorted(c))]


def _closed_path(start: str, component: set[str], edges: dict[str, list[str]]) -> list[str]:
    """A shortest closed path ``[start, ..., start]`` inside one strongly connected component."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in edges[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if w in component and w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is on no cycle of {sorted(component)}")


def test_no_import_cycles_between_any_modules():
    """No cycles at all in service, export, training, medseg_client (imports inside functions,
    and a package's own __init__, count)."""
    cycles = import_cycles(*ACYCLIC_PACKAGES)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_reports_cycles_through_function_level_imports_and_package_inits(tmp_path, monkeypatch):
    _write(tmp_path, {
        "cyclepkg/__init__.py": "from cyclepkg import a\n",
        "cyclepkg/a.py": "from cyclepkg import b\n",
        "cyclepkg/b.py": "def late():\n    import cyclepkg.a\n",
        "cyclepkg/c.py": "import cyclepkg.b\n",
        "initpkg/__init__.py": "from initpkg.mod import VALUE\n",
        "initpkg/mod.py": "import initpkg\n\nVALUE = 1\n",
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("cyclepkg", "initpkg") == [["cyclepkg.a", "cyclepkg.b", "cyclepkg.a"],
                                                    ["initpkg", "initpkg.mod", "initpkg"]]
