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
import time
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


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (metrics.jsonl, a rank's interval sums); none when it does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    return read_json_lines(Path(output_dir) / METRICS_FILE)


def plot_loss(output_dir: str | Path) -> Path | None:
    try:
        import matplotlib
    except ModuleNotFoundError:  # a GPU node's image may lack it; the run's metrics.jsonl holds the same curves
        logger.warning("loss.png not drawn: matplotlib is not installed (pip install matplotlib)")
        return None

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


# The short step line (`logger.console=short`): what a `tail -f` reader follows, under the label it shows;
# metrics.jsonl has the rest. Short enough for one 200-character line with the log prefix, elapsed time and ETA.
SHORT_LINE = {
    "loss": "loss",
    "nll": "nll",
    "avg_p_correct": "avg_p_correct",
    "accuracy": "acc",  # preference runs: pairwise accuracy and mean margin (preference/trainer.py)
    "margin": "margin",
    "learning_rate": "lr",
    "grad_norm": "grad_norm",
    "tokens_per_second": "tok/s",
    "eval_loss": "eval_loss",
    "eval_nll": "eval_nll",
    "eval_avg_p_correct": "eval_avg_p_correct",
    "eval_accuracy": "eval_acc",
    "eval_margin": "eval_margin",
    "train_loss": "train_loss",
    "train_runtime": "train_runtime",
}
# The step lines' logger: a short name keeps the line short.
progress_logger = logging.getLogger("progress")


def keep_history(path: Path, step: int) -> None:
    """Rewrite a JSON-lines metrics file with only its records up to `step` (none at step 0: a fresh run)."""
    if not path.is_file():
        return
    kept = [r for r in read_json_lines(path) if 0 < step and r.get("step", 0) <= step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


class RunArtifactsCallback(TrainerCallback):
    """Appends each log event to `metrics.jsonl`, logs a plain step line with elapsed time and ETA, and redraws
    `loss.png`. `console`: `short` (SHORT_LINE) or `full` (every logged value) on the step line."""

    def __init__(self, output_dir: str | Path, console: str = "short") -> None:
        self.output_dir = Path(output_dir)
        self.console = console
        self._start: tuple[float, int] | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The ETA counts from this run's first step: a resumed run's earlier steps took no time here.
        self._start = (time.monotonic(), state.global_step)
        # A fresh run starts fresh files; a resumed one keeps the history up to its checkpoint. Each rank its own
        # interval sums (`logs/rank<N>_metrics.jsonl`, `observability.training_metrics`), rank 0 the run's metrics.
        keep_history(self.output_dir / "logs" / f"rank{args.process_index}_metrics.jsonl", state.global_step)
        if state.is_world_process_zero:
            keep_history(self.output_dir / METRICS_FILE, state.global_step)

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
        line = _summary(logs, None if self.console == "full" else SHORT_LINE)
        progress_logger.info("step %d/%d %s%s", state.global_step, state.max_steps, line, self._timing(state))

    def _timing(self, state: TrainerState) -> str:
        if self._start is None:
            return ""
        started, first_step = self._start
        elapsed, done = time.monotonic() - started, state.global_step - first_step
        if done <= 0:
            return f" | elapsed {_duration(elapsed)}"
        remaining = elapsed / done * (state.max_steps - state.global_step)
        return f" | elapsed {_duration(elapsed)} | eta {_duration(remaining)}"

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


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _summary(logs: dict[str, Any], labels: dict[str, str] | None) -> str:
    """The log event as `label value | ...`: the keys `labels` names, or every key when it is None."""
    parts = []
    for key, value in logs.items():
        if labels is not None and key not in labels:
            continue
        if labels is None and "/" in key and not key.split("/")[0].endswith("nll"):
            continue  # of the per-source breakdowns the full line keeps nll; metrics.jsonl has them all
        label = key if labels is None else labels[key]
        parts.append(f"{label} {value:.4g}" if isinstance(value, float) else f"{label} {value}")
    return " | ".join(parts)
