"""Resume = uninterrupted, bitwise, on one rank: a run cut off and restarted with `resume_from_checkpoint=auto`.

The run is 8 steps with a checkpoint every 4 (`COMPARABLE_RUN`). Resumed from checkpoint-4, a run must log
the same loss at every step and save the same weights as the run that never stopped, to the bit: the
Trainer restores the optimizer, scheduler and RNG states and skips the batches already trained on, so the
data order and the LR schedule continue where they were. Two ways to be cut off:

- killed with SIGKILL in the middle of saving checkpoint-8 (the test runs train.py through
  `tests.helpers.stalled_save_command`, which holds the save after every file is written and before the
  manifest and the rename): the files are all in `.partial/checkpoint-8`, which `auto` ignores, and the
  resumed run republishes checkpoint-8 whole;
- a checkpoint-8 whose files do not match its manifest (its trainer_state.json missing), as a disk
  problem or a copy cut short leaves it: `auto` skips it.

The 2-rank ZeRO-3 variant is in tests/launch/test_single_node.py (it reuses the session's ZeRO-3 run);
`auto` with no checkpoint yet is what the Slurm test's fresh job runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.manifest import LATEST_MARKER, STAGING_DIR, checkpoint_problem
from tests.helpers import (
    COMPARABLE_RUN,
    LAST_STEP,
    NO_HELDOUT,
    REPO_ROOT,
    RESUME_STEP,
    STALL_MESSAGE,
    assert_same_training,
    describe_run,
    make_interrupted_copy,
    run_script,
    stalled_save_command,
)

TIMEOUT_S = 240
pytestmark = pytest.mark.slow


def train_overrides(output_dir: Path, *overrides: str) -> list[str]:
    return [*COMPARABLE_RUN, NO_HELDOUT, f"output_dir={output_dir}", *overrides]


def train_command(output_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", *train_overrides(output_dir, *overrides)]


def train(output_dir: Path, *overrides: str) -> str:
    command = train_command(output_dir, *overrides)
    return run_script(command, env=dict(os.environ), timeout=TIMEOUT_S, log_dirs=[output_dir / "logs"], cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, the reference of every test here."""
    output_dir = tmp_path_factory.mktemp("resume") / "finished"
    train(output_dir)
    return output_dir


def kill_while_saving(output_dir: Path, step: int, log_path: Path) -> str:
    """Run `COMPARABLE_RUN`, SIGKILL it once the save of `step` has written every file; return its output."""
    with open(log_path, "w+", encoding="utf-8") as log:
        process = subprocess.Popen(
            stalled_save_command(step, *train_overrides(output_dir)),
            cwd=REPO_ROOT,
            env=dict(os.environ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while STALL_MESSAGE not in log_path.read_text(encoding="utf-8"):
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"the run never stalled in the save of step {step} (status {process.poll()})\n"
                        + describe_run(log_path.read_text(encoding="utf-8"), [output_dir / "logs"])
                    )
                time.sleep(0.1)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        return log_path.read_text(encoding="utf-8")


def test_kill_9_while_saving_leaves_a_run_that_resumes_from_the_previous_checkpoint(
    finished: Path, tmp_path: Path
) -> None:
    killed = tmp_path / "killed"
    kill_while_saving(killed, LAST_STEP, tmp_path / "killed.out")
    partial = killed / STAGING_DIR / f"checkpoint-{LAST_STEP}"
    assert (partial / "trainer_state.json").is_file(), "the kill came before the save wrote its files"
    assert not (killed / f"checkpoint-{LAST_STEP}").exists(), f"checkpoint-{LAST_STEP} was published before the kill"
    assert checkpoint_problem(killed / f"checkpoint-{RESUME_STEP}") is None
    assert (killed / LATEST_MARKER).read_text() == f"checkpoint-{RESUME_STEP}\n"

    output = train(killed, "training.resume_from_checkpoint=auto")
    assert f"Ignoring {partial}: a checkpoint save that did not finish" in output, output
    assert f"resuming from {killed / f'checkpoint-{RESUME_STEP}'}" in output, output
    assert f"step {RESUME_STEP}/{LAST_STEP} " not in output, f"the resumed run trained step {RESUME_STEP} again"
    assert not (killed / STAGING_DIR).exists(), "the interrupted save was not cleaned up"
    assert checkpoint_problem(killed / f"checkpoint-{LAST_STEP}") is None
    assert (killed / LATEST_MARKER).read_text() == f"checkpoint-{LAST_STEP}\n"
    # 4 steps, killed, resumed, 4 steps = 8 steps straight: every loss and weight, bit for bit.
    assert_same_training(killed, finished, atol=0)


def test_resume_skips_a_checkpoint_that_does_not_match_its_manifest(finished: Path, tmp_path: Path) -> None:
    interrupted = tmp_path / "interrupted"
    make_interrupted_copy(finished, interrupted)

    output = train(interrupted, "training.resume_from_checkpoint=auto")
    skipped = interrupted / f"checkpoint-{LAST_STEP}"
    assert f"Skipping incomplete checkpoint {skipped}: trainer_state.json is missing" in output, output
    assert f"resuming from {interrupted / f'checkpoint-{RESUME_STEP}'}" in output, output
    assert f"step {RESUME_STEP}/{LAST_STEP} " not in output, f"the resumed run trained step {RESUME_STEP} again"
    # One process, the same float32 operations in the same order, everything restored: bit for bit, no tolerance.
    assert_same_training(interrupted, finished, atol=0)
