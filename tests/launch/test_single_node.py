"""launch/single_node.sh: two CPU ranks under the DeepSpeed launcher with ZeRO-3, saved weights gathered."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.launch.conftest import LAUNCH_DIR, check_saved_run, run_script

pytestmark = pytest.mark.distributed


def test_zero3_two_cpu_ranks_save_a_model_that_reloads(tmp_path: Path, base_model_dir: Path, launch_env) -> None:
    output_dir = tmp_path / "run"
    # debug=quick keeps the mid-run eval and the held-out comparison rank 0 runs after ZeRO-3 training.
    run_script(
        [str(LAUNCH_DIR / "single_node.sh"), "deepspeed=zero3", "debug=quick", f"output_dir={output_dir}"],
        env={**launch_env, "NUM_GPUS": "2"},
        timeout=240,
        log_dirs=[output_dir / "logs"],
    )
    check_saved_run(output_dir, base_model_dir, ranks=2)
    assert (output_dir / "heldout.txt").is_file(), "rank 0 wrote no held-out comparison"
