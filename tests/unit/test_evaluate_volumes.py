"""bench/evaluate_volumes.py end to end on one small real structure (a slice range of CI size):
the report has its targets table and every score is a real measurement in [0, 1]."""

from __future__ import annotations

import json

import pytest

from bench import evaluate_volumes

pytestmark = pytest.mark.usefixtures("shared_data")


def test_one_small_structure_is_evaluated_and_reported(tmp_path):
    out, js = tmp_path / "EVAL.md", tmp_path / "eval.json"
    assert evaluate_volumes.main(["--volumes", "colin27_t1", "--structures", "pallidum_right", "--corrections", "1",
                                  "--no-dicom", "--out", str(out), "--json", str(js)]) == 0
    results = json.loads(js.read_text())
    row = results["volumes"]["colin27_t1 (NIfTI)"]["structures"]["pallidum_right"]
    for key in ("oracle_dice", "oracle_nsd", "one_box_dice", "one_box_nsd", "corrected_dice", "dice_auc"):
        assert 0.0 <= row[key] <= 1.0, key
    assert row["one_box_dice"] > 0.2 and row["oracle_dice"] > 0.3   # the model found the structure
    assert len(row["steps"]) == 2 and row["seconds_cold"] > 0
    text = out.read_text()
    assert "| one box >= 0.9 x oracle mean 3-D Dice |" in text and "pallidum_right" in text


def test_a_correction_past_the_structure_erases_the_run_in_one_interaction():
    import numpy as np

    ref = np.zeros((10, 4, 4), bool)
    ref[3:6, 1:3, 1:3] = True
    pred = np.zeros_like(ref)
    pred[3:9, 1:3, 1:3] = True
    step, action = evaluate_volumes.correction(7, pred, ref)
    assert step.erase == (7, 8) and action == "erase slices 7-8"
    step, _ = evaluate_volumes.correction(4, pred, ref)
    assert step.slice_index == 4 and step.box is not None
