"""The real DICOM validators the tests run on every object the product writes: ``dciodvfy``
(Debian dicom3tools: no line with 'Error') and ``dcmdump`` (dcmtk: exit 0). A missing tool
FAILS the test (CI runs scripts/bootstrap_dicom_tools.sh first); it never skips."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

TOOLS_SETUP = ("run scripts/bootstrap_dicom_tools.sh (make test and CI run it; it installs Debian's dicom3tools "
               "and dcmtk with apt-get, as root)")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {TOOLS_SETUP}", pytrace=False)
    return path


def dciodvfy_errors(data: bytes, tmp_path: Path, name: str = "seg.dcm") -> list[str]:
    path = tmp_path / name
    path.write_bytes(data)
    run = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


def dcmdump_ok(data: bytes, tmp_path: Path, name: str = "seg.dcm") -> None:
    path = tmp_path / name
    path.write_bytes(data)
    run = subprocess.run([tool("dcmdump"), str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def seg_frames(data: bytes) -> tuple[pydicom.Dataset, dict[tuple[str, int], np.ndarray]]:
    """pydicom's own reading of a SEG: (referenced source SOP Instance UID, segment number) ->
    that frame (bool), from each frame's Derivation Image and Segment Identification items."""
    ds = pydicom.dcmread(io.BytesIO(data))
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    out = {}
    shared = ds.SharedFunctionalGroupsSequence[0]
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        identification = item if "SegmentIdentificationSequence" in item else shared   # one segment: shared
        segment = int(identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        assert (uid, segment) not in out
        out[uid, segment] = pixels[i].astype(bool)
    return ds, out


def frames_by_source(data: bytes) -> tuple[pydicom.Dataset, dict[str, np.ndarray]]:
    """:func:`seg_frames` of a single-segment SEG: referenced source SOP Instance UID -> frame."""
    ds, frames = seg_frames(data)
    assert {segment for _, segment in frames} <= {1}
    return ds, {uid: frame for (uid, _), frame in frames.items()}
