"""Resilience, 2 CPU ranks under torchrun (launch/multi_node.sh, DDP over gloo).

- A non-finite loss on rank 1 only: both ranks skip that optimizer step (the weights do not move) and
  training goes on.
- A rank killed mid-run: torchrun's agent sees the worker die, stops the other one and exits non-zero
  well within 120 s, instead of the survivor waiting in a collective until its timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from observability.artifacts import read_metrics
from tests.helpers import (
    EVERY_STEP,
    LAUNCH_DIR,
    NO_HELDOUT,
    REPO_ROOT,
    assert_real_origins,
    assert_same_checkpoint,
    describe_run,
    read_nonfinite_log,
    run_script,
)

TIMEOUT_S = 240
DEAD_RANK_DEADLINE_S = 120


def torchrun_command(output_dir: Path, *overrides: str) -> list[str]:
    return [str(LAUNCH_DIR / "multi_node.sh"), NO_HELDOUT, f"output_dir={output_dir}", *overrides]


def torchrun_env(launch_env: dict[str, str]) -> dict[str, str]:
    return {**launch_env, "NUM_GPUS": "2", "NNODES": "1"}


@pytest.mark.distributed
def test_nonfinite_loss_on_one_rank_skips_the_step_on_all(
    tmp_path: Path, launch_env: dict[str, str], base_model_dir: Path
) -> None:
    output_dir = tmp_path / "run"
    overrides = (*EVERY_STEP, "training.max_steps=4", "resilience.inject_nonfinite_at_steps=[3]")
    console = run_script(
        torchrun_command(output_dir, *overrides, "resilience.inject_nonfinite_on_ranks=[1]"),
        torchrun_env(launch_env),
        TIMEOUT_S,
        [output_dir / "logs"],
    )
    assert "step 3: skipped the optimizer step (non-finite loss on rank(s) [1]" in console, console
    assert "skipped the optimizer step" in (output_dir / "logs" / "rank1.log").read_text()
    # Rank 1's samples are named; the log file has both ranks' lists, and the ranks saw different samples.
    assert "Samples of rank(s) [1]: rank 1: " in console, console
    (skip,) = read_nonfinite_log(output_dir)
    assert skip["step"] == 3 and skip["loss_ranks"] == [1] and len(skip["origins"]) == 2
    for origins in skip["origins"]:
        assert_real_origins(origins)
    assert not set(skip["origins"][0]) & set(skip["origins"][1]), skip
    assert_same_checkpoint(output_dir / "checkpoint-3", output_dir / "checkpoint-2")
    assert [r["step"] for r in read_metrics(output_dir) if "loss" in r] == [1, 2, 3, 4]


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the torchrun worker with `RANK=rank`, a child of the launcher process."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for child in children:
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None


@pytest.mark.distributed
def test_a_dead_rank_ends_the_launcher_quickly(
    tmp_path: Path, launch_env: dict[str, str], base_model_dir: Path
) -> None:
    output_dir = tmp_path / "run"
    command = torchrun_command(output_dir, "debug=quick", "training.max_steps=200", "training.logging_steps=1")
    log = open(tmp_path / "launcher.out", "w+", encoding="utf-8")  # noqa: SIM115  closed below
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=torchrun_env(launch_env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not any("loss" in r for r in read_metrics(output_dir)):
            assert process.poll() is None and time.monotonic() < deadline, "the run never logged a step"
            time.sleep(0.1)
        victim = worker_pid(process.pid, rank=1)
        assert victim is not None, "no worker with RANK=1 under torchrun"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        status = process.wait(timeout=DEAD_RANK_DEADLINE_S)
        elapsed = time.monotonic() - killed_at
    except subprocess.TimeoutExpired:
        pytest.fail(f"the launcher was still running {DEAD_RANK_DEADLINE_S} s after rank 1 died")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        log.seek(0)
        output = log.read()
        log.close()
    assert status != 0, f"the launcher exited 0 after a rank died\n{describe_run(output, [output_dir / 'logs'])}"
    assert elapsed < DEAD_RANK_DEADLINE_S
    assert "rank    : 1" in output or "local_rank: 1" in output, output[-3000:]
