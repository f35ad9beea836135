"""launch/multi_node.sh with one node: torchrun --nproc_per_node=2 over gloo on CPU, plain DDP and ZeRO-3.

Both runs use the config of `zero3_deepspeed_run` (tests/conftest.py) and must export the
same model it does. ZeRO-3 and DDP may legitimately differ in rounding, not in the maths: with fp32
(no bf16 on CPU) both run AdamW on fp32 master weights over the same global batch, ZeRO-3 on each
rank's partition of them, so the weights agree to ~3e-7 here; the bound is 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import (
    COMPARABLE_RUN,
    DISTRIBUTED_TIMEOUT_S,
    LAUNCH_DIR,
    NO_HELDOUT,
    LaunchedRun,
    assert_same_training,
    check_saved_run,
    run_script,
)

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("deepspeed", ["none", "zero3"])
def test_torchrun_two_cpu_ranks_export_the_model_the_deepspeed_launcher_does(
    deepspeed: str, tmp_path: Path, base_model_dir: Path, launch_env, zero3_deepspeed_run: LaunchedRun
) -> None:
    output_dir = tmp_path / "run"
    run_script(
        [
            str(LAUNCH_DIR / "multi_node.sh"),
            f"deepspeed={deepspeed}",
            *COMPARABLE_RUN,
            NO_HELDOUT,
            f"output_dir={output_dir}",
        ],
        env={**launch_env, "NNODES": "1", "NODE_RANK": "0", "NUM_GPUS": "2"},
        timeout=DISTRIBUTED_TIMEOUT_S,
        log_dirs=[output_dir / "logs"],
    )
    check_saved_run(output_dir, base_model_dir, ranks=2)
    # The same 2 ranks and data under another launcher, ZeRO-3 or plain DDP: the gradients are reduced by other
    # collectives in another order, so float32 rounding differs (about 4 * eps * sqrt(300) = 8e-6 relative at most).
    # After 8 AdamW steps at lr <= 5e-4 that moves weights by ~2e-8; atol 1e-5 = lr / 50 leaves room for Adam's
    # amplification of near-zero gradients (tests/dft/test_split_invariance.py), while a rank that trained on other
    # data, or a lost micro-batch, moves a step's loss by 1e-3 or more and the weights by up to lr.
    assert_same_training(output_dir, zero3_deepspeed_run.output_dir, atol=1e-5)
