"""A 2-rank run logs each metric once per interval, as token-weighted means over both ranks' data.

Through launch/multi_node.sh: `logs/rank<N>_metrics.jsonl` (`RankMetricsMixin`) holds each rank's own sums, and
`metrics.jsonl` the all-rank means, throughput and memory (`ThroughputMetricsMixin`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from observability.artifacts import read_metrics
from tests.helpers import LAUNCH_DIR, run_script

pytestmark = pytest.mark.distributed


def rank_records(output_dir: Path, rank: int) -> dict[int, dict]:
    path = output_dir / "logs" / f"rank{rank}_metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r for r in records if r["mode"] == "train"}


def test_two_ranks_log_token_weighted_metrics_once_per_interval(tmp_path: Path, launch_env) -> None:
    output_dir = tmp_path / "run"
    overrides = [
        "deepspeed=none",
        "debug=quick",
        "training.logging_steps=1",
        "training.eval_strategy=no",
        "heldout.file=null",
        f"output_dir={output_dir}",
    ]
    run_script(
        [str(LAUNCH_DIR / "multi_node.sh"), *overrides],
        env={**launch_env, "NNODES": "1", "NODE_RANK": "0", "NUM_GPUS": "2"},
        timeout=240,
        log_dirs=[output_dir / "logs"],
    )
    train = [r for r in read_metrics(output_dir) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))  # once per interval, not once per rank
    rank0, rank1 = rank_records(output_dir, 0), rank_records(output_dir, 1)
    differs_from_mean_of_means = False
    for record in train:
        a, b = rank0[record["step"]], rank1[record["step"]]
        assert a["num_tokens"] > 0 and b["num_tokens"] > 0
        tokens = a["num_tokens"] + b["num_tokens"]
        # Not float32: the interval sums are float64 on every rank (core/metric_sums.py), written to JSON and read
        # back exactly, and the logged mean is their sum over 2 ranks divided by the tokens, as here: a few float64
        # roundings, 1e-16 relative. rel=1e-9 is far above that and far below a real mistake (a mean of means, a
        # rank's tokens counted twice: 1e-3 or more).
        assert record["avg_p_correct"] == pytest.approx((a["sum_p_correct"] + b["sum_p_correct"]) / tokens, rel=1e-9)
        assert record["nll"] == pytest.approx((a["sum_nll"] + b["sum_nll"]) / tokens, rel=1e-9)
        mean_of_means = (a["sum_p_correct"] / a["num_tokens"] + b["sum_p_correct"] / b["num_tokens"]) / 2
        # 1e-6 is ten million times float64 rounding: a difference this size comes from the ranks' token counts.
        differs_from_mean_of_means |= abs(mean_of_means - record["avg_p_correct"]) > 1e-6
        assert record["tokens_per_second"] > 0 and record["peak_memory_gb"] > 0
        # Per source (the sample data's two files), the same token weighting over both ranks.
        sources = {key.split("/", 1)[1] for key in record if key.startswith("num_tokens/")}
        assert sources == {"chat_letters", "reverse_alpaca"}
        for source in sources:
            parts = [r["sources"][source] for r in (a, b) if source in r.get("sources", {})]
            source_tokens = sum(part["num_tokens"] for part in parts)
            assert record[f"num_tokens/{source}"] == source_tokens
            for metric, column in (("nll", "sum_nll"), ("avg_p_correct", "sum_p_correct")):
                expected = sum(part[column] for part in parts) / source_tokens
                assert record[f"{metric}/{source}"] == pytest.approx(expected, rel=1e-9)  # float64, as above
    # The ranks saw different data (different token counts), so the weighting is really tested.
    assert differs_from_mean_of_means
