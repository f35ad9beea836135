"""The pair metrics of a logging interval and the held-out pairs' before/after table."""

from __future__ import annotations

import pytest
import torch

from evaluation.pairs import format_pair_comparison, pair_comparison
from preference.trainer import PAIR_SUM_COLUMNS, pair_metrics


def sums(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_pair_metrics_divide_all_rank_sums_by_pairs_overall_and_per_source() -> None:
    # 4 pairs: source a holds 3 (2 right), source b 1 (wrong).
    columns = {name: index for index, name in enumerate(PAIR_SUM_COLUMNS)}
    total = torch.zeros(3, len(PAIR_SUM_COLUMNS), dtype=torch.float64)
    for row, (pairs, correct, margin) in enumerate([(4, 2, 1.0), (3, 2, 2.5), (1, 0, -1.5)]):
        total[row, columns["pairs"]], total[row, columns["correct"]] = pairs, correct
        total[row, columns["sum_margin"]] = margin
    total[0, columns["sum_chosen_logps"]] = -8.0
    metrics = pair_metrics(total, ["a", "b"], "dpo", "eval_")
    assert metrics["eval_accuracy"] == pytest.approx(0.5) and metrics["eval_margin"] == pytest.approx(0.25)
    assert metrics["eval_accuracy/a"] == pytest.approx(2 / 3) and metrics["eval_margin/b"] == pytest.approx(-1.5)
    assert metrics["eval_chosen_logps"] == pytest.approx(-2.0)
    assert "chosen_logps" not in str(pair_metrics(total, ["a", "b"], "reward", ""))
    assert pair_metrics(torch.zeros_like(total), ["a", "b"], "reward", "") == {}


def test_before_and_after_come_from_the_step_zero_and_last_evaluations() -> None:
    history = [
        {"eval_accuracy": 0.5, "eval_margin": 0.0, "step": 0},
        {"loss": 0.7, "step": 5},
        {"eval_accuracy": 0.75, "eval_margin": 0.4, "step": 5},
        {"eval_accuracy": 0.9, "eval_margin": 1.2, "step": 10},
    ]
    comparison = pair_comparison(history)
    assert comparison == {
        "before": {"accuracy": 0.5, "margin": 0.0},
        "after": {"accuracy": 0.9, "margin": 1.2},
        "after_step": 10,
    }
    assert "50.0% -> 90.0%" in format_pair_comparison(comparison, 40)
    assert pair_comparison(history[1:]) is None  # no evaluation before training
    assert pair_comparison(history[:2]) is None  # none after
