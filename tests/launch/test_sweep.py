"""launch/sweep.sh: one launch per value of a setting, each into its own directory; and `-m` (Hydra's in-process
multirun) refused where it cannot work, under a multi-rank launch, before any rank trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import LAUNCH_DIR, NO_HELDOUT, REPO_ROOT, run_script

pytestmark = pytest.mark.distributed

USER_ERROR = 2
REFUSAL = "cannot restart its process group"


def dft_alphas(run_dir: Path) -> set[float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {row["dft_alpha"] for row in rows if "dft_alpha" in row}


def test_sweep_runs_each_value_into_its_own_directory(tmp_path: Path, launch_env) -> None:
    sweep_dir = tmp_path / "sweep"
    env = {**launch_env, "SWEEP": "loss.alpha=0,1", "SWEEP_DIR": str(sweep_dir), "PYTHON": sys.executable}
    common = ["debug=quick", "training.max_steps=2", "training.eval_strategy=no", NO_HELDOUT]
    output = run_script([str(LAUNCH_DIR / "sweep.sh"), *common], env=env, timeout=300, log_dirs=[sweep_dir])
    assert f"sweep.sh: 2 runs in {sweep_dir}" in output, output[-2000:]
    for alpha in (0.0, 1.0):
        run_dir = sweep_dir / f"loss.alpha_{alpha:g}"
        assert (run_dir / "model.safetensors").is_file(), f"no model in {run_dir}"
        assert dft_alphas(run_dir) == {alpha}, f"{run_dir} trained with alpha {dft_alphas(run_dir)}"


def test_sweep_refuses_an_output_dir_of_its_own(tmp_path: Path, launch_env) -> None:
    env = {**launch_env, "SWEEP": "loss.alpha=0,1", "SWEEP_DIR": str(tmp_path)}
    result = subprocess.run(
        [str(LAUNCH_DIR / "sweep.sh"), f"output_dir={tmp_path}"], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == USER_ERROR and "set SWEEP_DIR instead" in result.stderr, result.stderr


def test_multirun_under_several_ranks_is_refused_before_training(tmp_path: Path, launch_env) -> None:
    # By the launch script's check, before any rank starts...
    env = {**launch_env, "NUM_GPUS": "2", "PYTHON": sys.executable}
    result = subprocess.run(
        [str(LAUNCH_DIR / "single_node.sh"), "-m", "loss.alpha=0,1", f"output_dir={tmp_path}"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == USER_ERROR and REFUSAL in result.stderr, result.stderr[-2000:]
    # ...and by train.py itself when started by a launcher directly: one line, no traceback, nothing trained.
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    command = [sys.executable, "train.py", "-m", "loss.alpha=0,1", f"output_dir={tmp_path}"]
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == USER_ERROR, result.stdout[-2000:] + result.stderr[-2000:]
    assert REFUSAL in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not list(tmp_path.rglob("model.safetensors"))
