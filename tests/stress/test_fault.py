"""Short CI version of bench/fault_test.py: tritonserver SIGKILLed and restarted on the same
ports under load. Failures are UNAVAILABLE (or DEADLINE_EXCEEDED) only, detected within
seconds, service recovers without a gateway restart, and no OK call carries a wrong mask."""

from __future__ import annotations

import pytest

from bench.fault_test import markdown, run_fault

pytestmark = pytest.mark.slow


def test_triton_killed_and_restarted_under_load_loses_no_correctness(shared_data, tmp_path):
    result = run_fault(duration=20.0, kill_at=6.0, rate=0.5, images=3, scenario="kill", workdir=tmp_path)
    print("\n" + markdown(result))
    assert set(result.codes) <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, result.codes
    assert result.codes.get("UNAVAILABLE", 0) >= 1  # the fault was seen
    assert result.wrong_masks == 0 and result.masks_checked >= 3
    assert result.health_not_serving_s is not None and result.health_not_serving_s < 3.0
    assert result.first_unavailable_s is not None and result.first_unavailable_s < 3.0
    assert result.health_serving_again_s is not None
    assert result.health_serving_again_s < result.triton_restart_s + 5.0
    assert result.first_ok_after_restart_s is not None
