"""Held-out pairs (`heldout.file` of a reward or DPO run): the before/after table of pairwise accuracy and margin.

A preference run's held-out file is a pairs file like its training sources: `heldout_pairs_config` prepares it the
same way (tokeniser, template, truncation), whole, and the Trainer evaluates it as its evaluation set, so the
numbers are the Trainer's own `eval_accuracy` and `eval_margin` (`preference.trainer`), all-reduced over ranks.
`training.eval_on_start` gives the untrained model's ("before"); the last evaluation, after the final step, the
trained model's ("after"). `pair_comparison` reads both from the Trainer's log history.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from config.schema import DataConfig

# The metrics of `preference.trainer.pair_metrics` the table reports.
PAIR_METRICS = ("accuracy", "margin", "chosen_reward", "rejected_reward")


def heldout_pairs_config(data: DataConfig, heldout_file: str, max_samples: int) -> DataConfig:
    """`data` with the held-out file as its one source (its first `max_samples` pairs), nothing split off."""
    source = {"path": heldout_file, "max_samples": max_samples, "format": data.specs[0].format}
    return dataclasses.replace(data, sources=[source], validation_split_percentage=0.0)


@contextlib.contextmanager
def naming_heldout_file(heldout_file: str) -> Iterator[None]:
    """A data error in the held-out pairs names `heldout.file`: the sample data's default is chat prompts, which a
    preference run cannot score."""
    try:
        yield
    except ValueError as error:
        raise ValueError(
            f"heldout.file={heldout_file}: a reward or dpo run evaluates held-out preference pairs "
            f"(or set heldout.file=null): {error}"
        ) from error


def pair_comparison(log_history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Before (the evaluation at step 0) and after (the last evaluation) from a Trainer's `state.log_history`;
    None unless both exist at different steps."""
    evaluations = [entry for entry in log_history if "eval_accuracy" in entry]
    if len(evaluations) < 2 or evaluations[0].get("step") != 0 or evaluations[-1].get("step") == 0:
        return None
    first, last = evaluations[0], evaluations[-1]
    return {
        "before": {name: first[f"eval_{name}"] for name in PAIR_METRICS if f"eval_{name}" in first},
        "after": {name: last[f"eval_{name}"] for name in PAIR_METRICS if f"eval_{name}" in last},
        "after_step": last["step"],
    }


def format_pair_comparison(comparison: dict[str, Any], pairs: int) -> str:
    """A plain-text before/after table of the held-out pairs."""
    lines = [f"held-out pairs ({pairs}): before -> after (step {comparison['after_step']})"]
    for name in PAIR_METRICS:
        if name in comparison["before"] and name in comparison["after"]:
            before, after = comparison["before"][name], comparison["after"][name]
            shown = f"{before:.1%} -> {after:.1%}" if name == "accuracy" else f"{before:+.3f} -> {after:+.3f}"
            lines.append(f"  {name:<16} {shown}")
    return "\n".join(lines)
