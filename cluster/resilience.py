"""Surviving the cluster: non-finite steps are skipped, preemption signals end the run with a checkpoint.

`ResilienceCallback` (config keys under `resilience.`) owns two behaviours, both decided by every rank
together from one small all-reduce per optimizer step, so no rank ever leaves the others waiting:

- Non-finite losses and gradients. A forward hook on the model flags a micro-batch whose loss (or, for
  `loss.implementation=reference`, logits) is NaN or inf; before the optimizer step each rank also checks
  its gradients. If any rank saw one, every rank skips the step: the optimizer is not called (its state
  and the weights are untouched), the LR scheduler does not advance, the gradients are dropped. The skip
  is logged with the step, the rank(s) whose loss or gradients were bad and the `file:line` of the samples
  those ranks fed to the step (every rank's when DeepSpeed does not say which), and appended with the full
  lists to `<output_dir>/logs/nonfinite_steps.jsonl`. Under DeepSpeed the engine
  steps inside `backward`, before a Trainer callback runs; ZeRO (0.19: stage 3 for every dtype, stages
  1-2 with `bf16.check_grad_overflow`, on by default) already skips a step whose global gradient norm is
  not finite, on all ranks alike, so the callback only counts and logs it, and fails loudly if DeepSpeed
  stepped on a non-finite loss. After `resilience.max_consecutive_nonfinite` skips in a row the run saves
  a checkpoint (of the last good weights: the skipped steps changed nothing) and stops with
  `NonFiniteTrainingError`.
- Preemption. `resilience.signals` (default SIGUSR1 and SIGTERM) set a flag on the rank that receives
  them; at the next step boundary every rank learns of it, a full checkpoint is saved, and the process
  exits with `PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL: 124 is `timeout`'s, 128+N a signal death) after rank 0
  writes `<output_dir>/preempted.json`. launch/slurm.sbatch requeues the job on that marker and the job
  resumes with `training.resume_from_checkpoint=auto`. torchrun and the DeepSpeed launcher turn a worker's
  75 into their own failure status, hence the marker file.

`resilience.inject_nonfinite_at_steps` (with `inject_nonfinite_on_ranks`) multiplies the model's output by
NaN at those optimizer steps: a testing aid, to see the skip happen.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import ModelOutput

from config.schema import ResilienceConfig
from core.ranks import get_rank

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL from sysexits.h: "try again later", what a requeue does
PREEMPTED_MARKER = "preempted.json"
NONFINITE_LOG = "nonfinite_steps.jsonl"  # under <output_dir>/logs
# Sample origins named per rank in the warning; the JSON lines file has them all.
ORIGINS_IN_WARNING = 8
# Outputs a causal LM's forward may return, checked (and poisoned by the injection) in this order.
OUTPUT_KEYS = ("loss", "logits")


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class PreemptedError(SystemExit):
    """Raised at the end of a preempted run: exits with `PREEMPTED_EXIT_CODE` once the checkpoint is saved."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)


def _shorten(origins: list[str]) -> str:
    if not origins:
        return "none recorded"
    shown = ", ".join(origins[:ORIGINS_IN_WARNING])
    return shown if len(origins) <= ORIGINS_IN_WARNING else f"{shown} and {len(origins) - ORIGINS_IN_WARNING} more"


def _ranks(flags: torch.Tensor) -> list[int]:
    return [rank for rank, flag in enumerate(flags.tolist()) if flag > 0]


class ResilienceCallback(TrainerCallback):
    """Skips non-finite optimizer steps on all ranks together and turns a preemption signal into a checkpoint.

    Create it before the data and model are loaded: it installs the signal handlers, so a signal that
    arrives during start-up is not fatal either (it stops the run at the first step boundary).

    Args:
        config: the `resilience` section of the run config.
        step_origins: returns the `file:line` of the samples this rank fed to the optimizer step in progress
            (`DFTTrainer.step_origins`), named when the step is skipped; None names none.
    """

    def __init__(self, config: ResilienceConfig, step_origins: Callable[[], list[str]] | None = None) -> None:
        self.config = config
        self.step_origins = step_origins
        self.signal_received: int | None = None
        self.consecutive_skips = 0
        self.total_skips = 0
        self.preempted = False
        self.gave_up = False
        self._step = 0  # the optimizer step in progress, 1-based, as global_step will be after it
        self._loss_nonfinite: torch.Tensor | None = None  # on the device: no host sync per micro-batch
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        for name in config.signals:
            signal.signal(getattr(signal, name), self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag here: the training loop acts on it at a step boundary, where a checkpoint is consistent.
        self.signal_received = signum

    def _output_hook(self, module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        if not module.training or not isinstance(output, ModelOutput):
            return output
        if self._step in self.config.inject_nonfinite_at_steps and (
            not self.config.inject_nonfinite_on_ranks or get_rank() in self.config.inject_nonfinite_on_ranks
        ):
            for key in OUTPUT_KEYS:
                if output.get(key) is not None:
                    output[key] = output[key] * float("nan")
        value = next((output[key] for key in OUTPUT_KEYS if output.get(key) is not None), None)
        if value is not None:
            # A float32 sum: one reduction, no copy of bf16 logits, and NaN or inf anywhere makes it non-finite.
            bad = ~torch.isfinite(torch.sum(value.detach(), dtype=torch.float32))
            self._loss_nonfinite = bad if self._loss_nonfinite is None else self._loss_nonfinite | bad
        return output

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._hook is None:
            self._hook = kwargs["model"].register_forward_hook(self._output_hook)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._step = state.global_step + 1

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        optimizer = kwargs["optimizer"]
        world, rank = args.world_size, args.process_index
        # Per rank: loss non-finite, gradients non-finite; then how many ranks received a stop signal.
        flags = torch.zeros(2 * world + 1, dtype=torch.float32, device=args.device)
        if self._loss_nonfinite is not None:
            flags[rank] = self._loss_nonfinite.float()
        if not args.deepspeed:  # DeepSpeed has stepped and freed the gradients already (see the module doc)
            grads = [p.grad for p in kwargs["model"].parameters() if p.grad is not None]
            if grads:
                flags[world + rank] = (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float()
        flags[2 * world] = float(self.signal_received is not None)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags)
        self._loss_nonfinite = None
        loss_ranks, grad_ranks = _ranks(flags[:world]), _ranks(flags[world : 2 * world])
        self.preempted = self.preempted or flags[2 * world].item() > 0

        if args.deepspeed:
            skipped = bool(optimizer.step_was_skipped)
            if loss_ranks and not skipped:
                raise NonFiniteTrainingError(
                    f"step {self._step}: non-finite loss on rank(s) {loss_ranks}, but DeepSpeed applied the step; "
                    "enable its overflow check (bf16.check_grad_overflow: true in the DeepSpeed JSON)"
                )
        else:
            skipped = bool(loss_ranks or grad_ranks)
            if skipped:
                # Shadow step() for this one call, and report it skipped so the Trainer holds the LR schedule.
                optimizer.step = lambda *a, **k: None
                optimizer._is_overflow = True
        if not skipped:
            self.consecutive_skips = 0
            return
        self.consecutive_skips += 1
        self.total_skips += 1
        # Every rank learnt of the skip from the all-reduce, so this gather runs on all of them together.
        origins = self._gather_origins(world)
        # A rank's non-finite loss makes every rank's gradients non-finite (DDP averages them): its samples are the
        # suspects. Gradients alone point at their ranks; without either (DeepSpeed's check) every rank's are.
        suspects = loss_ranks or grad_ranks or list(range(world))
        logger.warning(
            "step %d: skipped the optimizer step (non-finite loss on rank(s) %s, non-finite gradients on rank(s) %s); "
            "%d in a row, %d in this run. Samples of rank(s) %s: %s",
            self._step,
            loss_ranks or "none",
            grad_ranks or ("none" if not args.deepspeed else "? (DeepSpeed's overflow check)"),
            self.consecutive_skips,
            self.total_skips,
            suspects,
            "; ".join(f"rank {r}: {_shorten(origins[r])}" for r in suspects),
        )
        if rank == 0:
            record = {"step": self._step, "loss_ranks": loss_ranks, "grad_ranks": grad_ranks, "origins": origins}
            path = Path(args.output_dir) / "logs" / NONFINITE_LOG
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def _gather_origins(self, world: int) -> list[list[str]]:
        """Every rank's sample origins for the step in progress, indexed by rank."""
        local = list(self.step_origins()) if self.step_origins is not None else []
        if world == 1 or not (dist.is_available() and dist.is_initialized()):
            return [local]
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, local)
        return gathered

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        optimizer = kwargs["optimizer"]
        if "step" in vars(optimizer):
            del optimizer.step  # back to the class's step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        optimizer = kwargs["optimizer"]
        if not args.deepspeed and getattr(optimizer, "_is_overflow", False) and optimizer.scaler is None:
            optimizer._is_overflow = False  # read by the Trainer before on_step_end; ours to reset
        if self.consecutive_skips >= self.config.max_consecutive_nonfinite:
            self.gave_up = True
        if self.preempted or self.gave_up:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.gave_up:
            raise NonFiniteTrainingError(
                f"stopped at step {state.global_step}: {self.consecutive_skips} optimizer steps in a row had a "
                f"non-finite loss or gradient (resilience.max_consecutive_nonfinite="
                f"{self.config.max_consecutive_nonfinite}); the last good weights are in {checkpoint}. Check the data "
                "of those steps (logs/rank<N>_metrics.jsonl) and lower training.learning_rate, then resume from it"
            )
        if self.preempted:
            if args.process_index == 0:
                marker = {"step": state.global_step, "checkpoint": str(checkpoint), "exit_code": PREEMPTED_EXIT_CODE}
                (Path(args.output_dir) / PREEMPTED_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
            logger.warning(
                "Preempted: stopped at step %d with a checkpoint in %s; exiting with status %d. "
                "Resume with training.resume_from_checkpoint=auto",
                state.global_step,
                checkpoint,
                PREEMPTED_EXIT_CODE,
            )
            raise PreemptedError()
