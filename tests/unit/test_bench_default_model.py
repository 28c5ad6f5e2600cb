"""The benchmark's "default model" row (issue 14: the speed-up users get without naming a
model), rendered from results as bench/run_benchmarks.py records them; its CLI still starts."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

from bench import measure
from bench.harness import REPO

RESULTS = json.loads((REPO / "bench" / "results.json").read_text())


def test_the_default_model_row_gives_its_speed_up_over_the_pytorch_reference():
    results = copy.deepcopy(RESULTS)
    ref = results["runs"]["pytorch_reference"]["new_image"]["p50_ms"]
    results["default_model"] = {"model": "medsam_lite_bf16", "description": "...",
                                "new_image": {**results["runs"]["gateway_embedded"]["new_image"], "p50_ms": ref / 4.25},
                                "follow_up": results["runs"]["gateway_embedded"]["follow_up"]}
    rows = [line for line in measure.render_markdown(results).splitlines() if "default model" in line]
    assert rows == ["| new-image Segment speed-up vs PyTorch reference (p50), embedded, default model "
                    "(`--default-model auto` chose medsam_lite_bf16) | 4.25x | >= 4x |"]
    assert "(default)" not in measure.render_markdown(results)  # the fp32 row no longer claims to be it


def test_without_a_default_model_run_there_is_no_row():
    results = copy.deepcopy(RESULTS)
    results.pop("default_model", None)  # results.json from a full run has one; an older run had none
    assert "default model" not in measure.render_markdown(results)


def test_the_benchmark_cli_answers_help():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "run_benchmarks.py"), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "default model" in done.stdout
