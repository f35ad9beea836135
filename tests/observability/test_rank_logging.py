"""What reaches rank 0's console and what only its log file: the run's lines on both; libraries' notes (Python
warnings, DeepSpeed's logger and prints, accelerate's gradient-accumulation remark) in the file only; every
library's errors on both."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import deepspeed  # noqa: F401  (creates DeepSpeed's logger with its own stdout handler, as in a run)
import pytest

from observability.rank_logging import library_prints_to_log, setup_logging


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Rank 0, and the test process's logging state as it was once the test has called setup_logging."""
    monkeypatch.setenv("RANK", "0")
    root, deepspeed_logger = logging.getLogger(), logging.getLogger("DeepSpeed")
    saved = (list(root.handlers), root.level, list(deepspeed_logger.handlers), deepspeed_logger.propagate)
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    deepspeed_logger.handlers[:] = saved[2]
    deepspeed_logger.propagate = saved[3]
    logging.captureWarnings(False)


def test_library_notes_go_to_the_file_and_errors_to_both(
    tmp_path: Path, restore_logging: None, capsys: pytest.CaptureFixture
) -> None:
    log_path = setup_logging(tmp_path)  # here, not in a fixture: its console is the test's captured stdout
    logging.getLogger("train").info("the run's own line")
    logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU.")
    logging.getLogger("accelerate.accelerator").warning(
        "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed config has 2."
    )
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("`torch.distributed` will change", FutureWarning, stacklevel=1)
    with library_prints_to_log():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("a partial line without its newline", end="")
    logging.getLogger("DeepSpeed").error("a DeepSpeed error")
    logging.getLogger("accelerate.accelerator").warning("a warning accelerate means for the user")

    console = capsys.readouterr().out
    log_file = log_path.read_text()
    for file_only in (
        "Setting accelerator to CPU",
        "Gradient accumulation steps mismatch",
        "will change",
        "built successfully",
        "a partial line",
    ):
        assert file_only not in console, f"{file_only!r} reached the console:\n{console}"
        assert file_only in log_file, f"{file_only!r} missing from {log_path}:\n{log_file}"
    for both in ("the run's own line", "a DeepSpeed error", "a warning accelerate means for the user"):
        assert both in console and both in log_file, f"{both!r}: console\n{console}\nfile\n{log_file}"
    assert console.count("a DeepSpeed error") == 1, "DeepSpeed's own handler still prints too"
