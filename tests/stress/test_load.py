"""Short CI version of bench/load_test.py: 4x the measured capacity for 10 s against a real
gateway. Every call ends OK or RESOURCE_EXHAUSTED, rejections are fast, accepted calls stay
within the latency bound the admission settings imply, RSS stays flat, the cache in bounds."""

from __future__ import annotations

import pytest

from bench.load_test import markdown, run_load

pytestmark = pytest.mark.slow


def test_four_times_capacity_gives_only_ok_or_fast_resource_exhausted(tmp_path):
    result = run_load(duration=10.0, factor=4.0, capacity_s=5.0, max_inflight=2, max_queue=2,
                      cache_bytes=16 << 20, workdir=tmp_path)
    print("\n" + markdown(result))
    assert result.only_ok_or_exhausted, result.codes
    assert result.codes.get("OK", 0) >= 2 and result.codes.get("RESOURCE_EXHAUSTED", 0) >= 1, result.codes
    assert result.accepted_ms["p99"] <= result.p99_bound_ms
    assert result.rejected_ms["p99"] < 250.0
    assert result.rss_mib["last_10pct"] - result.rss_mib["first_10pct"] < 64.0, result.rss_samples
    assert result.cache_bytes <= result.cache_limit
