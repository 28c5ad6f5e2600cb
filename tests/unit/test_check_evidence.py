"""What the export checks run on: the dev cases when they are there, else (a bare clone) the
DICOM test images that ship with pydicom, decoded by the gateway's decoder, with centred boxes."""

from __future__ import annotations

import json

import numpy as np
import pydicom.data
import pytest

from export.dev_cases import BOX_FRACTIONS, MIN_SHIPPED_SIDE, centred_boxes, check_evidence, shipped_images_dir


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """pydicom's data helpers may try to download (and retry forever offline): never called."""
    def refuse(*_a, **_k):
        raise AssertionError("pydicom.data download helpers must not be used")

    for name in ("get_testdata_files", "get_testdata_file", "fetch_data_files"):
        if hasattr(pydicom.data, name):
            monkeypatch.setattr(pydicom.data, name, refuse)


def test_without_dev_cases_the_checks_use_the_images_shipped_with_pydicom(tmp_path):
    evidence = check_evidence(tmp_path / "absent", limit=3)
    assert evidence.kind == "shipped" and evidence.images == 3
    assert evidence.source == str(shipped_images_dir()) and shipped_images_dir().is_dir()
    assert len(evidence.items) == 3 * len(BOX_FRACTIONS)
    assert "images shipped with pydicom" in evidence.describe()
    assert f"no dev cases (.npz) in {tmp_path / 'absent'}" in evidence.describe()
    distinct = {item.pixels.tobytes() for item in evidence.items}
    assert len(distinct) == 3  # each pixel content once (pydicom ships MR_small in many encodings)
    for item in evidence.items:
        h, w = item.pixels.shape[:2]
        assert min(h, w) >= MIN_SHIPPED_SIDE and item.mask is None
        assert item.pixels.dtype == np.float32 and 0.0 <= item.pixels.min() and item.pixels.max() <= 1.0
        b = item.box
        assert 0 <= b.x0 < b.x1 <= w and 0 <= b.y0 < b.y1 <= h
        assert abs((b.x0 + b.x1) / 2 - w / 2) <= 1 and abs((b.y0 + b.y1) / 2 - h / 2) <= 1
    assert check_evidence(tmp_path / "absent", limit=3).describe() == evidence.describe()  # deterministic


def test_an_empty_data_dir_falls_back_too(tmp_path):
    assert check_evidence(tmp_path, limit=1).kind == "shipped"


def test_dev_cases_win_when_present(tmp_path):
    image = np.zeros((40, 50), np.int16)
    image[10:30, 12:40] = 200
    mask = image > 0
    np.savez(tmp_path / "case.npz", image=image, mask=mask, meta=json.dumps({"case_id": "c1"}))
    evidence = check_evidence(tmp_path)
    assert evidence.kind == "dev" and evidence.images == 1 and "1 dev cases" in evidence.describe()
    (item,) = evidence.items
    assert item.case_id == "c1" and (item.box.x0, item.box.y0, item.box.x1, item.box.y1) == (12, 10, 40, 30)
    assert np.array_equal(item.mask, mask)


def test_a_check_on_no_image_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one image"):
        check_evidence(tmp_path, limit=0)


def test_centred_boxes():
    assert [(b.x0, b.y0, b.x1, b.y1) for b in centred_boxes(100, 200, (0.5, 1.0))] == [
        (50, 25, 150, 75), (0, 0, 200, 100)]
