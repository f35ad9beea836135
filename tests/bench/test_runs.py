"""bench.runs: a rerun appends to the kept runs, and a goal is judged on their median with the worst shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import loss_head, packing_throughput
from bench.runs import AT_LEAST, AT_MOST, append_run, load_range, load_runs, verdict


def test_a_goal_met_by_the_median_but_not_by_the_worst_run_shows_both() -> None:
    judged = verdict([2.1, 1.4, 2.3], goal=1.5, direction=AT_LEAST)
    assert (judged.median, judged.worst, judged.met, judged.worst_met) == (2.1, 1.4, True, False)
    assert judged.text() == "2.10x met (median of 3; worst 1.40x, NOT met)"


def test_an_upper_bound_takes_the_largest_run_as_the_worst() -> None:
    judged = verdict([0.5, 0.7, 0.55, 0.58], goal=0.6, direction=AT_MOST)
    assert judged.median == pytest.approx(0.565)
    assert judged.worst == 0.7
    assert judged.text() == "0.56x met (median of 4; worst 0.70x, NOT met)"


def test_a_goal_missed_by_the_median_is_not_met_whatever_the_best_run() -> None:
    judged = verdict([3.5, 2.2], goal=3, direction=AT_LEAST)
    assert not judged.met
    assert judged.text() == "2.85x NOT met (median of 2; worst 2.20x, NOT met)"


def test_one_run_reads_as_before() -> None:
    assert verdict([2.04], 1.5, AT_LEAST).text() == "2.04x met"


def test_a_rerun_appends_and_keeps_the_earlier_runs(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    append_run(path, {"date": "2026-12-01", "speedup": 2.0})
    runs = append_run(path, {"date": "2026-12-02", "speedup": 1.4})
    assert [r["date"] for r in runs] == ["2026-12-01", "2026-12-02"]
    assert load_runs(path) == runs


def test_a_results_file_from_before_runs_were_kept_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"date": "2026-11-26", "speedup": 2.0}))
    with pytest.raises(ValueError, match="no 'runs' list"):
        load_runs(path)


def test_the_load_range_spans_every_value_the_runs_recorded() -> None:
    runs = [{"load_average_1min": [0.9, 1.2]}, {"load_average_1min": 6.8}, {"load_average_1min": None}]
    assert load_range(runs) == "0.9-6.8"


def test_the_packing_section_judges_the_speedup_on_the_median_and_shows_the_worst() -> None:
    kept = load_runs(packing_throughput.RESULTS_PATH)[:2]  # the two migrated runs, whose load was not recorded
    slow = {**kept[-1], "date": "2026-12-07", "commit": "abc1234", "load_average_1min": [7.5, 8.0], "cpus": 2}
    slow = {**slow, "speedup": 1.2}
    runs = [*kept, {**kept[-1], "speedup": 2.5, "load_average_1min": [1.0, 1.1], "cpus": 2}, slow]
    text = "\n".join(packing_throughput.docs_section(runs))
    median = verdict([r["speedup"] for r in runs], packing_throughput.GOAL_SPEEDUP, AT_LEAST)
    assert median.met and not median.worst_met
    assert f"{median.median:.2f}x met (median of {len(runs)}; worst 1.20x, NOT met)" in text
    assert "1-minute load average 1.0-8.0 on 2 cores around the runs; no load recorded for the 2 runs" in text
    assert "| 2026-12-07 | abc1234 | 7.5, 8.0 |" in text


def test_the_loss_head_goals_take_each_ratio_within_a_run_and_judge_their_median() -> None:
    """A rerun of the medium size whose fused chunk-1024 time is 1.3x chunked CE's (goal <= 1.1x): the median of
    the two runs still meets the goal, the worst does not, and the tables show the rerun's rows."""
    (kept,) = load_runs(loss_head.RESULTS_PATH)
    medium = [dict(r) for r in kept["rows"] if r["size"] == "medium"]
    fused = next(r for r in medium if (r["variant"], r["chunk"]) == (loss_head.FUSED, loss_head.FUSED_CHUNK))
    chunked = next(r for r in medium if r["variant"] == loss_head.CHUNKED_CE)
    fused.update(median_s=1.3 * chunked["median_s"], date="2026-12-07")
    rerun = {**kept, "date": "2026-12-07", "rows": medium}
    lines = loss_head.goal_lines([kept, rerun])
    line = next(line for line in lines if line.startswith("- medium"))
    kept_fused = next(
        r for r in kept["rows"] if (r["size"], r["variant"], r["chunk"]) == ("medium", loss_head.FUSED, 1024)
    )
    kept_ratio = kept_fused["median_s"] / chunked["median_s"]
    assert kept_ratio <= 1.1
    median = (kept_ratio + 1.3) / 2
    assert f"time <= 1.1x chunked CE: {median:.2f}x, met (median of 2; worst 1.30x, NOT met)" in line
    assert fused in loss_head.current_rows([kept, rerun])
    # The sizes the rerun left out are judged on the one run that measured them.
    assert any(line.startswith("- full") and "median of" not in line for line in lines)
