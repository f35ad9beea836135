"""Helpers for the launch-script tests: run a script with a deadline, report its logs, check a saved run.

Every launch test runs a script of `launch/` as a user would, from the repo root,
with the interpreter running pytest (`PYTHON`) and a free rendezvous port. On a
failure or a timeout the message carries the tail of the launcher's output and of
every rank's log, so the CI log says which rank failed and why.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from launcher.artifacts import METRICS_FILE
from launcher.config import ModelConfig
from launcher.model import resolve_model_path

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCH_DIR = REPO_ROOT / "launch"
TAIL_LINES = 40


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


@pytest.fixture
def launch_env() -> dict[str, str]:
    """The caller's environment, with this interpreter and a rendezvous port no other test is using."""
    return {**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}


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
