"""The checkpoint manifest: what a fully written `checkpoint-<step>` holds, and publishing one.

After every rank has written its files into `<output_dir>/.partial/checkpoint-<step>`, rank 0 writes
`checkpoint_manifest.json` (step, world size, ZeRO stage, every file with its size, a SHA-256 of the small
ones), renames the directory to `checkpoint-<step>` (the name users' tools and the Trainer know) and then
updates `<output_dir>/latest_checkpoint`, a one-line file naming it (`publish_checkpoint`). A job killed mid-save
leaves only `.partial/`, which no reader mistakes for a checkpoint. The marker is not named `latest`: DeepSpeed
writes a `latest` file of its own in the directories it saves to.

A checkpoint with a manifest is valid when every file it lists is there with its size (and checksum, for small
files). One without a manifest was written before manifests existed, or by another tool: it is valid when it
holds `trainer_state.json` (the Trainer writes it last) and model weights (`checkpoint_problem`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from core.files import fsync_dir, write_atomic

TRAINER_STATE_FILE = "trainer_state.json"
WEIGHTS_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
MANIFEST_FILE = "checkpoint_manifest.json"
MANIFEST_FORMAT = 1
LATEST_MARKER = "latest_checkpoint"
# Saves in progress live here; its name matches neither `checkpoint-*` (the Trainer's rotation glob) nor
# `checkpoint-<step>`, so nothing reads or rotates a half-written checkpoint.
STAGING_DIR = ".partial"
# Files up to this size get a checksum in the manifest: trainer state, RNG and scheduler states, configs.
# Hashing the multi-GB weights and optimizer shards would add minutes to every save; their size is checked.
CHECKSUM_MAX_BYTES = 1 << 20


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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


def read_manifest(checkpoint: Path, name: str = MANIFEST_FILE) -> dict[str, Any] | None:
    """The checkpoint's manifest (`name` in it), or None when it has none.

    Raises:
        ValueError: a manifest that is not valid JSON or lacks its file list.
    """
    path = checkpoint / name
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable {name} ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{name} has no file list")
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


def publish_checkpoint(staging: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Rank 0, once every rank has written its files into `staging`: manifest, rename, `latest_checkpoint`."""
    write_atomic(staging / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    replaced = staging.with_name(f"{staging.name}.replaced")
    if final.exists():
        # A checkpoint of the same step from an earlier attempt (auto skipped it, or it was resumed before it).
        final.rename(replaced)
    staging.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)
    write_atomic(final.parent / LATEST_MARKER, final.name + "\n")
    if not any(staging.parent.iterdir()):
        staging.parent.rmdir()
