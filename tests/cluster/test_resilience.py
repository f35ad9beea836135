"""Resilience, one rank: a non-finite step is skipped without touching the weights; a preemption signal
ends the run with a checkpoint and status 75, and the resumed run matches an uninterrupted one.

The non-finite loss comes from `resilience.inject_nonfinite_at_steps` (a testing aid that makes the
model's output NaN at those optimizer steps). The 2-rank variants are in
tests/cluster/test_resilience_distributed.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.resilience import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER
from observability.artifacts import read_metrics
from tests.helpers import (
    COMPARABLE_RUN,
    EVERY_STEP,
    LAST_STEP,
    NO_HELDOUT,
    REPO_ROOT,
    assert_real_origins,
    assert_same_checkpoint,
    assert_same_training,
    describe_run,
    read_nonfinite_log,
    run_script,
    run_to_exit,
)

TIMEOUT_S = 180


def train_command(output_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", NO_HELDOUT, f"output_dir={output_dir}", *overrides]


@pytest.mark.slow
def test_nonfinite_step_is_skipped_and_training_continues(tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    command = train_command(output_dir, *EVERY_STEP, "training.max_steps=4", "resilience.inject_nonfinite_at_steps=[3]")
    status, output = run_to_exit(command, output_dir)
    assert status == 0, describe_run(output, [output_dir / "logs"])
    assert "step 3: skipped the optimizer step (non-finite loss on rank(s) [0]" in output, output
    assert "Samples of rank(s) [0]: rank 0: " in output, output
    (skip,) = read_nonfinite_log(output_dir)
    assert skip["step"] == 3 and skip["loss_ranks"] == [0]
    assert_real_origins(skip["origins"][0])
    assert_same_checkpoint(output_dir / "checkpoint-3", output_dir / "checkpoint-2")
    with pytest.raises(AssertionError):  # the steps around it did train
        assert_same_checkpoint(output_dir / "checkpoint-4", output_dir / "checkpoint-3")
    learning_rates = {r["step"]: r["learning_rate"] for r in read_metrics(output_dir) if "loss" in r}
    assert learning_rates[4] == learning_rates[3], f"the LR schedule advanced on the skipped step: {learning_rates}"


@pytest.mark.slow
def test_repeated_nonfinite_steps_stop_the_run_with_a_checkpoint(tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    command = train_command(
        output_dir,
        *EVERY_STEP,
        "training.max_steps=6",
        "resilience.inject_nonfinite_at_steps=[2,3]",
        "resilience.max_consecutive_nonfinite=2",
    )
    status, output = run_to_exit(command, output_dir)
    assert status != 0, "the run went on after 2 non-finite steps in a row"
    assert "stopped at step 3: 2 optimizer steps in a row had a non-finite loss or gradient" in output, output
    assert not (output_dir / "checkpoint-4").exists(), "training went on past the limit"
    assert_same_checkpoint(output_dir / "checkpoint-3", output_dir / "checkpoint-1")
    assert not (output_dir / "model.safetensors").exists(), "a stopped run must not save a final model"


def wait_for_step(process: subprocess.Popen, output_dir: Path, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if any(r.get("step", 0) >= step for r in read_metrics(output_dir) if "loss" in r):
            return
        time.sleep(0.02)
    pytest.fail(f"the run logged no step {step} in {timeout} s (status {process.poll()})")


@pytest.mark.slow
def test_preempted_run_saves_exits_75_and_resumes_to_the_same_loss(tmp_path: Path) -> None:
    finished, preempted = tmp_path / "finished", tmp_path / "preempted"
    run_script(train_command(finished, *COMPARABLE_RUN), dict(os.environ), TIMEOUT_S, [finished / "logs"], REPO_ROOT)

    log = open(tmp_path / "preempted.out", "w+", encoding="utf-8")  # noqa: SIM115  closed below
    process = subprocess.Popen(
        train_command(preempted, *COMPARABLE_RUN), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for_step(process, preempted, 1, TIMEOUT_S)
        os.kill(process.pid, signal.SIGUSR1)
        status = process.wait(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
        log.seek(0)
        output = log.read()
        log.close()
    assert status == PREEMPTED_EXIT_CODE, f"status {status}\n{describe_run(output, [preempted / 'logs'])}"
    stopped_at = max(r["step"] for r in read_metrics(preempted) if "loss" in r)
    assert stopped_at < LAST_STEP, "the signal came after the last step: nothing to resume"
    assert (preempted / f"checkpoint-{stopped_at}" / "trainer_state.json").is_file()
    assert f'"step": {stopped_at}' in (preempted / PREEMPTED_MARKER).read_text()
    assert f"Preempted: stopped at step {stopped_at}" in output, output

    resumed = run_script(
        train_command(preempted, *COMPARABLE_RUN, "training.resume_from_checkpoint=auto"),
        dict(os.environ),
        TIMEOUT_S,
        [preempted / "logs"],
        REPO_ROOT,
    )
    assert f"resuming from {preempted / f'checkpoint-{stopped_at}'}" in resumed, resumed
    # One process, the same float32 operations in the same order, weights, Adam's moments, schedule, RNG and data
    # position restored exactly: bit for bit in practice. 1e-6 (8 ulp of a loss near 1, 8 eps relative) leaves room
    # for a library that reorders a reduction after a restart only; a resume that repeats or skips a batch, or resets
    # the optimizer or the schedule, moves a step's loss by 1e-3 or more and the weights by up to lr = 5e-4.
    assert_same_training(preempted, finished, atol=1e-6)
