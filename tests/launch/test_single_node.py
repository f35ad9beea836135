"""launch/single_node.sh: two CPU ranks under the DeepSpeed launcher with ZeRO-3, saved weights gathered.

The tests share one run, `zero3_deepspeed_run` (tests/conftest.py): its saved model,
its console, and its checkpoint-4 for a resume.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import (
    COMPARABLE_RUN,
    DISTRIBUTED_TIMEOUT_S,
    LAST_STEP,
    LAUNCH_DIR,
    NO_HELDOUT,
    RESUME_STEP,
    LaunchedRun,
    assert_same_training,
    check_saved_run,
    make_interrupted_copy,
    run_script,
)

pytestmark = pytest.mark.distributed

# A line of our log format (observability/rank_logging.py), with the "[rank N] " prefix ranks other than 0 add.
LOG_LINE = re.compile(r"^(?P<prefix>\[rank \d+\] )?\d{4}-\d\d-\d\d [\d:,]+ (?P<level>[A-Z]+) (?P<message>.*)$")


def test_zero3_two_cpu_ranks_save_a_model_that_reloads(zero3_deepspeed_run: LaunchedRun, base_model_dir: Path) -> None:
    check_saved_run(zero3_deepspeed_run.output_dir, base_model_dir, ranks=2)
    assert (zero3_deepspeed_run.output_dir / "heldout.txt").is_file(), "rank 0 wrote no held-out comparison"


def test_console_shows_each_message_once_and_rank1_logs_to_its_file(zero3_deepspeed_run: LaunchedRun) -> None:
    console, logs = zero3_deepspeed_run.console, zero3_deepspeed_run.output_dir / "logs"
    lines = [match for line in console.splitlines() if (match := LOG_LINE.match(line))]
    assert lines, f"no log line on the console:\n{console[-3000:]}"
    rank_info = [m.group(0) for m in lines if m.group("prefix") and m.group("level") == "INFO"]
    assert not rank_info, "ranks other than 0 logged INFO to the console:\n" + "\n".join(rank_info[:10])
    for message in ("Saved the final model", "Output directory", "Data:"):
        count = sum(message in m.group("message") for m in lines)
        assert count == 1, f"{message!r} on the console {count} times, expected once"

    # DeepSpeed's op-build print and the libraries' Python warnings are in the rank files, not on the console.
    assert "built successfully" not in console, [line for line in console.splitlines() if "built successfully" in line]
    assert "built successfully" in (logs / "rank0.log").read_text(), "DeepSpeed's op-build print was lost"
    assert "Warning" not in console, [line for line in console.splitlines() if "Warning" in line]

    rank1 = (logs / "rank1.log").read_text()
    assert f"(log {logs / 'rank1.log'})" in rank1, "rank1.log does not hold rank 1's own start-up line"
    assert "INFO train: Data:" in rank1, rank1[-2000:]
    assert str(logs / "rank1.log") not in console, "rank 1's INFO lines reached the console"


def test_zero3_two_ranks_resumed_run_matches_uninterrupted(
    zero3_deepspeed_run: LaunchedRun, tmp_path: Path, launch_env
):
    interrupted = tmp_path / "interrupted"
    make_interrupted_copy(zero3_deepspeed_run.output_dir, interrupted)
    overrides = [*COMPARABLE_RUN, NO_HELDOUT, "training.resume_from_checkpoint=auto", f"output_dir={interrupted}"]
    output = run_script(
        [str(LAUNCH_DIR / "single_node.sh"), "deepspeed=zero3", *overrides],
        env={**launch_env, "NUM_GPUS": "2"},
        timeout=DISTRIBUTED_TIMEOUT_S,
        log_dirs=[interrupted / "logs"],
    )
    assert f"resuming from {interrupted / f'checkpoint-{RESUME_STEP}'}" in output, output[-3000:]
    assert f"Skipping incomplete checkpoint {interrupted / f'checkpoint-{LAST_STEP}'}" in output, output[-3000:]
    # Bitwise equal in practice here (gloo on CPU, the same ranks reducing in the same order); 1e-6 (8 eps relative
    # to a loss near 1) leaves room for another reduction order of a step's last collectives only: a resume that
    # repeats or skips a batch, or resets Adam or the schedule, moves a step's loss by 1e-3 or more.
    assert_same_training(interrupted, zero3_deepspeed_run.output_dir, atol=1e-6)
