"""The objectives under DeepSpeed ZeRO-3 on two CPU ranks: the same update as one process in float64.

DFT on both heads, ASFT (fused, activation checkpointing, a reference model of its own partitioned like the
policy) and EAFT (fused).

The head weight is partitioned (and tied to the embeddings), so a fused loss that read it outside the head's
forward would see an empty tensor, and one whose gradient bypassed ZeRO-3's hooks would never be reduced. One
micro-batch has no trainable token: its rank must neither hang in a reduce-scatter nor produce NaN.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import VOCAB, float32_bound, run_on_two_deepspeed_ranks

pytestmark = pytest.mark.distributed

CHECK_SCRIPT = Path(__file__).with_name("zero3_fused_loss_check.py")


def test_zero3_objectives_match_one_process_float64(tmp_path: Path) -> None:
    result_file = tmp_path / "result.json"
    run_on_two_deepspeed_ranks(CHECK_SCRIPT, "--out", str(result_file), timeout=300)
    report = json.loads(result_file.read_text())
    assert report["world_size"] == 2
    for name in ("reference", "fused", "asft", "eaft"):
        run = report[name]
        assert run["all_finite"], f"{name}: NaN or inf in the update"
        assert run["all_moved"], f"{name}: a parameter got no update: {run}"
        # At most 1: the update equals minus the one-process float64 gradient up to float32 rounding (the tolerance,
        # 4 * eps * sqrt(300) of the gradient plus eps / 2 of the parameter, is derived in the check script).
        assert run["max_tolerance_ratio"] <= 1.0, f"{name}: {run}"
        # The logged step loss against the float64 one: float32 rounding over the softmax's 300 terms, 4 * eps *
        # sqrt(300) = 8.3e-6 relative; a micro-batch lost or counted twice, or a wrong token count, is 5 % or more.
        assert run["train_loss_relative_error"] <= float32_bound(VOCAB), f"{name}: {report}"
    # The KL moved the update: ASFT's step differs from DFT's (same alpha) by far more than rounding.
    assert abs(report["asft"]["train_loss"] - report["fused"]["train_loss"]) > 1e-3 * report["fused"]["train_loss"]
    # Each rank holds its partition of the reference model, not a full copy: half of it on 2 ranks (up to the
    # padding that makes each parameter divide by the world size: a few elements of the tiny model's ~100k).
    assert 0.5 <= report["asft"]["reference_share_held"] <= 0.51, report["asft"]
