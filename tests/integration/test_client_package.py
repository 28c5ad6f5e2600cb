"""The client distribution on its own: a fresh virtual environment with only ``pip install
./client`` (no torch, no onnxruntime, no server code) talks to a real gateway.

The CLI runs from that environment with its working directory outside the repository, so the
repository is not on ``sys.path``. The environment's size on disk and the install time are
printed (run with ``-s`` to see them), not asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.harness import REPO

pytestmark = pytest.mark.slow

CLIENT = REPO / "client"
CONSTRAINTS = REPO / "requirements" / "constraints.txt"
# The server's code and runtimes (and the [rle] extra): none may be importable in the client's venv.
ABSENT = ("torch", "onnxruntime", "onnx", "service", "export", "training", "tritonclient", "pycocotools")


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything pointing into the repository's venv or tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME",
                                                             "PYTHONSTARTUP", "PYTHONSAFEPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if str(REPO) not in p)
    return {**env, **extra}


def _size_mb(folder: Path) -> float:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root, name)
            if not path.is_symlink():
                total += path.stat().st_size
    return total / 1e6


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory, record_testsuite_property) -> Path:
    """``python -m venv`` + ``pip install -c requirements/constraints.txt ./client``."""
    base = tmp_path_factory.mktemp("client-venv")
    venv = base / "venv"
    # Build from a copy: pip builds in the source folder and would leave client/build behind.
    source = base / "client"
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, cwd=base, env=_clean_env(),
                   timeout=300)
    created = time.monotonic()
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-c", str(CONSTRAINTS), str(source)],
        cwd=base, env=_clean_env(), capture_output=True, text=True, timeout=600,
    )
    installed = time.monotonic()
    assert install.returncode == 0, f"pip install ./client failed:\n{install.stdout}\n{install.stderr}"
    size = _size_mb(venv)
    print(f"\nclient venv: {size:.1f} MB on disk; python -m venv {created - started:.1f} s, "
          f"pip install ./client {installed - created:.1f} s")
    record_testsuite_property("client_venv_mb", f"{size:.1f}")
    record_testsuite_property("client_install_s", f"{installed - created:.1f}")
    return venv


def _run(venv: Path, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), *args], cwd=cwd, env=_clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_the_client_venv_has_no_server_code_and_no_ml_runtime(client_venv, tmp_path) -> None:
    probe = f"""
import importlib, importlib.metadata as md, json
found = {{}}
for name in {ABSENT!r}:
    try:
        importlib.import_module(name)
        found[name] = True
    except ImportError:
        found[name] = False
import medseg_client
print(json.dumps({{"found": found, "client": medseg_client.__file__,
                  "dists": sorted(d.metadata["Name"].lower() for d in md.distributions())}}))
"""
    done = _run(client_venv, "-c", probe, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert not any(report["found"].values()), f"importable in the client venv: {report['found']}"
    assert Path(report["client"]).is_relative_to(client_venv), report["client"]  # not the repository's
    print(f"client venv distributions: {', '.join(report['dists'])}")
    assert {"medseg-client", "grpcio", "protobuf", "numpy", "pillow"} <= set(report["dists"])
    assert not set(report["dists"]) & {"torch", "onnxruntime", "onnx", "medseg-gateway", "grpcio-tools"}


def test_cli_lists_the_models_of_a_real_gateway(client_venv, gateway, tmp_path) -> None:
    done = _run(client_venv, "-m", "medseg_client", "models", "--server", gateway.target, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split()[:2] == ["NAME", "VERSION"]
    assert "medsam_lite" in done.stdout


def test_cli_segments_a_dicom_image_with_a_box(client_venv, gateway, shared_data, tmp_path) -> None:
    image = shared_data / "dicom" / "CT_small.dcm"
    header = pydicom.dcmread(image, stop_before_pixels=True)
    height, width = int(header.Rows), int(header.Columns)
    out = tmp_path / "mask.png"
    box = ("20", "20", str(width - 20), str(height - 20))
    done = _run(client_venv, "-m", "medseg_client", "segment", "--server", gateway.target, "--image", str(image),
                "--box", *box, "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "model: medsam_lite" in done.stdout and "mask 0: predicted_iou=" in done.stdout
    with Image.open(out) as png:
        assert (png.format, png.mode, png.size) == ("PNG", "L", (width, height))
        pixels = np.asarray(png)
    assert set(np.unique(pixels)) <= {0, 255}
    assert (pixels == 255).sum() > 0, "the mask is empty"


def test_overlay_of_dicom_without_the_files_extra_says_what_to_install(client_venv, gateway, shared_data,
                                                                       tmp_path) -> None:
    done = _run(client_venv, "-m", "medseg_client", "segment", "--server", gateway.target,
                "--image", str(shared_data / "dicom" / "CT_small.dcm"), "--box", "10", "10", "60", "60",
                "--out", str(tmp_path / "m.png"), "--overlay", str(tmp_path / "ov.png"), cwd=tmp_path)
    assert done.returncode == 2
    assert "pip install 'medseg-client[files]'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "m.png").exists()


def test_console_script_is_installed(client_venv, tmp_path) -> None:
    done = subprocess.run([str(client_venv / "bin" / "medseg-client"), "--help"], cwd=tmp_path, env=_clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "segment" in done.stdout and "models" in done.stdout and "embed" in done.stdout
