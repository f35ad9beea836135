"""Experiment trackers (`logger` config group): SwanLab, WandB, TensorBoard or none.

Only rank 0 starts a tracker (the callbacks below check `is_world_process_zero`
themselves); files go under `<output_dir>/trackers/` so offline runs can be
synced later. API keys are read from the environment by the libraries and
never written into the config.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from launcher.config import RunConfig


def tracker_callbacks(run: RunConfig, cfg: DictConfig) -> list[TrainerCallback]:
    backend = run.logger.backend
    if backend == "none":
        return []
    tracker_dir = Path(run.output_dir) / "trackers"
    tracker_dir.mkdir(parents=True, exist_ok=True)
    run_name = run.logger.run_name or Path(run.output_dir).name
    if backend == "wandb":
        from transformers.integrations import WandbCallback

        os.environ.setdefault("WANDB_MODE", run.logger.mode)
        os.environ.setdefault("WANDB_PROJECT", run.logger.project)
        os.environ.setdefault("WANDB_DIR", str(tracker_dir))
        os.environ.setdefault("WANDB_NAME", run_name)
        return [WandbCallback()]
    if backend == "tensorboard":
        from transformers.integrations import TensorBoardCallback

        return [TensorBoardCallback(tb_writer=_tensorboard_writer(tracker_dir / "tensorboard"))]
    from swanlab.integration.transformers import SwanLabCallback

    return [
        SwanLabCallback(
            project=run.logger.project,
            experiment_name=run_name,
            mode=run.logger.mode,
            logdir=str(tracker_dir / "swanlab"),
            config=OmegaConf.to_container(cfg, resolve=True),
            tags=list(run.logger.tags) or None,
        )
    ]


def _tensorboard_writer(log_dir: Path):  # noqa: ANN202 - torch's SummaryWriter is imported lazily
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))
