"""Checkpoints a run can trust: written atomically, validated on resume, matched to the run that loads them.

Saving (`AtomicCheckpointMixin`, mixed into the Trainer). Every rank writes the Trainer's usual checkpoint
(weights, optimizer and scheduler state, RNG states, `trainer_state.json`; under DeepSpeed each rank's ZeRO
shards in `global_step*/`) into `<output_dir>/.partial/checkpoint-<step>`. After a barrier, rank 0 writes
`checkpoint_manifest.json` (step, world size, ZeRO stage, every file with its size, a SHA-256 of the small
ones), renames the directory to `checkpoint-<step>` (the name users' tools and the Trainer know) and then
updates `<output_dir>/latest_checkpoint`, a one-line file naming it. A job killed mid-save leaves only
`.partial/`, which no reader mistakes for a checkpoint and the next save deletes. The marker is not named
`latest`: DeepSpeed writes a `latest` file of its own in the directories it saves to. `save_total_limit`
rotation runs after the rename, over the published checkpoints only.

Resuming (`training.resume_from_checkpoint`). `null` (or empty) starts fresh. `auto` takes the newest
valid `checkpoint-<step>` under the output directory, or starts fresh when there is none, so one command
both starts a job and resumes it after a requeue or a crash. A checkpoint with a manifest is valid when
every file it lists is there with its size (and checksum, for small files). One without a manifest was
written before manifests existed, or by another tool: it is accepted, with a warning, when it holds
`trainer_state.json` (the Trainer writes it last) and model weights. `auto` skips an invalid checkpoint with
a warning naming it and why. Any other value is a checkpoint path, which must exist.

World size (`check_resume_compatible`, before any rank builds the model). DeepSpeed ZeRO (stages 1-3)
shards the optimizer state over the data-parallel ranks and cannot re-shard it when loading; resuming such
a checkpoint with another number of ranks fails at start-up with the ways out. A plain (DDP or
single-process) checkpoint holds the whole optimizer state, so it resumes on any number of ranks, with a
warning that the global batch and data order differ from the original run's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

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
CHECKPOINT_DIR_PATTERN = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
MANIFEST_FILE = "checkpoint_manifest.json"
MANIFEST_FORMAT = 1
LATEST_MARKER = "latest_checkpoint"
# Saves in progress live here; its name matches neither `checkpoint-*` (the Trainer's rotation glob) nor
# `checkpoint-<step>`, so nothing reads or rotates a half-written checkpoint.
STAGING_DIR = ".partial"
# Files up to this size get a checksum in the manifest: trainer state, RNG and scheduler states, configs.
# Hashing the multi-GB weights and optimizer shards would add minutes to every save; their size is checked.
CHECKSUM_MAX_BYTES = 1 << 20
# DeepSpeed's per-rank ZeRO optimizer shards: `zero_pp_rank_<dp rank>_mp_rank_<mp rank>_optim_states.pt`.
ZERO_SHARD_PATTERN = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")
# Testing aid: the save of this optimizer step stalls after every rank has written its files and before the
# manifest and the rename, so a test can SIGKILL the run at the worst moment (tests/test_checkpoint_kill.py).
STALL_SAVE_ENV = "DFT_TESTING_STALL_CHECKPOINT_AT_STEP"
STALL_MESSAGE = "Testing aid: stalling the save of"


def _log(level: int, message: str, *args: object) -> None:
    # Every rank resolves the same directory: rank 0 tells the console, the others only their own log file.
    logger.log(level if is_rank_zero() else min(level, logging.INFO), message, *args)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fsync_dir(path: Path) -> None:
    # A rename is durable once its directory is synced; without it a node crash can undo a published save.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    """Write `path` through a temporary file, fsync it, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def build_manifest(checkpoint: Path, step: int, world_size: int, zero_stage: int | None) -> dict[str, Any]:
    """The manifest of a fully written checkpoint directory: what `verify_manifest` checks on resume.

    Args:
        checkpoint: the directory, with every rank's files in it.
        step: the optimizer step it was saved at.
        world_size: the number of ranks that trained (and, under ZeRO, sharded the optimizer state).
        zero_stage: the DeepSpeed ZeRO stage, or None without DeepSpeed.
    """
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        size = path.stat().st_size
        entry: dict[str, Any] = {"size": size}
        if size <= CHECKSUM_MAX_BYTES:
            entry["sha256"] = _sha256(path)
        files[path.relative_to(checkpoint).as_posix()] = entry
    return {
        "format": MANIFEST_FORMAT,
        "step": step,
        "world_size": world_size,
        "zero_stage": zero_stage,
        "files": files,
    }


def read_manifest(checkpoint: Path) -> dict[str, Any] | None:
    """The checkpoint's manifest, or None when it has none.

    Raises:
        ValueError: a manifest that is not valid JSON or lacks its file list.
    """
    path = checkpoint / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable {MANIFEST_FILE} ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{MANIFEST_FILE} has no file list")
    return manifest


def verify_manifest(checkpoint: Path, manifest: dict[str, Any]) -> str | None:
    """What differs between `checkpoint` and its manifest (the first problem found), or None."""
    for name, entry in manifest["files"].items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing (listed in {MANIFEST_FILE})"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{name} has {size} bytes, {MANIFEST_FILE} says {entry.get('size')}"
        if "sha256" in entry and _sha256(path) != entry["sha256"]:
            return f"{name} does not match its checksum in {MANIFEST_FILE}"
    return None


def legacy_checkpoint_problem(checkpoint: Path) -> str | None:
    """For a checkpoint without a manifest: what is missing of the trainer state and weights, or None."""
    missing = []
    if not (checkpoint / TRAINER_STATE_FILE).is_file():
        missing.append(TRAINER_STATE_FILE)
    has_weights = any((checkpoint / name).is_file() for name in WEIGHTS_FILES) or any(
        path.is_dir() for path in checkpoint.glob("global_step*")
    )
    if not has_weights:
        missing.append(f"model weights ({' / '.join(WEIGHTS_FILES[:3])} or a DeepSpeed global_step* directory)")
    return f"no {' and no '.join(missing)}" if missing else None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is valid (see the module doc)."""
    try:
        manifest = read_manifest(checkpoint)
    except ValueError as e:
        return str(e)
    if manifest is None:
        return legacy_checkpoint_problem(checkpoint)
    return verify_manifest(checkpoint, manifest)


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


def launch_world_size() -> int:
    """The number of ranks the launcher started (torchrun, the DeepSpeed launcher and accelerate set it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_zero_stage(deepspeed_config: str | Path | None) -> int | None:
    """The ZeRO stage a DeepSpeed JSON asks for (0 when it has none), or None without DeepSpeed."""
    if deepspeed_config is None:
        return None
    config = json.loads(Path(deepspeed_config).read_text(encoding="utf-8"))
    return int((config.get("zero_optimization") or {}).get("stage", 0))


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


def check_resume_compatible(checkpoint: str | None, world_size: int, deepspeed_config: str | None) -> None:
    """Refuse, before the model is built, a resume the Trainer would get wrong or fail at much later.

    Args:
        checkpoint: what `resolve_resume_checkpoint` returned (None: a fresh start, nothing to check).
        world_size: the ranks of this run (`launch_world_size()`).
        deepspeed_config: `deepspeed.config` of this run.

    Raises:
        ValueError: ZeRO-sharded optimizer state saved by another number of ranks, or a checkpoint saved with
            DeepSpeed (or another ZeRO stage) resumed without it; the message gives the ways out.
    """
    if checkpoint is None:
        return
    path = Path(checkpoint)
    try:
        saved_world_size, saved_deepspeed, saved_stage, sharded = _saved_layout(path)
    except ValueError as e:
        raise ValueError(f"training.resume_from_checkpoint={checkpoint!r}: {e}") from e
    stage = deepspeed_zero_stage(deepspeed_config)
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
        return
    if sharded:
        step_dirs = sorted(p.name for p in path.glob("global_step*") if p.is_dir())
        tag = step_dirs[0] if step_dirs else "global_step<N>"
        raise ValueError(
            f"training.resume_from_checkpoint={checkpoint!r}: its {saved_with} optimizer state is sharded over "
            f"{saved_world_size} ranks and this run has {world_size}; DeepSpeed cannot re-shard it on load. "
            f"Resume with {saved_world_size} ranks (NUM_GPUS, or nodes x GPUs per node), "
            f"or convert it to a DeepSpeed universal checkpoint "
            f"(python -m deepspeed.checkpoint.ds_to_universal --input_folder {path / tag} "
            f'--output_folder {path / (tag + "_universal")}, then add "checkpoint": {{"load_universal": true}} '
            f"to the DeepSpeed JSON; not tested with this recipe), {fresh_from_weights}"
        )
    _log(
        logging.WARNING,
        "%s was saved by %d rank(s), this run has %d: the weights, optimizer and LR schedule resume at its step; "
        "keep per_device_train_batch_size x gradient_accumulation_steps x ranks what it was, or the samples each "
        "step sees (and the data skipped as already trained on) differ from the original run's",
        checkpoint,
        saved_world_size,
        world_size,
    )


def publish_checkpoint(staging: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Rank 0, once every rank has written its files into `staging`: manifest, rename, `latest_checkpoint`."""
    _write_durably(staging / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    replaced = staging.with_name(f"{staging.name}.replaced")
    if final.exists():
        # A checkpoint of the same step from an earlier attempt (auto skipped it, or it was resumed before it).
        final.rename(replaced)
    staging.rename(final)
    _fsync_dir(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)
    _write_durably(final.parent / LATEST_MARKER, final.name + "\n")
    if not any(staging.parent.iterdir()):
        staging.parent.rmdir()


class AtomicCheckpointMixin:
    """Trainer mixin: each `checkpoint-<step>` appears whole or not at all (see the module doc).

    Put it before `transformers.Trainer` in the bases. The Trainer's own `_save_checkpoint` does the
    writing, pointed at `.partial/` through `_get_output_dir`; this class publishes the result.
    """

    _staging_run_dir: str | None = None

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging_run_dir is not None:
            return self._staging_run_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = run_dir / STAGING_DIR
        staging, final = staging_root / name, run_dir / name
        if self.args.should_save and staging_root.exists():
            shutil.rmtree(staging_root)  # a save killed earlier: saves run one at a time, so none is in progress
        self.accelerator.wait_for_everyone()  # no rank writes into .partial/ before it is cleared
        self._staging_run_dir = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        if self.state.best_model_checkpoint == os.path.join(staging_root, name):
            # The Trainer recorded the best checkpoint where it wrote it; record where it will be.
            self.state.best_model_checkpoint = str(final)
            if self.args.should_save:
                self.state.save_to_json(str(staging / TRAINER_STATE_FILE))
        self._stall_for_tests(staging)
        self.accelerator.wait_for_everyone()  # every rank's shards are on disk
        if self.args.should_save:
            zero_stage = self.deepspeed.zero_optimization_stage() if self.is_deepspeed_enabled else None
            manifest = build_manifest(staging, self.state.global_step, self.args.world_size, zero_stage)
            publish_checkpoint(staging, final, manifest)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()  # no rank reads checkpoint-<step> before it exists

    def _stall_for_tests(self, staging: Path) -> None:
        if self.args.should_save and os.environ.get(STALL_SAVE_ENV) == str(self.state.global_step):
            logger.warning("%s %s (%s is set)", STALL_MESSAGE, staging, STALL_SAVE_ENV)
            time.sleep(3600)
