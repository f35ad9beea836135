"""An adapter run keeps the full-parameter path's guarantees: resumed from a checkpoint it matches the run that
never stopped, bitwise (loss at every step, adapter weights); a non-finite loss at step 1 (injected) stops it
with the guard naming the step's samples; and the start-up refusals (QLoRA without a GPU, an adapter that adapts
nothing) end with one line and status 2 before anything trains."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.errors import USER_ERROR_EXIT
from modeling.adapter import ADAPTER_WEIGHTS
from tests.helpers import (
    COMPARABLE_RUN,
    EVERY_STEP,
    LAST_STEP,
    NO_HELDOUT,
    REPO_ROOT,
    assert_real_origins,
    make_interrupted_copy,
    read_nonfinite_log,
    run_script,
    run_to_exit,
    step_losses,
)

pytestmark = pytest.mark.slow
LORA = ("model.adapter=lora", "training.learning_rate=1e-2")


def train_command(output_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", NO_HELDOUT, *LORA, f"output_dir={output_dir}", *overrides]


def test_adapter_run_resumes_to_the_same_losses_and_adapter(tmp_path: Path) -> None:
    finished, interrupted = tmp_path / "finished", tmp_path / "interrupted"
    env, logs = dict(os.environ), [finished / "logs"]
    run_script(train_command(finished, *COMPARABLE_RUN), env=env, timeout=240, log_dirs=logs, cwd=REPO_ROOT)
    assert (finished / "checkpoint-4" / ADAPTER_WEIGHTS).is_file(), "the checkpoint holds no adapter"
    make_interrupted_copy(finished, interrupted)
    output = run_script(
        train_command(interrupted, *COMPARABLE_RUN, "training.resume_from_checkpoint=auto"),
        env=env,
        timeout=240,
        log_dirs=[interrupted / "logs"],
        cwd=REPO_ROOT,
    )
    assert "checkpoint-4" in output
    assert step_losses(interrupted) == step_losses(finished)
    assert [step for step, _ in step_losses(finished)] == list(range(1, LAST_STEP + 1))
    resumed, reference = load_file(interrupted / ADAPTER_WEIGHTS), load_file(finished / ADAPTER_WEIGHTS)
    assert resumed.keys() == reference.keys() and reference
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs after the resume"


def test_nonfinite_loss_at_step_one_stops_an_adapter_run_naming_the_samples(tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    command = train_command(
        output_dir,
        *EVERY_STEP,
        "training.max_steps=4",
        "resilience.inject_nonfinite_at_steps=[1]",
        "resilience.max_consecutive_nonfinite=1",
    )
    status, output = run_to_exit(command, output_dir)
    assert status != 0, "the adapter run went on after a non-finite step"
    assert "step 1: skipped the optimizer step (non-finite loss on rank(s) [0]" in output, output
    assert "Samples of rank(s) [0]: rank 0: " in output, output
    assert "stopped at step 1: 1 optimizer steps in a row had a non-finite loss or gradient" in output, output
    (skip,) = read_nonfinite_log(output_dir)
    assert skip["step"] == 1
    assert_real_origins(skip["origins"][0])
    assert not (output_dir / ADAPTER_WEIGHTS).exists(), "a stopped run must not save a final adapter"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model.adapter=qlora",), "model.adapter=qlora needs a CUDA GPU"),
        (("model.lora.target_modules=[no_such_proj]",), "model.lora.target_modules=['no_such_proj']"),
    ],
)
def test_adapter_runs_refused_at_start_up(tmp_path: Path, overrides: tuple[str, ...], message: str) -> None:
    if "qlora" in overrides[0] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: QLoRA is allowed here (tests/modeling/test_qlora_gpu.py)")
    output_dir = tmp_path / "run"
    status, output = run_to_exit(train_command(output_dir, "debug=quick", *overrides), output_dir)
    assert status == USER_ERROR_EXIT, output
    assert message in output, output
    assert "Traceback" not in output, output
    assert not (output_dir / ADAPTER_WEIGHTS).exists()
