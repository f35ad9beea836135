"""One logging interval's sums: what the loss side records and the metric writers read, in one agreed layout.

The Trainer adds each micro-batch's detached sums into an `IntervalSums` per mode (`TRAIN`, `EVAL`); at each
logging event it all-reduces them (sums and counts, never averages) and hands both the rank's own and the
all-rank sums to the metric writers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# The two kinds of logging interval.
TRAIN, EVAL = "train", "eval"
# One rank's sums over a logging interval, in this order: every global interval metric is computed from them.
# `sum_kl` is the KL to the starting model of the objectives that have that term (0 for the others).
INTERVAL_SUM_COLUMNS = ("sum_p_correct", "sum_nll", "num_tokens", "input_tokens", "rows", "sum_kl")
# Per data source, in this order: the loss's group sums (`sum_weighted_nll` is the group's `sum_t w_t * CE_t`,
# its share of the loss before the division by the step's token count).
GROUP_SUM_COLUMNS = ("sum_p_correct", "sum_nll", "sum_weighted_nll", "num_tokens")


class IntervalSums(NamedTuple):
    """float64 sums over a logging interval: `totals` by `INTERVAL_SUM_COLUMNS`, `sources` a
    `[num_sources, len(GROUP_SUM_COLUMNS)]` block (zero rows when per-source metrics are off)."""

    totals: torch.Tensor
    sources: torch.Tensor

    @classmethod
    def zeros(cls, num_sources: int) -> IntervalSums:
        return cls(
            torch.zeros(len(INTERVAL_SUM_COLUMNS), dtype=torch.float64),
            torch.zeros(num_sources, len(GROUP_SUM_COLUMNS), dtype=torch.float64),
        )

    def total(self, column: str) -> float:
        return float(self.totals[INTERVAL_SUM_COLUMNS.index(column)])
