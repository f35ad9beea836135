"""Which checkpoint a run resumes from (`training.resume_from_checkpoint`), and whether it can.

`null` (or empty) starts fresh. `auto` takes the newest valid `checkpoint-<step>` under the output directory
(`cluster.manifest.checkpoint_problem`), or starts fresh when there is none, so one command both starts a job
and resumes it after a requeue or a crash; it skips an invalid checkpoint with a warning naming it and why. Any
other value is a checkpoint path, which must exist.

World size (`check_resume_compatible`, before any rank builds the model). DeepSpeed ZeRO (stages 1-3)
shards the optimizer state over the data-parallel ranks and cannot re-shard it when loading. A ZeRO checkpoint
saved by another number of ranks is converted to DeepSpeed's universal checkpoint on resume
(`resume_training_config`, cluster/universal.py), which every world size loads with the optimizer state and LR
schedule; one that cannot be converted (no manifest to tell its stage, no DeepSpeed tag directory, a read-only
directory) fails at start-up with the reason and the ways out. A
plain (DDP or single-process) checkpoint holds the whole optimizer state, so it resumes on any number of ranks.
Either way the run warns that the global batch and data order follow the new world size unless
`training.global_batch_size` is set (gradient accumulation then follows the ranks) or the batch settings keep
per_device_train_batch_size x gradient_accumulation_steps x ranks what it was.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from cluster.manifest import (
    MANIFEST_FILE,
    STAGING_DIR,
    TRAINER_STATE_FILE,
    WEIGHTS_FILES,
    checkpoint_problem,
    read_manifest,
)
from cluster.universal import conversion_problem, load_universal_config, universal_checkpoint
from config.deepspeed import zero_stage
from core.ranks import is_rank_zero

logger = logging.getLogger(__name__)

AUTO = "auto"
CHECKPOINT_DIR_PATTERN = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
# DeepSpeed's per-rank ZeRO optimizer shards: `zero_pp_rank_<dp rank>_mp_rank_<mp rank>_optim_states.pt`.
ZERO_SHARD_PATTERN = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")


def _log(level: int, message: str, *args: object) -> None:
    # Every rank resolves the same directory: rank 0 tells the console, the others only their own log file.
    logger.log(level if is_rank_zero() else min(level, logging.INFO), message, *args)


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
    """The newest valid checkpoint under `output_dir`; invalid newer ones are skipped with a warning."""
    staging = Path(output_dir) / STAGING_DIR
    for partial in sorted(staging.iterdir()) if staging.is_dir() else []:
        _log(logging.WARNING, "Ignoring %s: a checkpoint save that did not finish (the next save deletes it)", partial)
    for checkpoint in find_checkpoints(output_dir):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            _warn_if_legacy(checkpoint)
            return checkpoint
        _log(logging.WARNING, "Skipping incomplete checkpoint %s: %s (interrupted while saving?)", checkpoint, problem)
    return None


def _warn_if_legacy(checkpoint: Path) -> None:
    if not (checkpoint / MANIFEST_FILE).is_file():
        _log(
            logging.WARNING,
            "%s has no %s (saved before manifests existed, or by another tool): only checked for %s and weights",
            checkpoint,
            MANIFEST_FILE,
            TRAINER_STATE_FILE,
        )


def resolve_resume_checkpoint(value: str | None, output_dir: str | Path) -> str | None:
    """The checkpoint `trainer.train(resume_from_checkpoint=...)` should get for `training.resume_from_checkpoint`.

    Args:
        value: null or "" (start fresh), "auto" (newest valid checkpoint under `output_dir`, else
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
    else:
        _warn_if_legacy(path)
    return str(path)


def saved_model(output_dir: str | Path) -> Path | None:
    """The final model's weights file a finished run left in `output_dir`, or None: what a new run there replaces."""
    return next((path for name in WEIGHTS_FILES if (path := Path(output_dir) / name).is_file()), None)


def _saved_layout(checkpoint: Path) -> tuple[int | None, bool, int | None, bool]:
    """(world size, saved with DeepSpeed?, ZeRO stage, optimizer state sharded?) of a checkpoint.

    From its manifest; without one, from its files: the world size is then the number of ZeRO optimizer
    shards or per-rank RNG files (None when they do not say) and the ZeRO stage is unknown (None).
    """
    shard_ranks = {
        int(match.group(1))
        for path in checkpoint.glob("global_step*/*")
        if (match := ZERO_SHARD_PATTERN.fullmatch(path.name))
    }
    manifest = read_manifest(checkpoint)
    if manifest is not None:
        stage = manifest.get("zero_stage")
        return manifest.get("world_size"), stage is not None, stage, bool(shard_ranks)
    rng_files = list(checkpoint.glob("rng_state_*.pth"))
    world_size = len(shard_ranks) or len(rng_files) or (1 if (checkpoint / "rng_state.pth").is_file() else None)
    return world_size, any(checkpoint.glob("global_step*")), None, bool(shard_ranks)


def check_resume_compatible(
    checkpoint: str | None, world_size: int, deepspeed_config: str | None, keeps_global_batch: bool = False
) -> bool:
    """Refuse, before the model is built, a resume the Trainer would get wrong or fail at much later.

    Args:
        checkpoint: what `resolve_resume_checkpoint` returned (None: a fresh start, nothing to check).
        world_size: the ranks of this run (`launch_world_size()`).
        deepspeed_config: `deepspeed.config` of this run.
        keeps_global_batch: `training.global_batch_size` is set, so the batch per step stays what it was and a
            change of world size needs no warning about it.

    Returns:
        Whether the resume goes through a universal checkpoint: ZeRO optimizer state saved by another number of
        ranks (`resume_training_config` converts it).

    Raises:
        ValueError: ZeRO-sharded optimizer state saved by another number of ranks that cannot be converted, or a
            checkpoint saved with DeepSpeed (or another ZeRO stage) resumed without it; the message gives the
            reason and the ways out.
    """
    if checkpoint is None:
        return False
    path = Path(checkpoint)
    try:
        saved_world_size, saved_deepspeed, saved_stage, sharded = _saved_layout(path)
    except ValueError as e:
        raise ValueError(f"training.resume_from_checkpoint={checkpoint!r}: {e}") from e
    stage = zero_stage(deepspeed_config)
    saved_with = "DeepSpeed" if saved_deepspeed else "no DeepSpeed"
    if saved_stage is not None:
        saved_with = f"DeepSpeed ZeRO-{saved_stage}"
    fresh_from_weights = (
        f"or start a new run from its weights (optimizer state and LR schedule start over): "
        f"model.name_or_path={checkpoint} training.resume_from_checkpoint=null"
    )
    if saved_deepspeed != (stage is not None) or (saved_stage is not None and saved_stage != stage):
        running_with = "no DeepSpeed" if stage is None else f"DeepSpeed ZeRO-{stage}"
        raise ValueError(
            f"training.resume_from_checkpoint={checkpoint!r}: saved with {saved_with}, this run has {running_with} "
            f"(deepspeed.config={deepspeed_config}), which stores the optimizer state differently. Resume with the "
            f"deepspeed choice it was saved with, {fresh_from_weights}"
        )
    if saved_world_size is None or saved_world_size == world_size:
        return False
    if sharded and (problem := conversion_problem(path, saved_stage)) is not None:
        raise ValueError(
            f"training.resume_from_checkpoint={checkpoint!r}: its {saved_with} optimizer state is sharded over "
            f"{saved_world_size} ranks and this run has {world_size}; DeepSpeed cannot re-shard it on load, and it "
            f"cannot be converted to a universal checkpoint: {problem}. Resume with {saved_world_size} ranks "
            f"(NUM_GPUS, or nodes x GPUs per node), {fresh_from_weights}"
        )
    how = " through a DeepSpeed universal checkpoint (its ZeRO shards re-sharded)" if sharded else ""
    if keeps_global_batch:
        batch = "; the global batch stays training.global_batch_size (gradient accumulation follows the ranks)"
        level = logging.INFO
    else:
        batch = (
            "; keep per_device_train_batch_size x gradient_accumulation_steps x ranks what it was (or set "
            "training.global_batch_size), or the samples each step sees (and the data skipped as already trained on) "
            "differ from the original run's"
        )
        level = logging.WARNING
    _log(
        level,
        "%s was saved by %d rank(s), this run has %d: the weights, optimizer and LR schedule resume at its step%s%s",
        checkpoint,
        saved_world_size,
        world_size,
        how,
        batch,
    )
    return sharded


def resume_training_config(training: Any, checkpoint: str | None, world_size: int, deepspeed_config: str | None) -> Any:
    """`training` (the run's `training.*`), or, when `checkpoint` is a ZeRO checkpoint of another world size
    (`check_resume_compatible`), the same with its universal conversion made (cluster/universal.py: the first rank
    to get there converts, the others wait and reuse it) and `deepspeed` set to load it.

    Raises:
        ValueError: the conversion failed or is impossible (the reason and the ways out).
    """
    keeps_global_batch = training.global_batch_size is not None
    if not check_resume_compatible(checkpoint, world_size, deepspeed_config, keeps_global_batch):
        return training
    converted, seconds = universal_checkpoint(checkpoint)
    made = (
        "found its conversion (made by another rank or run)" if seconds is None else f"converted it in {seconds:.1f} s"
    )
    _log(
        logging.INFO,
        "Resuming on %d rank(s) a checkpoint of %d: %s, %s (a DeepSpeed universal checkpoint, loaded re-sharded)",
        world_size,
        _saved_layout(Path(checkpoint))[0],
        made,
        converted,
    )
    return dataclasses.replace(training, deepspeed=load_universal_config(deepspeed_config))
