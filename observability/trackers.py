"""Experiment trackers (`logger` config group): SwanLab, WandB, TensorBoard or none.

Only rank 0 starts a tracker (the callbacks check `is_world_process_zero`
themselves); files go under `<output_dir>/trackers/` so offline runs can be
synced later. The run's resolved config is attached to the tracker run with
secrets redacted; API keys are read from the environment by the libraries and
never written anywhere by this project.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback, WandbCallback

from config.schema import RunConfig


def tracker_callbacks(run: RunConfig, run_config: dict[str, Any]) -> list[TrainerCallback]:
    """The tracker callback of `logger.backend`; `run_config` is the resolved, redacted config."""
    backend = run.logger.backend
    if backend == "none":
        return []
    tracker_dir = Path(run.output_dir) / "trackers"
    tracker_dir.mkdir(parents=True, exist_ok=True)
    run_name = run.logger.run_name or Path(run.output_dir).name
    if backend == "wandb":
        os.environ.setdefault("WANDB_MODE", run.logger.mode)
        os.environ.setdefault("WANDB_PROJECT", run.logger.project)
        os.environ.setdefault("WANDB_DIR", str(tracker_dir))
        os.environ.setdefault("WANDB_NAME", run_name)
        if run.logger.tags:
            os.environ.setdefault("WANDB_TAGS", ",".join(run.logger.tags))
        return [_WandbWithRunConfig(run_config)]
    if backend == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(tracker_dir / "tensorboard")))]
    from swanlab.integration.transformers import SwanLabCallback

    callback = SwanLabCallback(
        project=run.logger.project,
        experiment_name=run_name,
        mode=run.logger.mode,
        log_dir=str(tracker_dir / "swanlab"),
        tags=list(run.logger.tags) or None,
    )
    callback.update_config({"run_config": run_config})  # flushed when the run starts, on rank 0
    return [callback]


class _WandbWithRunConfig(WandbCallback):
    """WandbCallback records the Trainer's arguments; add the whole run config beside them."""

    def __init__(self, run_config: dict[str, Any]) -> None:
        super().__init__()
        self._run_config = run_config

    def setup(self, args: Any, state: Any, model: Any, **kwargs: Any) -> None:
        super().setup(args, state, model, **kwargs)
        if state.is_world_process_zero and self._wandb.run is not None:
            self._wandb.config.update({"run_config": self._run_config}, allow_val_change=True)
