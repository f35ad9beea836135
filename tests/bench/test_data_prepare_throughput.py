"""bench/data_prepare_throughput.py's scaling figures: of the fastest runs, and paired within each repeat."""

from __future__ import annotations

import pytest

from bench.data_prepare_throughput import OURS, format_table, summarise


def _run(seconds: float) -> dict:
    return {"seconds": seconds, "records": 1000, "tokens": 50_000}


def test_scaling_is_reported_for_the_fastest_runs_and_for_each_repeat() -> None:
    # The machine ran slower in the second repeat: 40 s and 21 s, then 50 s and 25 s.
    rows = summarise({("ours", 1): [_run(40.0), _run(50.0)], ("ours", 2): [_run(21.0), _run(25.0)]})
    two = next(row for row in rows if row["pipeline"] == OURS and row["workers"] == 2)
    assert two["scaling_vs_1_worker"] == pytest.approx(40.0 / (2 * 21.0))
    assert two["scaling_per_repeat"] == pytest.approx([40.0 / 42.0, 50.0 / 50.0])
    assert two["scaling_per_repeat_median"] == pytest.approx((40.0 / 42.0 + 1.0) / 2)
    assert "| 95% | 98% (95%, 100%) |" in format_table(rows)
