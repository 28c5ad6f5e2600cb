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


def _row(run, method, context, seed, dice):
    return {"structure": "thalamus", "run": run, "method": method, "key_slices": 1 if method == "pseudo" else 0,
            "label": f"{run} label", "slices": 10, "fg_slices": 4, "ignored": 0.0, "reference_voxels": 100,
            "reference_slices": 4, "iterations": 5, "seed": seed, "dice": dice, "nsd": dice, "predicted_voxels": 90,
            "seconds": 1.0, "cpu_seconds": 1.0, "context_slices": context, "key_slice_indices": [3],
            "label_dice": 0.5, "unc_in_union": 0.1, "label_seconds": 1.0}


def test_a_2_5d_run_is_a_fraction_of_full_supervision_with_the_same_context(tmp_path):
    rows = [_row("full", "full", 0, 0, 0.8), _row("pseudo_1key", "pseudo", 0, 0, 0.4),
            _row("full_ctx1", "full", 1, 0, 0.5), _row("pseudo_1key_ctx1", "pseudo", 1, 0, 0.4)]
    lines = {line.split(" | ")[1]: line for line in vtb.table(rows, "header").splitlines()
             if line.startswith("| thalamus |") and "outline" not in line and "box" not in line.split(" | ")[2]}
    assert " | 0.50 / n/a | " in lines["pseudo_1key label"]          # 0.4 / 0.8 (2-D full)
    assert " | 0.80 / n/a | " in lines["pseudo_1key_ctx1 label"]     # 0.4 / 0.5 (2.5-D full)
    assert " | 1.00 / n/a | " in lines["full_ctx1 label"]
