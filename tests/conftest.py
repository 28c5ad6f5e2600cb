"""Fixtures shared by all test layers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# MEDSEG_SHARED_DATA moves it, as for the export (export/dev_cases.py); "/nonexistent" hides it.
SHARED_DATA = Path(os.environ.get("MEDSEG_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


SHARED_SUBFOLDERS = ("dev", "dicom", "train", "volumes")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real test images beside the repository (``../shared/data``: dicom/, dev/, train/).

    Missing data is an error, not a skip: CI always has ``../shared``, and a skip would turn
    dev-case parity, Triton parity, the PHI-in-logs test, DICOM decoding, the training smoke
    and the fault stress test into passes of ``make test``."""
    missing = [name for name in SHARED_SUBFOLDERS if not (SHARED_DATA / name).is_dir()]
    if missing:
        pytest.fail(f"shared test data missing: {', '.join(str(SHARED_DATA / m) for m in missing)} not found. "
                    "The tests that use real images need ../shared/data (dev/, dicom/, train/) beside the "
                    "repository checkout; CI always provides it. Put it there (or a symlink to it) and rerun.",
                    pytrace=False)
    return SHARED_DATA
