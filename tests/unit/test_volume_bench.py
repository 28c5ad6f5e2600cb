"""bench/volume_bench.py: its ``## 3-D volumes`` section rendered from a small synthetic results
dict, written between its markers without touching the rest of the file; its CLI answers --help."""

from __future__ import annotations

import subprocess
import sys

from bench import volume_bench as vb
from bench.harness import REPO

MiB = 1024 * 1024


def run(wall: float, first: float, slices: int = 20, enc: float = 0.4, dec: float = 0.05) -> dict:
    return {"wall_s": wall, "wall_s_min": wall, "wall_s_max": wall, "first_slice_s": first, "slices": slices,
            "slice_range": [70, 70 + slices - 1], "encoder_calls": slices + 2, "decoder_calls": slices + 2,
            "encoder_sum_s": enc * slices, "decoder_sum_s": dec * slices, "encoder_mean_s": enc, "decoder_mean_s": dec,
            "slices_per_s": slices / wall, "stop_reasons": ["below slice 80: mask vanished"], "runs": [{}]}


GATEWAY = {**run(9.36, 0.52), "runs": [
    {"first_slice_s": 0.50, "first_slice_bound_s": 0.55, "first_slice_within": True,
     "first_slice_encoder_s": 0.39, "first_slice_decoder_s": 0.05},
    {"first_slice_s": 0.70, "first_slice_bound_s": 0.56, "first_slice_within": False,
     "first_slice_encoder_s": 0.61, "first_slice_decoder_s": 0.05}]}


RESULTS = {
    "machine": "Test CPU, 2 cores", "date": "2026-12-01T12:00:00", "command": "python bench/volume_bench.py",
    "matmul_gflops": {"peak": 80.0, "pytorch": 78.0, "onnxruntime": 80.0, "threads": 2},
    "load_start": "0.1 / 0.1 / 0.1", "load_end": "1.9 / 1.0 / 0.5", "cores": 2, "threads": 2,
    "case": {"subject": "colin27_t1", "structure": "thalamus_left", "slice": 80, "box": [60.0, 80.0, 90.0, 110.0],
             "truth_slices": [70, 91], "truth_voxels": 8700, "depth": 181},
    "model": {"name": "medsam_lite_bf16", "description": "..."},
    # model time 0.45 s per slice over 20 slices = 9.0 s; wall 9.36 s: 18 ms = 4.0 % overhead per slice
    "gateway": GATEWAY,
    "reference": run(36.0, 1.6, enc=1.5, dec=0.2),
    "agreement": {"dice_gateway_vs_reference": 0.97, "dice_gateway_vs_truth": 0.81, "dice_reference_vs_truth": 0.82,
                  "gateway_embeddings_reused": 0},
    "memory": {"shape": [300, 512, 512], "dtype": "int16", "volume_bytes": 150 * MiB, "ttl_s": 20.0,
               "nifti_file_bytes": 40 * MiB,
               "raw": {"baseline_rss": 1200 * MiB, "peak_over_baseline": 330 * MiB, "ratio": 2.2, "peak_reset": True,
                       "rss_while_stored": 1360 * MiB, "after_rss": 1205 * MiB, "after_over_baseline": 5 * MiB, "stored_bytes_after": 0.0,
                       "release": "expired", "not_found": True},
               "nifti": {"baseline_rss": 1205 * MiB, "peak_over_baseline": 450 * MiB, "ratio": 3.0,
                         "peak_reset": True, "after_rss": 1206 * MiB, "after_over_baseline": 1 * MiB,
                         "stored_bytes_after": 0.0, "release": "deleted"}},
}


def test_the_section_reports_speed_first_slice_overhead_and_memory_against_their_targets():
    text = vb.render_section(RESULTS)
    assert text.startswith("## 3-D volumes\n")
    for needed in ("Test CPU, 2 cores; fp32 matmul 80 GFLOP/s", "2026-12-01T12:00:00",
                   "`python bench/volume_bench.py`", "--default-model auto` chose `medsam_lite_bf16`"):
        assert needed in text
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "9.36 s" in rows["seconds per structure (call to summary)"]
    assert "36.00 s" in rows["seconds per structure (call to summary)"]
    assert "3.85x faster" in rows["seconds per structure (call to summary)"]
    assert "2.14 | 0.56" in rows["slices per second"]
    assert rows["slices with a mask (range)"].endswith("| 20 (70-89) | 20 (70-89) | same |")
    first = rows["first slice within encoder + decoder + 100 ms (medians)"]
    assert "520 ms vs 400 + 50 + 100 = 550 ms" in first and first.endswith("| yes |")
    each = rows["first slice within the bound, each run"]
    assert "run 1: 500 vs 550 ms, its own encoder + decoder 390 + 50 ms (yes)" in each
    assert "run 2: 700 vs 560 ms, its own encoder + decoder 610 + 50 ms (NO)" in each
    assert each.endswith("| 1 of 2 runs |")
    assert any("run(s) 2" in note for note in vb.notes(RESULTS))
    overhead = rows["gateway overhead per slice: (wall - encoder - decoder stage sums) / slices"]
    assert "18.0 ms = 4.0% of 450 ms" in overhead and overhead.endswith("<= 10%: met |")
    assert "gateway vs PyTorch: 0.970" in rows["3-D Dice vs the reference mask"]
    raw, nifti = rows["raw int16 array"], rows["NIfTI .nii.gz (40 MiB file)"]
    assert "+330 MiB | 2.20x: met | +160 MiB |" in raw and "(expired, NOT_FOUND)" in raw and raw.endswith("| +5 MiB | 0 |")
    assert "3.00x: NOT met" in nifti and "(deleted)" in nifti


def test_a_slower_first_slice_and_different_slice_counts_are_flagged():
    results = {**RESULTS, "gateway": run(9.36, 0.60, slices=19)}
    text = vb.render_section(results)
    assert "| DIFFERENT |" in text
    assert [line for line in text.splitlines() if line.startswith("| first slice within")][0].endswith("| NO |")
    assert any("slices differ" in note for note in vb.notes(results))


def test_the_section_replaces_only_what_lies_between_its_markers(tmp_path):
    from bench.docs import markers, write_section

    begin, end = markers(vb.SECTION)
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nbefore\n")
    write_section(doc, vb.SECTION, "## 3-D volumes\n\nold-run\n")
    assert doc.read_text() == f"# Benchmarks\n\nbefore\n\n{begin}\n## 3-D volumes\n\nold-run\n{end}\n"
    doc.write_text(doc.read_text() + "\n## after\n\nkept\n")
    write_section(doc, vb.SECTION, vb.render_section({k: v for k, v in RESULTS.items() if k != "memory"}))
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n\n" + begin + "\n## 3-D volumes\n")
    assert text.endswith(end + "\n\n## after\n\nkept\n")
    assert "old-run" not in text and text.count(begin) == 1 and "Memory:" not in text


def test_the_volume_benchmark_cli_answers_help():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "volume_bench.py"), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--structure" in done.stdout and "3-D volumes" in done.stdout
