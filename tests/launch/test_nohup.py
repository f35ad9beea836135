"""launch/nohup.sh: a detached run writes its log and PID file, the log grows while it runs, and its exit
status is recorded when it ends (0 for a finished run, the run's own status for a failed one)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.helpers import LAUNCH_DIR, NO_HELDOUT, run_script, tail

pytestmark = pytest.mark.distributed

EXIT_TIMEOUT_S = 180
POLL_S = 0.2


def is_running(pid: int) -> bool:
    """Whether `pid` is alive; a zombie counts as ended (nobody may reap an orphan in a container)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def start(run_name: str, log_dir: Path, launch_env: dict[str, str], *overrides: str) -> Path:
    """Start nohup.sh and return the log file it names in the `tail -f` command it prints."""
    output = run_script(
        [str(LAUNCH_DIR / "nohup.sh"), *overrides],
        env={**launch_env, "RUN_NAME": run_name, "LOG_DIR": str(log_dir)},
        timeout=120,  # cluster.check runs in the foreground first: imports torch, slow on a loaded machine
        log_dirs=[log_dir],
    )
    follow = re.search(r"tail -f (\S+)", output)
    assert follow, f"no `tail -f` command printed:\n{output}"
    log = Path(follow.group(1))
    assert re.fullmatch(rf"{run_name}-\d{{8}}-\d{{6}}\.log", log.name) and log.parent == log_dir, log
    assert str(log.with_suffix(".exit")) in output, output
    return log


def follow_until_exit(log: Path) -> tuple[list[int], str]:
    """Poll the log's size while the run's process lives; then its recorded exit status."""
    pid = int(log.with_suffix(".pid").read_text())
    sizes = []
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while is_running(pid):
        assert time.monotonic() < deadline, (
            f"pid {pid} still running after {EXIT_TIMEOUT_S} s:\n{tail(log.read_text())}"
        )
        sizes.append(log.stat().st_size)
        time.sleep(POLL_S)
    exit_file = log.with_suffix(".exit")
    assert exit_file.is_file(), f"the run ended but wrote no {exit_file.name}:\n{tail(log.read_text())}"
    return sizes, exit_file.read_text().strip()


def test_background_run_log_grows_then_exit_status_is_recorded(tmp_path: Path, launch_env) -> None:
    output_dir = tmp_path / "run"
    overrides = ["debug=quick", "training.logging_steps=1", "training.eval_strategy=no", NO_HELDOUT]
    log = start("quick", tmp_path, launch_env, *overrides, f"output_dir={output_dir}")
    sizes, status = follow_until_exit(log)
    assert len(set(sizes)) >= 3, f"the log did not grow while the run ran (sizes {sorted(set(sizes))})"
    assert status == "0", f"exit status {status}:\n{tail(log.read_text())}"
    text = log.read_text()
    assert "Saved the final model" in text
    assert (output_dir / "model.safetensors").is_file()
    # What `tail -f` shows by default: step lines of at most 200 characters with elapsed time and ETA (lines that
    # name a path grow with it), and no library warnings (they are in the rank's log file).
    step_lines = [line for line in text.splitlines() if " progress: step " in line]
    assert step_lines and all(" | elapsed " in line and " | eta " in line for line in step_lines), step_lines
    assert max(len(line) for line in step_lines) <= 200, max(step_lines, key=len)
    pathless = [line for line in text.splitlines() if str(tmp_path) not in line]
    assert max(len(line) for line in pathless) <= 200, max(pathless, key=len)
    assert "Warning" not in text, [line for line in text.splitlines() if "Warning" in line]
    assert "built successfully" not in text  # DeepSpeed's op-build print (a single-node launch: test_single_node)


def test_failed_background_run_records_its_exit_status(tmp_path: Path, launch_env) -> None:
    # A failure cluster.check cannot see up front: the run starts, then stops on its first non-finite step.
    overrides = ["debug=quick", NO_HELDOUT, f"output_dir={tmp_path / 'run'}"]
    nonfinite = ["resilience.inject_nonfinite_at_steps=[1]", "resilience.max_consecutive_nonfinite=1"]
    log = start("broken", tmp_path, launch_env, *overrides, *nonfinite)
    _, status = follow_until_exit(log)
    assert status == "1", f"exit status {status}:\n{tail(log.read_text())}"
    assert "optimizer steps in a row had a non-finite loss" in log.read_text()
