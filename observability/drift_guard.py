"""The drift guard: a warning (and, if asked, a clean stop) when the objective keeps falling while the nll rises.

DFT (`loss.type=dft`, `loss.alpha=1`) can collapse: the objective it minimises, the logged `loss`, keeps falling
while the plain cross-entropy of the same tokens, the logged `nll` (`eval_nll` at evaluation), rises far above its
best. The model grows sure of the tokens it already predicts and gives up on the rest: DFT's gradient is that of
`-p`, so a token whose probability falls towards 0 stops pulling back. Measured on the released SmolLM2-135M at
`training.learning_rate=1e-4`: the training nll went 4.3 -> 9.1 -> 11.2 -> 12.05 over steps 10-40 while the DFT
loss fell to 5.8e-05, and every held-out answer became '1'. Nothing fails and the loss curve looks excellent; this
callback (`DriftGuardCallback`, config `drift_guard.*`, `config.schema.DriftGuardConfig`) says so.

The rule, applied apart to each kind of logging event (training logs: `loss` and `nll`; evaluations: `eval_loss`
and `eval_nll`). The best is the lowest nll so far, at step S, with the objective L_S at that event. An event at
step T drifts when

    nll_T > best + max(min_rise, relative_rise * best)      (defaults 0.5 nats, 50%: best 4.3 -> above 6.45)
    and L_T < L_S                                           (the objective is still "succeeding")

and the guard acts once, at the `patience`-th drifting event in a row (default 2), never during the first
`warmup_logs` events of a kind (default 2), which still set the best. Why these numbers:

- The relative margin: a healthy run's nll moves between logging intervals with the batches' mix; on the embedded
  sample data at `training.learning_rate=3e-3`, DFT, a log every 2 steps, it wandered 1.57-2.90: +61% at the second
  log (whose loss rose too), and 1.57 -> 2.08 (+33%) later while the loss fell. A collapse is far past 50%: +112% at
  its first interval above, +180% at its last in the case above.
- The absolute floor: late in a good run the nll is small (the released model's addition demo ends at eval_nll
  0.023), where 50% is noise; 0.5 nats means the data's tokens have lost a factor e^0.5 = 1.65 of their probability
  on average (geometric mean).
- The objective condition tells drift from a plain divergence (a learning rate too high for cross-entropy), where
  loss and nll rise together: a different failure, with its own signs (grad_norm, `resilience.*` for non-finite
  steps).
- Patience: one bad interval (a batch of hard samples) is not drift; a collapse keeps rising (every interval after
  the best, above). Warm-up: the first event is always the best (nothing to compare with), so `warmup_logs=1`
  checks from the second; the default 2 also leaves the second unchecked, the first updates moving the nll most
  (Adam's first steps are full-sized; the +61% above). The case above is caught at step 40, its fourth logging
  event.

Every objective is checked alike, no type named. For `loss.type=ce` the objective is the nll itself, the two logged
values differing only in how they average (`loss`: the mean over the interval's optimizer steps of each step's
token mean; `nll`: the token-weighted mean over the interval): at most 0.11 nats measured on the embedded data (a
log every 2 steps), well inside `min_rise` (which must be above 0 for that reason). An nll above its best by more
than `min_rise` then puts the loss above its value at the best too (whenever each logged loss is within
`min_rise / 2` of its nll), so the guard cannot fire.

What it does (`drift_guard.action`): `warn` logs one WARNING on rank 0 naming both moves and what to try (a
`loss.alpha` below 1, a lower learning rate, `loss.type=asft` or `loss.type=ce`), and rank 0 writes the event to
`<output_dir>/drift_guard.json` (`drift_summary` reads it for the end-of-run summary); `stop` also sets
`control.should_training_stop` on every rank: the Trainer ends the loop, train.py saves the model of that step and
the run exits with status 0. Every rank decides alike without a collective: the values it reads are the same on
all ranks (the Trainer averages `loss` over ranks, `DFTTrainer` all-reduces the nll sums). A fresh run (step 0)
deletes a `drift_guard.json` left by an earlier run in its directory; a resumed run keeps it, and its guard starts
afresh from the resumed step (the best is this process's).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from config.schema import DriftGuardConfig
from core.files import write_atomic
from core.ranks import is_rank_zero

logger = logging.getLogger(__name__)

DRIFT_GUARD_FILE = "drift_guard.json"
# (objective, nll) keys of the two kinds of logging event, watched apart.
TRAIN_KEYS = ("loss", "nll")
EVAL_KEYS = ("eval_loss", "eval_nll")


@dataclass(frozen=True)
class DriftEvent:
    """What the guard saw when it acted: the best nll and the objective then, and both at the acting event."""

    objective_key: str
    nll_key: str
    best_step: int
    best_nll: float
    objective_at_best: float
    step: int
    nll: float
    objective: float
    threshold: float
    """The nll above which an event drifts: best + max(min_rise, relative_rise * best)."""
    action: str
    stopped: bool


class DriftWatch:
    """One kind of logging event's history: the best nll, the objective then, the drifting events in a row."""

    def __init__(self, objective_key: str, nll_key: str, config: DriftGuardConfig) -> None:
        self.objective_key, self.nll_key, self.config = objective_key, nll_key, config
        self.events = 0
        self.best_nll, self.best_step, self.objective_at_best = math.inf, 0, math.nan
        self.drifting = 0

    def threshold(self) -> float:
        return self.best_nll + max(self.config.min_rise, self.config.relative_rise * self.best_nll)

    def observe(self, step: int, objective: float, nll: float) -> DriftEvent | None:
        """Take one logging event; the event when this one completes `patience` drifting events in a row."""
        if not (math.isfinite(objective) and math.isfinite(nll)):
            return None  # a non-finite step is resilience's to handle, not a trend
        self.events += 1
        if nll < self.best_nll:
            self.best_nll, self.best_step, self.objective_at_best = nll, step, objective
            self.drifting = 0
            return None
        if self.events <= self.config.warmup_logs:
            return None
        drifts = nll > self.threshold() and objective < self.objective_at_best
        self.drifting = self.drifting + 1 if drifts else 0
        if self.drifting < self.config.patience:
            return None
        return DriftEvent(
            objective_key=self.objective_key,
            nll_key=self.nll_key,
            best_step=self.best_step,
            best_nll=self.best_nll,
            objective_at_best=self.objective_at_best,
            step=step,
            nll=nll,
            objective=objective,
            threshold=self.threshold(),
            action=self.config.action,
            stopped=self.config.action == "stop",
        )


def drift_warning(event: DriftEvent, learning_rate: float) -> str:
    """The warning: both moves, with their steps, what to try, and what the guard does next."""
    then = (
        "drift_guard.action=stop: the run stops here"
        if event.stopped
        else "The run goes on: drift_guard.action=stop stops a run here (drift_guard.action=off turns the check off)"
    )
    return (
        f"Drift guard: {event.objective_key} fell from {event.objective_at_best:.4g} to {event.objective:.4g} "
        f"while {event.nll_key} rose from its best {event.best_nll:.4g} (step {event.best_step}) to "
        f"{event.nll:.4g} (step {event.step}): the model is getting worse at the data's tokens while its objective "
        "improves (a DFT collapse: it grows sure of the tokens it already predicts and gives up on the rest). Try "
        f"loss.alpha below 1 (e.g. loss.alpha=0.5), a lower training.learning_rate (now {learning_rate:g}), "
        f"loss.type=asft (DFT anchored to the starting model by a KL term) or loss.type=ce. {then}."
    )


class DriftGuardCallback(TrainerCallback):
    """Watches each logging event for drift (module docstring) and warns or stops as `drift_guard.action` says."""

    def __init__(self, config: DriftGuardConfig) -> None:
        self.config = config
        self.watches = [DriftWatch(*keys, config) for keys in (TRAIN_KEYS, EVAL_KEYS)]
        self.event: DriftEvent | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step == 0 and is_rank_zero():  # an earlier run's record would be read as this one's
            (Path(args.output_dir) / DRIFT_GUARD_FILE).unlink(missing_ok=True)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.config.action == "off" or self.event is not None or not logs:
            return
        for watch in self.watches:
            if watch.objective_key in logs and watch.nll_key in logs:
                event = watch.observe(state.global_step, logs[watch.objective_key], logs[watch.nll_key])
                if event is not None:
                    self._act(event, args, control)
                    return

    def _act(self, event: DriftEvent, args: TrainingArguments, control: TrainerControl) -> None:
        self.event = event
        if event.stopped:
            control.should_training_stop = True
        if not is_rank_zero():
            return
        logger.warning("%s", drift_warning(event, args.learning_rate))
        if event.stopped:
            logger.warning(
                "Drift guard stopped the run at step %d (drift_guard.action=stop): the model saved is this step's, "
                "not the one of the best %s (step %d)",
                event.step,
                event.nll_key,
                event.best_step,
            )
        write_atomic(Path(args.output_dir) / DRIFT_GUARD_FILE, json.dumps(asdict(event), indent=2) + "\n")


def drift_summary(output_dir: str | Path) -> str | None:
    """One line on what the drift guard did in the run in `output_dir` (from its `drift_guard.json`), or None."""
    path = Path(output_dir) / DRIFT_GUARD_FILE
    if not path.is_file():
        return None
    event = json.loads(path.read_text(encoding="utf-8"))
    did = "stopped the run" if event["stopped"] else "warned"
    return (
        f"{did} at step {event['step']}: {event['nll_key']} {event['best_nll']:.4g} (step {event['best_step']}) -> "
        f"{event['nll']:.4g} while {event['objective_key']} fell {event['objective_at_best']:.4g} -> "
        f"{event['objective']:.4g} ({DRIFT_GUARD_FILE})"
    )
