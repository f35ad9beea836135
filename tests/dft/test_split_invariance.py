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
    # Not a float64 reference (that would take a float64 train.py run): the two runs differ only in float32 rounding.
    # Two ranks and 2 accumulated micro-batches sum the step's gradient in another order than one batch of 4: at most
    # about 4 * eps * sqrt(300) = 8e-6 relative (the unit versions of this split, in tests/dft/test_loss.py and
    # test_fused_loss.py, bound each order against float64). AdamW (lr at most 5e-4, conf/training/tiny_cpu.yaml)
    # turns a relative gradient change d into an update change of about lr * d per step, so after 6 steps the weights
    # differ by about 6 * 5e-4 * 8e-6 = 2e-8; atol 1e-5 = lr / 50 leaves room for the few elements whose gradient is
    # at rounding level, where Adam's normalisation amplifies. The losses: their own float32 rounding (rtol 1e-5 =
    # 84 eps; atol 1e-6 for a loss near 0) plus what those weight differences move. A micro-batch lost, repeated or
    # divided by its own token count moves a step's loss by 1e-3 or more and the weights by up to lr.
    torch.testing.assert_close(
        torch.tensor([loss for _, loss in split]), torch.tensor([loss for _, loss in reference]), rtol=1e-5, atol=1e-6
    )
    assert_same_weights(two_ranks, one_rank, atol=1e-5)
