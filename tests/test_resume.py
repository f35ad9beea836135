"""Resume = uninterrupted: a run cut off and restarted with `training.resume_from_checkpoint=auto`.

The run is 8 steps with a checkpoint every 4; the interrupted one was killed while
writing checkpoint-8. Resumed from checkpoint-4 it must log the same loss at every step
and save the same weights as the run that never stopped: the Trainer restores the
optimizer, scheduler and RNG states and skips the batches already trained on, so the
data order and the LR schedule continue where they were. The 2-rank ZeRO-3 variant is
in tests/launch/test_single_node.py (it reuses that file's ZeRO-3 run); `auto` with no
checkpoint yet is what the Slurm test's fresh job runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.launch.conftest import (
    COMPARABLE_RUN,
    LAST_STEP,
    NO_HELDOUT,
    REPO_ROOT,
    RESUME_STEP,
    assert_same_training,
    make_interrupted_copy,
    run_script,
)

TIMEOUT_S = 180


def train(output_dir: Path, *overrides: str) -> str:
    command = [sys.executable, "train.py", *COMPARABLE_RUN, NO_HELDOUT, f"output_dir={output_dir}", *overrides]
    return run_script(command, env=dict(os.environ), timeout=TIMEOUT_S, log_dirs=[output_dir / "logs"], cwd=REPO_ROOT)


@pytest.mark.slow
def test_one_rank_resumed_run_matches_uninterrupted(tmp_path: Path) -> None:
    finished, interrupted = tmp_path / "finished", tmp_path / "interrupted"
    train(finished)
    make_interrupted_copy(finished, interrupted)

    output = train(interrupted, "training.resume_from_checkpoint=auto")
    assert f"Skipping incomplete checkpoint {interrupted / f'checkpoint-{LAST_STEP}'}" in output, output
    assert f"resuming from {interrupted / f'checkpoint-{RESUME_STEP}'}" in output, output
    assert f"step {RESUME_STEP}/{LAST_STEP} " not in output, "the resumed run trained step 4 again"
    assert_same_training(interrupted, finished, atol=1e-6)
