"""launch/nohup.sh: a detached run writes its log and PID file, and prints how to follow it."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.launch.conftest import LAUNCH_DIR, run_script

pytestmark = pytest.mark.distributed

EXIT_TIMEOUT_S = 60


def is_running(pid: int) -> bool:
    """Whether `pid` is alive; a zombie counts as ended (nobody may reap an orphan in a container)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_background_run_writes_log_and_pid_file(tmp_path: Path, launch_env) -> None:
    # train.py --help: the whole detached path (nohup, setsid, log, PID file) in seconds, not a training run.
    output = run_script(
        [str(LAUNCH_DIR / "nohup.sh"), "--help"],
        env={**launch_env, "RUN_NAME": "help", "LOG_DIR": str(tmp_path)},
        timeout=30,
        log_dirs=[tmp_path],
    )
    follow = re.search(r"tail -f (\S+)", output)
    assert follow, f"no `tail -f` command printed:\n{output}"
    log = Path(follow.group(1))
    assert re.fullmatch(r"help-\d{8}-\d{6}\.log", log.name) and log.parent == tmp_path, log
    pid = int(log.with_suffix(".pid").read_text())

    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while is_running(pid):
        assert time.monotonic() < deadline, f"pid {pid} still running after {EXIT_TIMEOUT_S} s:\n{log.read_text()}"
        time.sleep(0.5)
    assert "Powered by Hydra" in log.read_text(), log.read_text()
