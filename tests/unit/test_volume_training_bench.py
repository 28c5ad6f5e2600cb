"""The interactive path's rows of the annotation-cost table (bench/volume_training.py)."""

import json

from bench import volume_training as vtb


def test_interactive_rows_come_from_the_evaluation_of_the_right_structure(tmp_path):
    path = tmp_path / "volumes_results.json"
    steps = [{"dice": d} for d in (0.4, 0.5, 0.6)]
    path.write_text(json.dumps({"volumes": {"colin27_t1 (NIfTI)": {"structures": {
        "thalamus_right": {"one_box_dice": 0.4, "corrected_dice": 0.6, "steps": steps},
        "thalamus_left": {"one_box_dice": 0.9, "corrected_dice": 0.9, "steps": steps[:1]}}}}}))
    rows = vtb.interactive_rows(["thalamus", "caudate"], path)
    assert [(r["structure"], r["n"], r["dice"]) for r in rows] == [("thalamus", 1, 0.4), ("thalamus", 3, 0.6)]
    assert "2 corrections" in rows[1]["label"]
    assert vtb.interactive_rows(["thalamus"], tmp_path / "absent.json") == []
