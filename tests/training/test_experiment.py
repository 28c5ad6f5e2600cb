"""The experiment's bookkeeping: merged result rows and the generated Markdown block."""

from __future__ import annotations

import pytest

pytest.importorskip("scipy", reason="the training extra (requirements/training.txt) is not installed")

from training.experiment import _merge, table, write_doc  # noqa: E402


def row(structure: str, method: str, dice: float) -> dict:
    return {"structure": structure, "method": method, "train_cases": 3, "dev_cases": 1, "iterations": 5,
            "seconds": 1.0, "cpu_seconds": 2.0, "dice_mean": dice, "dice_std": 0.0, "hd95_mean_mm": 1.0,
            "empty": 0, "pseudo_label_dice_train": 0.5, "qc_flagged_cases": 1, "pseudo_label_seconds": 3.0,
            "size_bounds": [1.0, 9.0]}


def test_rerun_method_replaces_its_row_and_keeps_method_order():
    rows = [row("brain", "full", 0.9), row("brain", "box", 0.5)]
    rows = _merge(rows, row("brain", "box_size", 0.7))
    rows = _merge(rows, row("brain", "box", 0.6))
    assert [(r["method"], r["dice_mean"]) for r in rows] == [("full", 0.9), ("box", 0.6), ("box_size", 0.7)]


def test_table_gives_the_fraction_of_full_supervision_and_replaces_only_its_block(tmp_path):
    text = table([row("brain", "full", 0.8), row("brain", "box", 0.4)], "cmd")
    assert "| 0.50 |" in text
    doc = tmp_path / "T.md"
    doc.write_text("intro\n<!-- a:begin -->\nstale text\n<!-- a:end -->\noutro\n")
    write_doc(doc, [row("brain", "full", 0.8)], "cmd", "a")
    out = doc.read_text()
    assert out.startswith("intro\n<!-- a:begin -->\nLast written by `cmd`") and out.endswith("<!-- a:end -->\noutro\n")
    assert "stale text" not in out


def test_seed_table_gives_mean_and_spread_over_runs(tmp_path):
    import json

    from training.experiment import seed_table

    for i, dice in enumerate((0.4, 0.6)):
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "results.json").write_text(json.dumps([row("brain", "full", 0.8),
                                                                     row("brain", "box", dice)]))
    text = seed_table([tmp_path / "s0", tmp_path / "s1"])
    assert "| 0.400 / 0.600 | 0.500 ± 0.100 | 0.62 |" in text
