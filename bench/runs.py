"""A benchmark's results file keeps every run: a rerun appends to it, and a goal is judged on the median of the
kept runs, with the worst run shown beside it.

The file is `{"runs": [run, ...]}`, oldest first; each run holds its provenance (`core.provenance`: date, commit,
command, 1-minute load average, cores) and what it measured, in the benchmark's own keys. One run met by luck on an
idle machine, or one missed under load, then cannot stand for the benchmark alone: the docs show both the median
and the worst, and say which of them meets the goal.
"""

from __future__ import annotations

import json
import operator
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.files import write_atomic

AT_LEAST, AT_MOST, BELOW = ">=", "<=", "<"
_MEETS: dict[str, Callable[[float, float], bool]] = {AT_LEAST: operator.ge, AT_MOST: operator.le, BELOW: operator.lt}


def load_runs(path: Path) -> list[dict[str, Any]]:
    """The kept runs of `path`, oldest first; none when the benchmark never ran."""
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    if "runs" not in record:
        raise ValueError(f"{path}: no 'runs' list: a results file from before runs were kept; migrate it")
    return record["runs"]


def append_run(path: Path, run: dict[str, Any]) -> list[dict[str, Any]]:
    """Add `run` to the runs kept in `path` and return them all."""
    runs = [*load_runs(path), run]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"runs": runs}, indent=2) + "\n")
    return runs


@dataclass(frozen=True)
class Verdict:
    """A goal judged over the kept runs' values of one measure."""

    median: float
    worst: float
    runs: int
    goal: float
    direction: str
    """AT_LEAST, AT_MOST or BELOW: which side of `goal` meets it."""

    @property
    def met(self) -> bool:
        """The goal is met when the median meets it."""
        return _MEETS[self.direction](self.median, self.goal)

    @property
    def worst_met(self) -> bool:
        return _MEETS[self.direction](self.worst, self.goal)

    def text(self, spec: str = ".2f", unit: str = "x") -> str:
        """`2.04x met` for one run; `2.10x met (worst of 3: 1.45x, NOT met)` for several."""
        median = f"{self.median:{spec}}{unit} {'met' if self.met else 'NOT met'}"
        if self.runs == 1:
            return median
        worst = f"{self.worst:{spec}}{unit}, {'met' if self.worst_met else 'NOT met'}"
        return f"{median} (median of {self.runs}; worst {worst})"


def verdict(values: list[float], goal: float, direction: str) -> Verdict:
    """The median of `values` (one per kept run) and the worst of them, against `goal`."""
    if not values:
        raise ValueError("no runs to judge a goal on")
    if direction not in _MEETS:
        raise ValueError(f"direction {direction!r}: one of {sorted(_MEETS)}")
    worst = min(values) if direction == AT_LEAST else max(values)
    return Verdict(statistics.median(values), worst, len(values), goal, direction)


def load_range(runs: list[dict[str, Any]]) -> str:
    """The 1-minute load averages the runs recorded, `1.2-6.8` (each run may record one value or several)."""
    loads = [x for run in runs for x in _as_list(run.get("load_average_1min"))]
    if not loads:
        return "not recorded"
    low, high = min(loads), max(loads)
    return f"{low:.1f}" if round(low, 1) == round(high, 1) else f"{low:.1f}-{high:.1f}"


def _as_list(value: float | list[float] | None) -> list[float]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]
