"""The update does not depend on how a step is split: (1 rank, batch 4) = (2 ranks, GA 2, batch 1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import LAUNCH_DIR, REPO_ROOT, assert_same_weights, run_script, step_losses

pytestmark = pytest.mark.distributed

COMMON = ("debug=quick", "training.logging_steps=1", "training.eval_strategy=no", "heldout.file=null")
BATCH, ACCUMULATION = "training.per_device_train_batch_size", "training.gradient_accumulation_steps"


def test_two_ranks_with_accumulation_match_one_rank_with_the_same_global_batch(tmp_path: Path, launch_env) -> None:
    one_rank, two_ranks = tmp_path / "one", tmp_path / "two"
    result = subprocess.run(
        [sys.executable, "train.py", *COMMON, f"{BATCH}=4", f"{ACCUMULATION}=1", f"output_dir={one_rank}"],
        cwd=REPO_ROOT, env=launch_env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    run_script(
        [str(LAUNCH_DIR / "multi_node.sh"), *COMMON, f"{BATCH}=1", f"{ACCUMULATION}=2", f"output_dir={two_ranks}"],
        env={**launch_env, "NNODES": "1", "NODE_RANK": "0", "NUM_GPUS": "2"},
        timeout=240,
        log_dirs=[two_ranks / "logs"],
    )
    reference, split = step_losses(one_rank), step_losses(two_ranks)
    assert [step for step, _ in split] == [step for step, _ in reference] == list(range(1, 7))
    torch.testing.assert_close(
        torch.tensor([loss for _, loss in split]), torch.tensor([loss for _, loss in reference]), rtol=1e-5, atol=1e-6
    )
    assert_same_weights(two_ranks, one_rank, atol=1e-5)
