"""Which checkpoint a run resumes from: `training.resume_from_checkpoint` made usable on a cluster.

`null` (or empty) starts fresh. `auto` takes the newest *complete* `checkpoint-<step>`
directory under the output directory, or starts fresh when there is none, so one
command both starts a job and resumes it after a requeue or a crash. A checkpoint is
complete when it holds `trainer_state.json` (the Trainer writes it last) and model
weights: a `model.safetensors`/`pytorch_model.bin` file or index, or DeepSpeed's
`global_step*` shards. A job killed while saving leaves an incomplete one; `auto` skips
it with a warning naming it. Any other value is a checkpoint path, which must exist.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from launcher.distributed import is_rank_zero

logger = logging.getLogger(__name__)

AUTO = "auto"
TRAINER_STATE_FILE = "trainer_state.json"
WEIGHTS_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
CHECKPOINT_DIR_PATTERN = re.compile(r"checkpoint-(\d+)")


def _log(level: int, message: str, *args: object) -> None:
    # Every rank resolves the same directory: rank 0 tells the console, the others only their own log file.
    logger.log(level if is_rank_zero() else min(level, logging.INFO), message, *args)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (what is missing), or None when it is complete."""
    missing = []
    if not (checkpoint / TRAINER_STATE_FILE).is_file():
        missing.append(TRAINER_STATE_FILE)
    has_weights = any((checkpoint / name).is_file() for name in WEIGHTS_FILES) or any(
        path.is_dir() for path in checkpoint.glob("global_step*")
    )
    if not has_weights:
        missing.append(f"model weights ({' / '.join(WEIGHTS_FILES[:3])} or a DeepSpeed global_step* directory)")
    return f"no {' and no '.join(missing)}" if missing else None


def find_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every `checkpoint-<step>` directory under `output_dir`, newest (highest step) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in output_dir.iterdir()
        if path.is_dir() and (match := CHECKPOINT_DIR_PATTERN.fullmatch(path.name))
    ]
    return [path for _, path in sorted(found, reverse=True)]


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `output_dir`; incomplete newer ones are skipped with a warning."""
    for checkpoint in find_checkpoints(output_dir):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        _log(logging.WARNING, "Skipping incomplete checkpoint %s: %s (interrupted while saving?)", checkpoint, problem)
    return None


def resolve_resume_checkpoint(value: str | None, output_dir: str | Path) -> str | None:
    """The checkpoint `trainer.train(resume_from_checkpoint=...)` should get for `training.resume_from_checkpoint`.

    Args:
        value: null or "" (start fresh), "auto" (newest complete checkpoint under `output_dir`, else
            start fresh), or the path of a checkpoint directory.
        output_dir: the run's output directory, where the Trainer writes `checkpoint-<step>`.

    Returns:
        The checkpoint directory as a string, or None to start from step 0.

    Raises:
        ValueError: an explicit path that does not exist or is not a directory.
    """
    if value is None or value == "":
        return None
    if value == AUTO:
        checkpoint = latest_complete_checkpoint(output_dir)
        if checkpoint is None:
            _log(logging.INFO, "resume_from_checkpoint=auto: no complete checkpoint in %s, starting fresh", output_dir)
            return None
        _log(logging.INFO, "resume_from_checkpoint=auto: resuming from %s", checkpoint)
        return str(checkpoint)
    path = Path(value)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ValueError(
            f"training.resume_from_checkpoint={value!r}: {what} (relative paths start at the launch directory); "
            f"give a checkpoint-<step> directory, 'auto' for the newest one in output_dir, or null to start fresh"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        _log(logging.WARNING, "training.resume_from_checkpoint=%s looks incomplete: %s", value, problem)
    return str(path)
