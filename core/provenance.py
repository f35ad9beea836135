"""Where a measured figure comes from: when, from which commit, by which command, on how loaded a machine.

Every results file the repo keeps (docs/results/) carries this, so a figure README quotes can be traced to the
run that wrote it and judged against the load it ran under.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def provenance(command: list[str] | None = None) -> dict[str, Any]:
    """The date (UTC), the commit (`+dirty` when the tree had changes), the command (this process's by default),
    the 1-minute load average and the core count."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": (commit + ("+dirty" if dirty else "")) or None,
        "command": " ".join(command if command is not None else ["python", *sys.argv]),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
