"""bench/dicom_round_trip.py's report: the committed docs/DICOM_ROUND_TRIP.md is what its
results file renders to (the figures in docs come from a run, not from hand edits), and the
ratios and the DICOM-step share are computed from the medians."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.dicom_round_trip import render

REPO = Path(__file__).resolve().parents[2]
REPORT = REPO / "docs" / "DICOM_ROUND_TRIP.md"


def test_the_committed_report_is_its_results_rendered():
    results = json.loads(REPORT.with_suffix(".json").read_text())
    assert REPORT.read_text() == render(results)


def test_ratios_and_shares_come_from_the_medians():
    results = {"date": "d", "machine": "m", "command": "c", "model": "medsam_lite", "rounds": 1,
               "slices_segmented": 3, "stow_setup_s": 0.5,
               "median_s": {"segment": 10.0, "upload_segment_seg": 12.0, "round_trip": 15.0},
               "runs_s": {"segment": [10.0], "upload_segment_seg": [12.0], "round_trip": [15.0]},
               "round_trip_steps_ms": {"retrieve": 100.0, "decode": 100.0, "segment": 10000.0, "write_seg": 200.0,
                                       "store": 100.0, "total": 10500.0},
               "seg_writer": {"slices": 108, "frames": 106, "voxels": 5, "bytes": 9, "runs": [0.3], "seg_s": 0.3,
                              "with_headers_s": 0.5}}
    text = render(results)
    assert "| 1.20x |" in text and "| 1.50x |" in text and "take 500 ms, 5.0%" in text
    with pytest.raises(KeyError):
        render({**results, "round_trip_steps_ms": {"total": 1.0}})
