"""Resuming a ZeRO checkpoint (stages 1-3) on another number of ranks, through DeepSpeed's universal checkpoint.

ZeRO splits each parameter's fp32 master weight and Adam moments (`exp_avg`, `exp_avg_sq`) over the ranks that
saved them: rank r's `global_step<N>/zero_pp_rank_<r>_mp_rank_00_optim_states.pt` holds the r-th slice of the
flattened parameters, and DeepSpeed loads those files only with the same number of ranks. Its
`deepspeed.checkpoint.ds_to_universal` (ZeRO-3 included, in the DeepSpeed this project pins) joins the slices back
into one file per parameter and state, `<tag>_universal/zero/<parameter>/{fp32,exp_avg,exp_avg_sq}.pt`, plus
`zero/optimizer_state.pt` (Adam's step and hyper-parameters), and copies the model-state files, which hold the LR
scheduler's state. An engine whose DeepSpeed JSON says `"checkpoint": {"load_universal": true}` reads the tag that
`<checkpoint>/latest_universal` names and cuts its own slice of each file for its own world size. The Trainer's
state (step, data position) is in `trainer_state.json`, as for any resume.

`universal_checkpoint` makes that conversion once per checkpoint, in the checkpoint's directory: under a file lock
(`<checkpoint>/.universal.lock`, so concurrent ranks and nodes on a shared filesystem convert it once; the others
wait for the lock and reuse the result) into `<checkpoint>/.universal-staging/`, with a manifest
(`universal_manifest.json`: every file and its size, the source tag, world size and step, the DeepSpeed version),
then renamed to `<checkpoint>/<tag>_universal` before `latest_universal` names it. A killed conversion leaves only
the staging directory, removed by the next one; a later resume reuses a conversion whose manifest checks out.
It takes about as much disk again as the checkpoint's optimizer shards.

ZeRO-1/2 checkpoints go through DeepSpeed's ZeRO-1/2 conversion, which expects the universal-checkpoint info that
Megatron-DeepSpeed's models record (their tensor- and pipeline-parallel layouts) and transformers' do not: its
`--inject_missing_state` stub says there is no such layout, which is true of this recipe's data-parallel runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from transformers import TrainerCallback

from cluster.manifest import build_manifest, read_manifest, verify_manifest
from config.deepspeed import check_deepspeed_config
from core.files import fsync_dir, write_atomic

UNIVERSAL_SUFFIX = "_universal"
LATEST_UNIVERSAL = "latest_universal"  # the file DeepSpeed's engine reads the universal tag from
DEEPSPEED_LATEST = "latest"  # the file DeepSpeed writes beside the tag it saved
UNIVERSAL_MANIFEST = "universal_manifest.json"
STAGING = ".universal-staging"
LOCK = ".universal.lock"
CONVERTIBLE_STAGES = (1, 2, 3)
TAIL_LINES = 20


def deepspeed_tag(checkpoint: Path) -> str | None:
    """The DeepSpeed tag (`global_step<N>`) a checkpoint's `latest` file names, or its one `global_step*` directory."""
    latest = checkpoint / DEEPSPEED_LATEST
    if latest.is_file():
        return latest.read_text(encoding="utf-8").strip()
    tags = [p.name for p in checkpoint.glob("global_step*") if p.is_dir() and not p.name.endswith(UNIVERSAL_SUFFIX)]
    return tags[0] if len(tags) == 1 else None


def conversion_problem(checkpoint: Path, saved_stage: int | None) -> str | None:
    """Why `checkpoint`'s ZeRO optimizer state cannot be converted to a universal checkpoint here, or None."""
    if saved_stage not in CONVERTIBLE_STAGES:
        saved = "an unknown ZeRO stage (no checkpoint_manifest.json)" if saved_stage is None else f"ZeRO-{saved_stage}"
        return (
            f"it was saved with {saved}, and only ZeRO stages {', '.join(map(str, CONVERTIBLE_STAGES))} checkpoints "
            "are converted to DeepSpeed's universal format"
        )
    tag = deepspeed_tag(checkpoint)
    if tag is None or not (checkpoint / tag).is_dir():
        return f"it has no DeepSpeed tag directory to convert ({DEEPSPEED_LATEST} names {tag!r})"
    if universal_dir(checkpoint) is None and not os.access(checkpoint, os.W_OK | os.X_OK):
        return f"its universal conversion is written into the checkpoint directory, and {checkpoint} is not writable"
    return None


def universal_dir(checkpoint: Path) -> Path | None:
    """The universal conversion `latest_universal` names in `checkpoint`, when its manifest checks out; else None."""
    latest = checkpoint / LATEST_UNIVERSAL
    if not latest.is_file():
        return None
    converted = checkpoint / latest.read_text(encoding="utf-8").strip()
    try:
        manifest = read_manifest(converted, UNIVERSAL_MANIFEST)
    except ValueError:
        return None
    if manifest is None or verify_manifest(converted, manifest) is not None:
        return None
    return converted


def _convert(checkpoint: Path, tag: str, staging: Path) -> None:
    """`ds_to_universal` of `checkpoint/tag` into `staging/<tag>_universal`, with its manifest."""
    output = staging / f"{tag}{UNIVERSAL_SUFFIX}"
    workers = str(max(1, min(4, len(os.sched_getaffinity(0)))))
    command = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint / tag),
        "--output_folder", str(output), "--num_extract_workers", workers, "--num_merge_workers", workers,
        # ZeRO-1/2: the universal-checkpoint info Megatron-DeepSpeed's models record (tensor- and pipeline-parallel
        # layouts) and transformers' do not; its stub says "no such layout", which is the case here. ZeRO-3 ignores it.
        "--inject_missing_state",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-TAIL_LINES:])
        raise ValueError(
            f"training.resume_from_checkpoint={str(checkpoint)!r}: DeepSpeed's universal conversion of {tag} failed "
            f"(exit {result.returncode}; `{' '.join(command)}` shows it again):\n{tail}\nResume with the number of "
            f"ranks that saved it, or start a new run from its weights (model.name_or_path={checkpoint} "
            "training.resume_from_checkpoint=null)"
        )
    source = read_manifest(checkpoint) or {}
    manifest = build_manifest(output, source.get("step"), source.get("world_size"), source.get("zero_stage"))
    manifest["source_tag"] = tag
    manifest["converted_by"] = f"deepspeed {version('deepspeed')} ds_to_universal"
    write_atomic(output / UNIVERSAL_MANIFEST, json.dumps(manifest, indent=1) + "\n")


def universal_checkpoint(checkpoint: str | Path) -> tuple[Path, float | None]:
    """The universal conversion of a ZeRO checkpoint, made now unless a valid one is there (see the module doc).

    Args:
        checkpoint: a `checkpoint-<step>` directory that `conversion_problem` accepts.

    Returns:
        The `<tag>_universal` directory, and the seconds this call spent converting (None: it was there already,
        made by another rank or an earlier run).

    Raises:
        ValueError: DeepSpeed's conversion failed (its output's tail, and the ways out).
    """
    checkpoint = Path(checkpoint)
    if (ready := universal_dir(checkpoint)) is not None:
        return ready, None
    with FileLock(str(checkpoint / LOCK)):
        if (ready := universal_dir(checkpoint)) is not None:
            return ready, None
        tag = deepspeed_tag(checkpoint)
        if tag is None:
            raise ValueError(f"{checkpoint}: no DeepSpeed tag to convert ({DEEPSPEED_LATEST} is missing)")
        started = time.monotonic()
        staging = checkpoint / STAGING
        shutil.rmtree(staging, ignore_errors=True)  # a conversion killed earlier
        staging.mkdir()
        _convert(checkpoint, tag, staging)
        final = checkpoint / f"{tag}{UNIVERSAL_SUFFIX}"
        shutil.rmtree(final, ignore_errors=True)  # an earlier conversion whose manifest no longer checks out
        (staging / final.name).rename(final)
        fsync_dir(checkpoint)
        write_atomic(checkpoint / LATEST_UNIVERSAL, final.name + "\n")
        shutil.rmtree(staging)
        return final, time.monotonic() - started


def load_universal_config(deepspeed_config: str | Path) -> dict[str, Any]:
    """The run's DeepSpeed JSON with `"checkpoint": {"load_universal": true}`: the engine then loads the tag that
    `latest_universal` names, re-sharded for its own world size."""
    config = check_deepspeed_config(deepspeed_config) or {}
    return {**config, "checkpoint": {**(config.get("checkpoint") or {}), "load_universal": True}}


class UntieUniversalOptimizerSteps(TrainerCallback):
    """Give each parameter group's Adam state its own `step` tensor after a universal load.

    DeepSpeed 0.19.8's ZeRO-3 universal load (`load_hp_checkpoint_state_from_checkpoint_dir_stage3` in
    runtime/zero/stage3.py) stores one `step` tensor object in the state of every parameter group, and torch's AdamW
    adds 1 to each group's step in place: with the Trainer's two groups (with and without weight decay) the shared
    step advanced by 2 per update and Adam's bias correction drifted (losses off by 2e-4 three steps after a resume
    that is otherwise exact). The checkpoint is loaded before `on_train_begin`; a step shared with an earlier state
    is replaced by its own copy there. Nothing is shared after any other load, so nothing changes then.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        while getattr(optimizer, "optimizer", None) is not None:  # accelerate's wrapper, then DeepSpeed's ZeRO-3
            optimizer = optimizer.optimizer
        seen: set[int] = set()
        for param_state in getattr(optimizer, "state", {}).values():
            step = param_state.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    param_state["step"] = step.clone()
                seen.add(id(step))
