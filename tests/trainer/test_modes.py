"""The training modes: one per `training.objective`, and what each hands train.py."""

from __future__ import annotations

import pytest

from config.schema import OBJECTIVES, load_run_config
from modeling.heads import CAUSAL_LM, SCORE
from preference.trainer import PreferenceLossMixin
from trainer.modes import TRAINING_MODES, training_mode


def test_every_objective_the_config_allows_has_a_mode() -> None:
    assert tuple(TRAINING_MODES) == OBJECTIVES


@pytest.mark.parametrize(
    ("objective", "head", "pairwise", "reference"),
    [
        ("sft", CAUSAL_LM, False, False),
        ("pretrain", CAUSAL_LM, False, False),
        ("reward", SCORE, True, False),
        ("dpo", CAUSAL_LM, True, True),
    ],
)
def test_a_mode_names_its_head_trainer_and_reference(
    objective: str, head: str, pairwise: bool, reference: bool
) -> None:
    sources = {
        "pretrain": "data.sources=[book.txt]",
        "reward": "data.sources=[p.jsonl]",
        "dpo": "data.sources=[p.jsonl]",
    }
    run = load_run_config([f"training.objective={objective}", *([sources[objective]] if objective in sources else [])])
    mode = training_mode(run)
    assert mode.head == head
    assert issubclass(mode.trainer_class, PreferenceLossMixin) == pairwise == mode.heldout_pairs
    assert mode.needs_reference(run) is reference
    kwargs = mode.trainer_kwargs(run)
    if pairwise:
        # The loss Trainer underneath runs no per-token objective of its own: nothing like dft_alpha is logged.
        assert kwargs["objective"] == objective and kwargs["loss"].type == "ce" and kwargs["loss"].alpha is None
        assert kwargs["preference"] is run.preference


def test_sft_with_a_kl_objective_needs_the_reference() -> None:
    run = load_run_config(["loss.type=asft"])
    assert training_mode(run).needs_reference(run)
