"""The client package (client/medseg_client) imports nothing of the server and no ML runtime.

Every module's AST is walked, imports inside functions included (and ``importlib.import_module``
/ ``__import__`` / ``require`` calls with a literal name), so a lazy ``import torch`` in some
helper fails here too. The imports must also match what client/pyproject.toml declares:
grpcio, protobuf, numpy, Pillow at module level; pydicom, nibabel (extra ``files``) and
pycocotools (extra ``rle``) only inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "client"
PACKAGE = CLIENT / "medseg_client"

FORBIDDEN = {"service", "export", "training", "bench", "tests", "torch", "onnxruntime", "onnx",
             "openvino", "tritonclient", "pytriton"}
# import name -> distribution, for what the package may import at module level...
REQUIRED = {"grpc": "grpcio", "google": "protobuf", "numpy": "numpy", "PIL": "pillow"}
# ... and, inside functions only, the optional extras.
OPTIONAL = {"pydicom": ("files", "pydicom"), "nibabel": ("files", "nibabel"), "pycocotools": ("rle", "pycocotools")}
_DYNAMIC_IMPORTERS = {"import_module", "__import__", "require"}


def _modules() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 10, f"expected the client package under {PACKAGE}"
    return files


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(top-level module, line, at module level?)`` of every import in ``path``."""
    depth = len(path.relative_to(CLIENT).parts) - 1  # medseg_client/_generated/x.py -> 2
    return _imports_of(path.read_text(encoding="utf-8"), str(path), depth)


def _imports_of(source: str, filename: str, package_depth: int) -> list[tuple[str, int, bool]]:
    tree = ast.parse(source, filename=filename)
    top_level = {id(node) for node in tree.body}
    # Imports under a module-level if/try still run at import time.
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(child) for child in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        module_level = id(node) in top_level
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno, module_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # A relative import may not climb out of medseg_client.
                assert node.level <= package_depth, f"{filename}:{node.lineno}: relative import leaves the package"
                found.append(("medseg_client", node.lineno, module_level))
            else:
                found.append((node.module.split(".")[0], node.lineno, module_level))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in _DYNAMIC_IMPORTERS and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.append((node.args[0].value.split(".")[0], node.lineno, False))
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_client_module_imports_nothing_of_the_server_or_an_ml_runtime(path: Path) -> None:
    bad = [f"{path.relative_to(REPO)}:{line}: imports {name}" for name, line, _ in _imports(path)
           if name in FORBIDDEN]
    assert not bad, "the client package must not import server code or ML runtimes:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_client_module_imports_only_declared_dependencies(path: Path) -> None:
    allowed = set(sys.stdlib_module_names) | {"__future__", "medseg_client"} | set(REQUIRED)
    for name, line, module_level in _imports(path):
        where = f"{path.relative_to(REPO)}:{line}: {name}"
        if name in OPTIONAL:
            assert not module_level, f"{where} is optional (extra [{OPTIONAL[name][0]}]): import it lazily"
        else:
            assert name in allowed, f"{where} is not a declared dependency of medseg-client"


def test_the_checker_sees_lazy_dynamic_and_relative_imports() -> None:
    source = """
import numpy
try:
    import grpc
except ImportError:
    pass
from . import wire

def show():
    import torch
    from service.core import domain
    return importlib.import_module("onnxruntime"), require("pydicom", "files", "x")
"""
    found = _imports_of(source, "x.py", package_depth=1)
    assert set(found) == {("numpy", 2, True), ("grpc", 4, True), ("medseg_client", 7, True),
                          ("torch", 10, False), ("service", 11, False), ("onnxruntime", 12, False),
                          ("pydicom", 12, False)}
    with pytest.raises(AssertionError, match="leaves the package"):
        _imports_of("from .. import service", "x.py", package_depth=1)


def test_pyproject_declares_exactly_those_dependencies() -> None:
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(requirements: list[str]) -> set[str]:
        return {req.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("~")[0]
                .strip().lower() for req in requirements}

    assert names(project["dependencies"]) == set(REQUIRED.values())
    extras = {extra: names(reqs) for extra, reqs in project["optional-dependencies"].items()}
    expected: dict[str, set[str]] = {}
    for extra, dist in OPTIONAL.values():
        expected.setdefault(extra, set()).add(dist)
    assert extras == expected


def test_importing_the_whole_client_loads_no_server_module() -> None:
    """At run time too: import every module of the package (and run the CLI's --help) in a
    fresh interpreter where importing a forbidden package raises."""
    modules = sorted(
        ".".join(p.relative_to(CLIENT).with_suffix("").parts).removesuffix(".__init__") for p in _modules()
    )
    code = f"""
import importlib, importlib.abc, sys
FORBIDDEN = {sorted(FORBIDDEN)!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
for name in {modules!r}:
    if not name.endswith("__main__"):
        importlib.import_module(name)
from medseg_client.__main__ import build_parser
build_parser().format_help()
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(FORBIDDEN))
assert not loaded, loaded
print("ok", len({modules!r}))
"""
    # cwd outside the repository, -I: only the installed (editable) client is importable.
    done = subprocess.run([sys.executable, "-I", "-c", code], cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")
