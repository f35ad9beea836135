"""The fused DFT loss under DeepSpeed ZeRO-3 on two CPU ranks: the same update as the unfused path and as one process.

The head weight is partitioned (and tied to the embeddings), so a fused loss that read it outside the head's
forward would see an empty tensor, and one whose gradient bypassed ZeRO-3's hooks would never be reduced. One
micro-batch has no trainable token: its rank must neither hang in a reduce-scatter nor produce NaN.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, run_script

pytestmark = pytest.mark.distributed

CHECK_SCRIPT = Path(__file__).with_name("zero3_fused_loss_check.py")


def test_zero3_fused_loss_matches_reference_and_one_process(tmp_path: Path, launch_env) -> None:
    result_file = tmp_path / "result.json"
    env = {**launch_env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    run_script(
        [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus=2",
            f"--master_port={env['MASTER_PORT']}",
            str(CHECK_SCRIPT),
            "--out",
            str(result_file),
        ],
        env=env,
        timeout=240,
        log_dirs=[],
    )
    report = json.loads(result_file.read_text())
    assert report["world_size"] == 2
    for implementation in ("reference", "fused"):
        run = report[implementation]
        assert run["all_finite"], f"{implementation}: NaN or inf in the update"
        assert run["all_moved"], f"{implementation}: a parameter got no update: {run}"
        # At most 1: the update equals minus the one-process gradient up to float32 rounding.
        assert run["max_tolerance_ratio"] <= 1.0, f"{implementation}: {run}"
    assert report["fused"]["train_loss"] == pytest.approx(report["reference"]["train_loss"], rel=1e-6)
    assert report["fused_vs_reference_max_abs_diff"] <= 1e-6, report
