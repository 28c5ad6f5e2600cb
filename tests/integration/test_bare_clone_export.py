"""The quick start's export on a bare clone (no ../shared): the PyTorch parity check and the
variant guards decide on the images shipped with pydicom, say so, exit 0 without a traceback;
a broken encoder variant is still refused there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export.__main__ import main as export_main
from export import encoder_variants
from export.encoder_variants import VARIANTS, export_encoder_variant
from export.options import ExportOptions
from service.backends.repository import RepositoryEntry
from tests.harness import REPO, ensure_models
from tests.unit.test_dice_guard import _write_blind_encoder

pytestmark = pytest.mark.slow


@pytest.fixture
def fp32_repository(tmp_path) -> Path:
    """A scratch repository holding only the fp32 entries (as the first export step leaves it)."""
    source, repo = ensure_models(), tmp_path / "repo"
    for name in ("medsam_lite_encoder", "medsam_lite_decoder"):
        shutil.copytree(source / name, repo / name)
    return repo


def _export(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=900)


def test_parity_and_the_bf16_guard_decide_on_shipped_images_without_the_data_folder(fp32_repository, tmp_path):
    empty = tmp_path / "no-dev-cases"
    empty.mkdir()
    parity = _export("medsam_lite", "--repository", str(fp32_repository), "--check-cases", "2",
                     "--data-dir", str(empty))
    out = parity.stdout + parity.stderr
    assert parity.returncode == 0, out
    assert "Traceback" not in out
    assert "parity evidence: 2 images shipped with pydicom" in parity.stdout
    assert "parity over 6 prompts (shipped evidence)" in parity.stdout and "-> OK" in parity.stdout

    guard = _export("medsam_lite_bf16", "--repository", str(fp32_repository), "--guard-cases", "2",
                    env={"MEDSEG_SHARED_DATA": str(tmp_path / "nonexistent")})
    out = guard.stdout + guard.stderr
    assert guard.returncode == 0, out
    assert "Traceback" not in out
    assert ("medsam_lite_bf16 guard evidence: agreement with the fp32 model's masks on 2 images shipped with "
            "pydicom") in guard.stdout
    entry = RepositoryEntry.read(fp32_repository / "medsam_lite_bf16_encoder")
    assert entry.onnx_path().is_file()
    assert "no dev cases at export: mean mask Dice" in entry.gateway.description
    decoder = RepositoryEntry.read(fp32_repository / "medsam_lite_bf16_decoder")  # its own, judged with it
    assert entry.gateway.decoder == decoder.name and decoder.onnx_path().is_file()
    assert (decoder.runtime.runtime, decoder.runtime.precision) == ("openvino", "bf16")


def _write_zeroed_encoder(fp32: Path, out: Path) -> None:
    """The fp32 encoder with every floating-point weight set to zero (shape constants kept)."""
    model = onnx.load(str(fp32))
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind == "f":
            init.CopyFrom(numpy_helper.from_array(np.zeros_like(array), init.name))
    onnx.save(model, str(out))


@pytest.mark.parametrize("write", [_write_zeroed_encoder, _write_blind_encoder], ids=["zeroed", "blind"])
def test_a_broken_variant_is_refused_on_a_bare_clone(fp32_repository, tmp_path, write):
    broken = replace(VARIANTS["medsam_lite_int8"], name="medsam_lite_broken", write=write)
    with pytest.raises(RuntimeError, match="agreement"):
        export_encoder_variant(broken, ExportOptions(repository=fp32_repository, cache_dir=REPO / ".cache"),
                               tmp_path / "nonexistent", limit=2)
    assert not (fp32_repository / "medsam_lite_broken_encoder" / "config.pbtxt").exists()
    assert not list((fp32_repository / "medsam_lite_broken_encoder").rglob("*.onnx"))


def test_the_cli_refuses_a_broken_variant_with_one_line_and_exit_1(fp32_repository, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(encoder_variants.VARIANTS, "medsam_lite_int8",
                        replace(VARIANTS["medsam_lite_int8"], write=_write_zeroed_encoder))
    code = export_main(["medsam_lite_int8", "--repository", str(fp32_repository), "--guard-cases", "2",
                        "--data-dir", str(tmp_path / "nonexistent"), "--cache-dir", str(REPO / ".cache")])
    out = capsys.readouterr()
    assert code == 1
    assert "medsam_lite_int8 guard evidence: agreement with the fp32 model's masks" in out.out
    assert "python -m export medsam_lite_int8: medsam_lite_int8 guard: mean agreement" in out.err
    assert "Traceback" not in out.out + out.err
    assert not (fp32_repository / "medsam_lite_int8_encoder" / "config.pbtxt").exists()
