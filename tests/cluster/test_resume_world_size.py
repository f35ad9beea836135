"""Resuming on another number of ranks: a ZeRO checkpoint is refused at start-up, a plain one resumes.

ZeRO shards the optimizer state over the ranks that saved it, and DeepSpeed cannot re-shard it when it
loads: the 2-rank ZeRO-3 checkpoint of `zero3_deepspeed_run` resumed on 1 rank must fail before any rank
is spawned (launch/single_node.sh runs `cluster.check`) and, launched without that script, before
train.py loads the model, with a message that says what to do. A DDP (or single-process) checkpoint
holds the whole optimizer state: saved by 1 rank and resumed on 2 with the same global batch, the run
continues as if it had never stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.manifest import LATEST_MARKER, MANIFEST_FILE, STAGING_DIR, checkpoint_problem
from cluster.resume import ZERO_SHARD_PATTERN
from tests.helpers import (
    COMPARABLE_RUN,
    DISTRIBUTED_TIMEOUT_S,
    LAST_STEP,
    LAUNCH_DIR,
    NO_HELDOUT,
    REPO_ROOT,
    RESUME_STEP,
    LaunchedRun,
    assert_same_training,
    make_interrupted_copy,
    run_script,
)

pytestmark = pytest.mark.distributed

FAIL_FAST_S = 120  # a check and a refusal: no rank, no model, no data (imports dominate on a loaded machine)
REFUSAL = "optimizer state is sharded over 2 ranks and this run has 1"


def test_zero3_checkpoints_hold_every_ranks_shards_and_a_manifest(zero3_deepspeed_run: LaunchedRun) -> None:
    output_dir = zero3_deepspeed_run.output_dir
    assert not (output_dir / STAGING_DIR).exists(), "a save was left in staging"
    assert (output_dir / LATEST_MARKER).read_text() == f"checkpoint-{LAST_STEP}\n"
    for step in (RESUME_STEP, LAST_STEP):
        checkpoint = output_dir / f"checkpoint-{step}"
        manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
        assert (manifest["step"], manifest["world_size"], manifest["zero_stage"]) == (step, 2, 3), manifest
        shard_ranks = {int(match.group(1)) for name in manifest["files"] if (match := ZERO_SHARD_PATTERN.search(name))}
        assert shard_ranks == {0, 1}, f"optimizer shards of ranks {shard_ranks} in {checkpoint}"
        assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "trainer_state.json"} <= set(
            manifest["files"]
        )
        assert checkpoint_problem(checkpoint) is None


def run_to_exit(command: list[str], env: dict[str, str], output_dir: Path) -> tuple[int, str, float]:
    start = time.monotonic()
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=FAIL_FAST_S, check=False
    )
    return result.returncode, result.stdout + result.stderr, time.monotonic() - start


@pytest.fixture
def zero3_checkpoint_copy(zero3_deepspeed_run: LaunchedRun, tmp_path: Path) -> Path:
    """An output directory holding the 2-rank run's checkpoint-4 (and its partial checkpoint-8)."""
    output_dir = tmp_path / "run"
    make_interrupted_copy(zero3_deepspeed_run.output_dir, output_dir)
    return output_dir


def test_zero3_checkpoint_on_fewer_ranks_is_refused_before_ranks_spawn(
    zero3_checkpoint_copy: Path, launch_env: dict[str, str]
) -> None:
    overrides = ["deepspeed=zero3", *COMPARABLE_RUN, NO_HELDOUT, "training.resume_from_checkpoint=auto"]
    status, output, _ = run_to_exit(
        [str(LAUNCH_DIR / "single_node.sh"), *overrides, f"output_dir={zero3_checkpoint_copy}"],
        {**launch_env, "NUM_GPUS": "1"},
        zero3_checkpoint_copy,
    )
    assert status == 2, f"status {status}\n{output[-3000:]}"
    assert REFUSAL in output and "Resume with 2 ranks" in output and "ds_to_universal" in output, output[-3000:]
    assert "deepspeed.launcher" not in output and not (zero3_checkpoint_copy / "logs").exists(), "ranks started"


def test_zero3_checkpoint_on_fewer_ranks_is_refused_by_train_py_before_the_model_loads(
    zero3_checkpoint_copy: Path,
) -> None:
    checkpoint = zero3_checkpoint_copy / f"checkpoint-{RESUME_STEP}"
    command = [
        sys.executable, "train.py", "deepspeed=zero3", *COMPARABLE_RUN, NO_HELDOUT,
        f"training.resume_from_checkpoint={checkpoint}", f"output_dir={zero3_checkpoint_copy}",
    ]  # fmt: skip
    status, output, _ = run_to_exit(command, {**os.environ, "OMP_NUM_THREADS": "1"}, zero3_checkpoint_copy)
    assert status != 0, output[-3000:]
    assert REFUSAL in output and f"model.name_or_path={checkpoint}" in output, output[-3000:]
    rank0_log = (zero3_checkpoint_copy / "logs" / "rank0.log").read_text()
    assert "Loaded " not in rank0_log and "Data:" not in rank0_log, "train.py went on to the data or the model"


BATCH, ACCUMULATION = "training.per_device_train_batch_size", "training.gradient_accumulation_steps"


def test_plain_checkpoint_of_one_rank_resumes_on_two_ranks_as_if_uninterrupted(
    tmp_path: Path, launch_env: dict[str, str]
) -> None:
    one_rank, resumed = tmp_path / "one", tmp_path / "resumed"
    run_script(
        [sys.executable, "train.py", *COMPARABLE_RUN, NO_HELDOUT, f"{BATCH}=4", f"{ACCUMULATION}=1",
         f"output_dir={one_rank}"],
        env=launch_env, timeout=DISTRIBUTED_TIMEOUT_S, log_dirs=[one_rank / "logs"],
    )  # fmt: skip
    make_interrupted_copy(one_rank, resumed)
    # The same global batch of 4 (2 ranks x 2): the steps after the checkpoint see the same samples.
    output = run_script(
        [str(LAUNCH_DIR / "single_node.sh"), "deepspeed=none", *COMPARABLE_RUN, NO_HELDOUT, f"{BATCH}=2",
         f"{ACCUMULATION}=1", "training.resume_from_checkpoint=auto", f"output_dir={resumed}"],
        env={**launch_env, "NUM_GPUS": "2"}, timeout=DISTRIBUTED_TIMEOUT_S, log_dirs=[resumed / "logs"],
    )  # fmt: skip
    assert f"resuming from {resumed / f'checkpoint-{RESUME_STEP}'}" in output, output[-3000:]
    assert "was saved by 1 rank(s), this run has 2" in output, output[-3000:]
    # Two ranks reduce in another order than one: equal up to float rounding (tests/dft/test_split_invariance.py).
    # atol 1e-5 as there: after 4 resumed AdamW steps at lr <= 5e-4, float32 reordering (8e-6 relative at most)
    # moves the weights by ~2e-8; 1e-5 = lr / 50 leaves room for Adam's amplification of near-zero gradients, while a
    # resume that repeats or skips a batch, or resets the optimizer or the schedule, moves a step's loss by 1e-3 or
    # more and the weights by up to lr.
    assert_same_training(resumed, one_rank, atol=1e-5)
