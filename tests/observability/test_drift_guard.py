"""The drift guard: synthetic log sequences through the callback, and a real DFT collapse caught in train.py."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState

from config.schema import DriftGuardConfig, load_run_config
from observability.artifacts import read_metrics
from observability.banner import end_summary
from observability.drift_guard import DRIFT_GUARD_FILE, DriftGuardCallback
from tests.helpers import NO_HELDOUT, check_saved_run, run_ok, training_args

GUARD_LOGGER = "observability.drift_guard"

# The motivating case (SmolLM2-135M, DFT, lr 1e-4, a log every 10 steps): the nll as measured, the DFT loss falling
# to the measured 5.8e-05 at step 40, then two more steps of the same.
COLLAPSE = [
    (10, 0.12, 4.3),
    (20, 4e-3, 9.1),
    (30, 3e-4, 11.2),
    (40, 5.8e-05, 12.05),
    (50, 3e-5, 12.4),
    (60, 2e-5, 13.0),
]
# A healthy run: the nll wanders up and down by up to a third between logs (its best 1.9 -> 2.5) while it falls
# overall, and the loss with it.
IMPROVING = [(10, 0.9, 3.0), (20, 0.8, 3.6), (30, 0.6, 2.5), (40, 0.65, 2.9), (50, 0.45, 1.9), (60, 0.5, 2.5),
             (70, 0.4, 1.7), (80, 0.42, 2.2)]  # fmt: skip
# A plain divergence (too high a learning rate): the nll rises as in the collapse, but the loss rises with it.
DIVERGING = [(step, 0.12 + 0.1 * i, nll) for i, (step, _, nll) in enumerate(COLLAPSE)]


def train_logs(events: list[tuple[int, float, float]]) -> list[tuple[int, dict[str, float]]]:
    return [(step, {"loss": loss, "nll": nll, "learning_rate": 1e-4}) for step, loss, nll in events]


def eval_logs(events: list[tuple[int, float, float]]) -> list[tuple[int, dict[str, float]]]:
    return [(step, {"eval_loss": loss, "eval_nll": nll}) for step, loss, nll in events]


def feed(
    guard: DriftGuardCallback, logs: list[tuple[int, dict[str, float]]], output_dir: Path
) -> tuple[TrainerControl, int | None]:
    """Every log event through the callback, as the Trainer calls it: the control, and the step that stopped the
    run (None if none)."""
    args, state, control = training_args(output_dir), TrainerState(), TrainerControl()
    guard.on_train_begin(args, state, control)
    stopped_at = None
    for step, record in logs:
        state.global_step = step
        guard.on_log(args, state, control, logs=dict(record))
        if control.should_training_stop and stopped_at is None:
            stopped_at = step
    return control, stopped_at


def guard_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == GUARD_LOGGER and r.levelno == logging.WARNING]


def test_a_collapse_is_warned_once_naming_both_moves_and_what_to_try(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=GUARD_LOGGER)
    guard = DriftGuardCallback(DriftGuardConfig())
    control, stopped_at = feed(guard, train_logs(COLLAPSE), tmp_path)

    [warning] = guard_warnings(caplog)
    # Warm-up: steps 10 and 20 are not checked; 30 and 40 drift (above 4.3 + max(0.5, 2.15) = 6.45, loss below 0.12).
    assert "loss fell from 0.12 to 5.8e-05 while nll rose from its best 4.3 (step 10) to 12.05 (step 40)" in warning
    for advice in ("loss.alpha below 1", "training.learning_rate (now 5e-05)", "loss.type=asft", "loss.type=ce"):
        assert advice in warning, advice
    assert "drift_guard.action=stop stops a run here" in warning
    assert stopped_at is None and not control.should_training_stop
    record = json.loads((tmp_path / DRIFT_GUARD_FILE).read_text())
    assert record["step"] == 40 and record["best_step"] == 10 and record["stopped"] is False
    assert record["threshold"] == pytest.approx(6.45)


@pytest.mark.parametrize("events", [IMPROVING, DIVERGING], ids=["noisy-but-improving", "diverging"])
def test_no_warning_without_drift(
    events: list[tuple[int, float, float]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=GUARD_LOGGER)
    control, stopped_at = feed(DriftGuardCallback(DriftGuardConfig(action="stop")), train_logs(events), tmp_path)
    assert guard_warnings(caplog) == [] and stopped_at is None
    assert not (tmp_path / DRIFT_GUARD_FILE).exists()


def test_an_objective_that_is_the_nll_never_fires(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """loss.type=ce: loss and nll are one quantity, averaged two ways (within about 0.1 nats measured). Random walks
    with collapses of the nll in them, the loss following within 0.15, even with no warm-up and no patience."""
    caplog.set_level(logging.WARNING, logger=GUARD_LOGGER)
    generator = random.Random(0)
    config = DriftGuardConfig(action="stop", patience=1, warmup_logs=0)
    for walk in range(200):
        nll, events = generator.uniform(0.05, 5.0), []
        for step in range(1, 41):
            nll = max(0.01, nll + generator.choice([-1.0, 1.0, 5.0]) * generator.uniform(0.0, 0.5))
            events.append((step, nll + generator.uniform(-0.15, 0.15), nll))
        _, stopped_at = feed(DriftGuardCallback(config), train_logs(events), tmp_path / str(walk))
        assert stopped_at is None, events
    assert guard_warnings(caplog) == []


def test_stop_ends_the_run_at_the_drifting_event(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=GUARD_LOGGER)
    control, stopped_at = feed(DriftGuardCallback(DriftGuardConfig(action="stop")), train_logs(COLLAPSE), tmp_path)
    assert stopped_at == 40 and control.should_training_stop
    warning, stopped = guard_warnings(caplog)
    assert "drift_guard.action=stop: the run stops here" in warning
    assert "Drift guard stopped the run at step 40" in stopped
    assert json.loads((tmp_path / DRIFT_GUARD_FILE).read_text())["stopped"] is True
    assert "drift guard      stopped the run at step 40: nll 4.3 (step 10) -> 12.05" in end_summary(tmp_path, {})


def test_off_does_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=GUARD_LOGGER)
    control, stopped_at = feed(DriftGuardCallback(DriftGuardConfig(action="off")), train_logs(COLLAPSE), tmp_path)
    assert guard_warnings(caplog) == [] and stopped_at is None
    assert not (tmp_path / DRIFT_GUARD_FILE).exists()
    assert "drift guard" not in end_summary(tmp_path, {})


def test_evaluations_are_watched_apart_from_training_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A healthy training log between two evaluations neither resets nor adds to the evaluations' count."""
    caplog.set_level(logging.WARNING, logger=GUARD_LOGGER)
    interleaved = [log for pair in zip(train_logs(IMPROVING[:6]), eval_logs(COLLAPSE), strict=True) for log in pair]
    _, stopped_at = feed(DriftGuardCallback(DriftGuardConfig(action="stop")), interleaved, tmp_path)
    assert stopped_at == 40
    [warning, _] = guard_warnings(caplog)
    assert "eval_loss fell from 0.12 to 5.8e-05 while eval_nll rose from its best 4.3 (step 10)" in warning


@pytest.mark.parametrize(
    ("warmup_logs", "patience", "stops_at"), [(0, 1, 20), (1, 1, 20), (2, 1, 30), (2, 2, 40), (2, 3, 50), (4, 2, 60)]
)
def test_warm_up_and_patience_delay_the_guard(warmup_logs: int, patience: int, stops_at: int, tmp_path: Path) -> None:
    config = DriftGuardConfig(action="stop", warmup_logs=warmup_logs, patience=patience)
    assert feed(DriftGuardCallback(config), train_logs(COLLAPSE), tmp_path)[1] == stops_at


def test_one_event_back_under_the_margin_resets_patience(tmp_path: Path) -> None:
    # Above 6.45 at 30 and 50, back to 5.0 at 40 in between: never 2 in a row.
    events = [(10, 0.12, 4.3), (20, 0.1, 4.4), (30, 0.05, 7.0), (40, 0.05, 5.0), (50, 0.04, 7.0), (60, 0.04, 5.0)]
    assert feed(DriftGuardCallback(DriftGuardConfig(action="stop")), train_logs(events), tmp_path)[1] is None


def test_other_ranks_stop_alike_but_neither_log_nor_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")  # no process group: core.ranks reads the launcher's variable
    caplog.set_level(logging.WARNING, logger=GUARD_LOGGER)
    _, stopped_at = feed(DriftGuardCallback(DriftGuardConfig(action="stop")), train_logs(COLLAPSE), tmp_path)
    assert stopped_at == 40
    assert guard_warnings(caplog) == [] and not (tmp_path / DRIFT_GUARD_FILE).exists()


def test_a_fresh_run_drops_an_earlier_record_and_a_resumed_one_keeps_it(tmp_path: Path) -> None:
    args, state, control = training_args(tmp_path), TrainerState(), TrainerControl()
    record = tmp_path / DRIFT_GUARD_FILE
    record.write_text("{}")
    state.global_step = 8  # resumed from checkpoint-8
    DriftGuardCallback(DriftGuardConfig()).on_train_begin(args, state, control)
    assert record.exists()
    state.global_step = 0
    DriftGuardCallback(DriftGuardConfig()).on_train_begin(args, state, control)
    assert not record.exists()


def test_non_finite_values_are_skipped(tmp_path: Path) -> None:
    events = [*COLLAPSE[:3], (35, float("nan"), float("nan")), *COLLAPSE[3:]]
    assert feed(DriftGuardCallback(DriftGuardConfig(action="stop")), train_logs(events), tmp_path)[1] == 40


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("drift_guard.action=loud", "drift_guard.action='loud' is not one of ['off', 'warn', 'stop']"),
        ("drift_guard.patience=0", "drift_guard.patience=0 must be >= 1"),
        ("drift_guard.warmup_logs=-1", "drift_guard.warmup_logs=-1 must be >= 0"),
        ("drift_guard.min_rise=0", "drift_guard.min_rise=0.0 must be > 0 nats"),
        ("drift_guard.relative_rise=-0.5", "drift_guard.relative_rise=-0.5 must be >= 0"),
        ("drift_guard.patiense=3", "'patiense' not in 'DriftGuardConfig'"),
    ],
)
def test_bad_settings_fail_with_the_key(override: str, message: str) -> None:
    with pytest.raises(Exception) as raised:
        load_run_config([override])
    assert message in f"{raised.value} {raised.value.__cause__}"


def test_settings_compose_from_the_command_line_and_the_default_warns() -> None:
    assert load_run_config(["drift_guard.patience=3"]).drift_guard == DriftGuardConfig(patience=3)
    assert DriftGuardConfig().action == "warn"


# --- End to end: a real DFT collapse on the embedded model ---------------------------------------------------------

# Measured on the embedded tiny Qwen2 (pre-trained briefly with cross-entropy): at a constant learning rate of 1e-2,
# DFT with alpha=1 raises the training nll 2.71 -> 9.06 -> 10.29 -> 11.74 -> ... 13.37 over steps 2-12 (a log every
# 2) while its loss falls 0.145 -> 0.035 -> 0.032 -> 0.015; cross-entropy on the same settings lowers the nll
# 3.83 -> 1.84. The guard (defaults: 2 logs of warm-up, patience 2) acts at step 8.
COLLAPSING_RUN = (
    "debug=quick",
    NO_HELDOUT,
    "training.max_steps=12",
    "training.logging_steps=2",
    "training.eval_strategy=no",
    "training.warmup_steps=0",
    "training.lr_scheduler_type=constant",
    "training.learning_rate=1e-2",
)
DFT = ("loss.type=dft", "loss.alpha=1")
GUARD_WARNING = "Drift guard: loss fell from"


def rank0_log(output_dir: Path) -> str:
    return (output_dir / "logs" / "rank0.log").read_text(encoding="utf-8")


def logged_steps(output_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(output_dir) if "loss" in r]


@pytest.mark.slow
def test_a_dft_collapse_is_warned_and_with_stop_ends_the_run_early(tmp_path: Path, base_model_dir: Path) -> None:
    warned = tmp_path / "warn"
    run_ok(warned, *COLLAPSING_RUN, *DFT)
    records = [r for r in read_metrics(warned) if "loss" in r]
    assert records[-1]["nll"] > 3 * records[0]["nll"] and records[-1]["loss"] < records[0]["loss"] / 3, records
    assert rank0_log(warned).count(GUARD_WARNING) == 1
    assert logged_steps(warned)[-1] == 12  # warn: the run goes on
    assert json.loads((warned / DRIFT_GUARD_FILE).read_text())["stopped"] is False

    stopped = tmp_path / "stop"
    run_ok(stopped, *COLLAPSING_RUN, *DFT, "drift_guard.action=stop")
    log = rank0_log(stopped)
    assert log.count(GUARD_WARNING) == 1 and "Drift guard stopped the run at step 8" in log
    assert logged_steps(stopped) == [2, 4, 6, 8]
    record = json.loads((stopped / DRIFT_GUARD_FILE).read_text())
    assert (record["step"], record["best_step"], record["stopped"]) == (8, 2, True)
    assert "drift guard      stopped the run at step 8" in log  # the end-of-run summary
    check_saved_run(stopped, base_model_dir, ranks=1)


@pytest.mark.slow
def test_cross_entropy_on_the_same_settings_is_not_warned(tmp_path: Path) -> None:
    out = tmp_path / "ce"
    run_ok(out, *COLLAPSING_RUN, "loss.type=ce")
    assert logged_steps(out)[-1] == 12
    assert "Drift guard" not in rank0_log(out) and not (out / DRIFT_GUARD_FILE).exists()
