"""Helpers for the launch-script tests: run a script with a deadline, report its logs, check a saved run.

Every launch test runs a script of `launch/` as a user would, from the repo root,
with the interpreter running pytest (`PYTHON`) and a free rendezvous port. On a
failure or a timeout the message carries the tail of the launcher's output and of
every rank's log, so the CI log says which rank failed and why.

Runs that are compared with each other use one configuration, `COMPARABLE_RUN`, and
the 2-rank ZeRO-3 run under the DeepSpeed launcher (`zero3_deepspeed_run`) is made
once per session: the reference for torchrun, DDP, resume and console checks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from launcher.artifacts import METRICS_FILE, read_metrics
from cluster.checkpoints import TRAINER_STATE_FILE
from launcher.config import ModelConfig
from launcher.model import resolve_model_path

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCH_DIR = REPO_ROOT / "launch"
TAIL_LINES = 40
DISTRIBUTED_TIMEOUT_S = 240

# 8 steps, a checkpoint every 4 and a loss logged at each: small enough for CPU ranks, long enough to resume.
COMPARABLE_RUN = (
    "debug=quick",
    "training.max_steps=8",
    "training.save_strategy=steps",
    "training.save_steps=4",
    "training.logging_steps=1",
    "training.eval_strategy=no",
)
NO_HELDOUT = "heldout.file=null"  # rank 0's generations before and after: no effect on training, seconds of time
RESUME_STEP, LAST_STEP = 4, 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def describe_run(output: str, log_dirs: list[Path]) -> str:
    """The tail of the launcher's output and of every `*.log` and `*.out` file in `log_dirs`."""
    parts = [f"--- launcher output (last {TAIL_LINES} lines) ---", tail(output)]
    for log_dir in log_dirs:
        for log in sorted([*log_dir.glob("*.log"), *log_dir.glob("*.out")]):
            parts += [
                f"--- {log} (last {TAIL_LINES} lines) ---",
                tail(log.read_text(encoding="utf-8", errors="replace")),
            ]
    return "\n".join(parts)


def run_script(
    command: list[str], env: dict[str, str], timeout: float, log_dirs: list[Path], cwd: Path = REPO_ROOT
) -> str:
    """Run `command` to completion and return its output; fail the test on a non-zero exit or the deadline.

    It gets a session of its own, so a timeout kills every rank it started, not only the launcher.
    The failure message ends with the tail of the logs in `log_dirs` (each rank's, the job's).
    """
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(command)} did not finish in {timeout:.0f} s\n{describe_run(output, log_dirs)}")
    if process.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited with {process.returncode}\n{describe_run(output, log_dirs)}")
    return output


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The embedded base model, built once here: ranks that race to build it each take several times longer."""
    return Path(resolve_model_path(ModelConfig(cache_dir=str(REPO_ROOT / ".cache" / "models"))))


def launch_environment() -> dict[str, str]:
    """The caller's environment, with this interpreter and a rendezvous port no other test is using."""
    return {**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}


@pytest.fixture
def launch_env() -> dict[str, str]:
    return launch_environment()


@dataclass
class LaunchedRun:
    output_dir: Path
    console: str
    """The launcher's stdout and stderr together, as a user's terminal (or nohup log) shows them."""


@pytest.fixture(scope="session")
def zero3_deepspeed_run(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path) -> LaunchedRun:
    """launch/single_node.sh deepspeed=zero3 on 2 CPU ranks with `COMPARABLE_RUN` and the held-out comparison."""
    output_dir = tmp_path_factory.mktemp("zero3_deepspeed") / "run"
    console = run_script(
        [str(LAUNCH_DIR / "single_node.sh"), "deepspeed=zero3", *COMPARABLE_RUN, f"output_dir={output_dir}"],
        env={**launch_environment(), "NUM_GPUS": "2"},
        timeout=DISTRIBUTED_TIMEOUT_S,
        log_dirs=[output_dir / "logs"],
    )
    return LaunchedRun(output_dir, console)


def check_saved_run(output_dir: Path, base_model_dir: Path, ranks: int) -> None:
    """What a user checks after a run: every rank logged, metrics were written, the model reloads and trained."""
    for rank in range(ranks):
        assert (output_dir / "logs" / f"rank{rank}.log").is_file(), f"rank {rank} wrote no log under {output_dir}/logs"
    metrics = output_dir / METRICS_FILE
    assert metrics.is_file() and metrics.stat().st_size > 0, f"no {METRICS_FILE} in {output_dir}"

    base = AutoModelForCausalLM.from_pretrained(base_model_dir).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(output_dir).state_dict()
    assert saved.keys() == base.keys()
    for name, tensor in saved.items():
        # ZeRO-3 without gathering on save writes empty placeholders: numel 0 and the wrong shape.
        assert tensor.shape == base[name].shape and tensor.numel() > 0, f"{name}: saved {tuple(tensor.shape)}"
    assert any(not torch.equal(saved[name], base[name]) for name in base), "the saved weights are the base model's"
    # train.py compared every saved tensor with the gathered trained parameter (launcher/export.py).
    assert "Verified export" in (output_dir / "logs" / "rank0.log").read_text()


def make_interrupted_copy(finished: Path, interrupted: Path) -> None:
    """What a `COMPARABLE_RUN` killed while saving its last checkpoint leaves in `interrupted`.

    That run is the finished one up to the kill: the same seed and config give the same
    checkpoint-4, and every step was logged to metrics.jsonl. The checkpoint being written
    lacks trainer_state.json (the Trainer writes it last); there is no final model.
    `resume_from_checkpoint=auto` must skip that checkpoint, resume from checkpoint-4, and
    replace the metrics logged after step 4 rather than append a second copy.
    """
    interrupted.mkdir(parents=True)
    shutil.copytree(finished / f"checkpoint-{RESUME_STEP}", interrupted / f"checkpoint-{RESUME_STEP}")
    shutil.copytree(
        finished / f"checkpoint-{LAST_STEP}",
        interrupted / f"checkpoint-{LAST_STEP}",
        ignore=shutil.ignore_patterns(TRAINER_STATE_FILE),
    )
    logged_steps = [r for r in read_metrics(finished) if "loss" in r]
    (interrupted / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in logged_steps))


def step_losses(output_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(output_dir) if "loss" in r]


def assert_same_weights(output_dir: Path, reference_dir: Path, atol: float) -> None:
    """Both saved models reload with `from_pretrained` and every tensor agrees within `atol`."""
    model = AutoModelForCausalLM.from_pretrained(output_dir).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(reference_dir).state_dict()
    assert model.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(model[name], tensor, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def assert_same_training(output_dir: Path, reference_dir: Path, atol: float) -> None:
    """The loss at every step, and the final weights, agree within `atol`; each step was logged once."""
    losses, reference = step_losses(output_dir), step_losses(reference_dir)
    assert [step for step, _ in losses] == list(range(1, LAST_STEP + 1)), f"steps logged in {output_dir}: {losses}"
    assert [step for step, _ in reference] == list(range(1, LAST_STEP + 1)), reference
    torch.testing.assert_close(
        torch.tensor([loss for _, loss in losses], dtype=torch.float64),
        torch.tensor([loss for _, loss in reference], dtype=torch.float64),
        rtol=0,
        atol=atol,
        msg=lambda m: f"per-step losses differ:\n{losses}\n{reference}\n{m}",
    )
    assert_same_weights(output_dir, reference_dir, atol)
