"""Files every run leaves in its output directory, whatever tracker is used.

- `config.yaml`: the resolved configuration of the run.
- `metrics.jsonl`: one JSON object per logging event (step, loss, nll, avg_p_correct, ..., and with several
  data sources `nll/<source>`, `avg_p_correct/<source>`, `dft_loss/<source>`, `num_tokens/<source>`).
- `loss.png`: loss and nll against the step (eval points marked), refreshed at each save and at the end.
All are written by rank 0, to a temporary path then renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from core.files import write_atomic

logger = logging.getLogger(__name__)

METRICS_FILE, LOSS_PLOT_FILE, CONFIG_FILE = "metrics.jsonl", "loss.png", "config.yaml"
SECRET_KEY_PARTS = ("token", "api_key", "apikey", "secret", "password")
REDACTED = "<redacted>"


def redact_secrets(value: Any) -> Any:
    """A copy of a config container with every value under a secret-looking key replaced."""
    if isinstance(value, dict):
        return {
            key: REDACTED
            if any(part in str(key).lower() for part in SECRET_KEY_PARTS) and item is not None
            else redact_secrets(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact_secrets(item) for item in value]
    return value


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(output_dir: str | Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(output_dir)
    train = [r for r in records if "loss" in r and "nll" in r]
    evals = [r for r in records if "eval_nll" in r]
    if not train and not evals:
        return None
    fig, loss_axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss (optimised)", color="tab:blue")
    nll_axis = loss_axis.twinx()
    nll_axis.plot([r["step"] for r in train], [r["nll"] for r in train], color="tab:orange", label="nll")
    nll_axis.scatter(
        [r["step"] for r in evals], [r["eval_nll"] for r in evals], color="tab:red", marker="x", label="eval_nll"
    )
    nll_axis.set_ylabel("nll (cross-entropy)", color="tab:orange")
    fig.legend(loc="upper right")
    fig.tight_layout()
    path = Path(output_dir) / LOSS_PLOT_FILE
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    write_atomic(path, image.getvalue())
    return path


class RunArtifactsCallback(TrainerCallback):
    """Appends each log event to `metrics.jsonl`, logs a plain summary line, and redraws `loss.png`."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        # A fresh run starts a fresh file; a resumed one keeps the history up to its checkpoint.
        kept = [r for r in read_metrics(self.output_dir) if r.get("step", 0) <= state.global_step]
        if state.global_step == 0:
            kept = []
        write_atomic(self.output_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, **{k: _jsonable(v) for k, v in logs.items()}}
        with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.info("step %d/%d %s", state.global_step, state.max_steps, _summary(logs))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            plot_loss(self.output_dir)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            plot_loss(self.output_dir)


class _BarOnlyProgressCallback(ProgressCallback):
    """tqdm bars without the dict dump of each log event: RunArtifactsCallback logs a readable line instead."""

    def on_log(self, *args: Any, **kwargs: Any) -> None:
        return None


def use_readable_progress(trainer: Trainer) -> None:
    """One plain log line per logging interval; a tqdm bar (rank 0) only when the console is a TTY."""
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_BarOnlyProgressCallback())


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _summary(logs: dict[str, Any]) -> str:
    parts = []
    for key, value in logs.items():
        if "/" in key and not key.split("/")[0].endswith("nll"):
            continue  # of the per-source breakdowns the line keeps nll; metrics.jsonl has them all
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)
