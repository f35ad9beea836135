"""launch/multi_node.sh with one node: torchrun --nproc_per_node=2, plain DDP over gloo on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.launch.conftest import LAUNCH_DIR, check_saved_run, run_script

pytestmark = pytest.mark.distributed


def test_torchrun_ddp_two_cpu_ranks(tmp_path: Path, base_model_dir: Path, launch_env) -> None:
    output_dir = tmp_path / "run"
    overrides = ["deepspeed=none", "debug=quick", "training.eval_strategy=no", "heldout.file=null"]
    run_script(
        [str(LAUNCH_DIR / "multi_node.sh"), *overrides, f"output_dir={output_dir}"],
        env={**launch_env, "NNODES": "1", "NODE_RANK": "0", "NUM_GPUS": "2"},
        timeout=180,
        log_dirs=[output_dir / "logs"],
    )
    check_saved_run(output_dir, base_model_dir, ranks=2)
