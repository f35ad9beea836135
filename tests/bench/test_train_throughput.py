"""bench/train_throughput.py keeps working: its `--smoke` mode runs every row (project and TRL, fp32 and bf16 with
activation checkpointing, padded and packed, DFT, CE and fused CE) at a tiny size for 2 steps."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.train_throughput import ARMS, FULL, LAYOUTS, PRECISIONS, SMOKE, build_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_full_scale_model_is_qwen2_sized_with_the_real_vocabulary() -> None:
    model = build_model(FULL)
    parameters = sum(p.numel() for p in model.parameters())
    assert model.config.model_type == "qwen2" and model.config.vocab_size == 151936
    assert 30e6 <= parameters <= 60e6, parameters


@pytest.mark.slow
def test_smoke_mode_runs_every_row_on_both_sides(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    results = tmp_path / "smoke.json"
    command = [sys.executable, "-m", "bench.train_throughput", "--smoke", "--json", str(results)]
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads(results.read_text())
    rows = result["rows"]
    assert len(rows) == len(PRECISIONS) * len(LAYOUTS) * len(ARMS)
    for row in rows:
        assert len(row["losses"]) == SMOKE.steps and all(math.isfinite(loss) for loss in row["losses"]), row
        assert row["tokens_per_s"] > 0 and row["peak_rss_mib"] > 0
    # Same model, data and loss on both sides: the first losses agree within the bound the script states.
    assert len(result["comparisons"]) == len(PRECISIONS) * len(LAYOUTS) * 3
    for compared in result["comparisons"]:
        assert compared["first_loss_relative_difference"] <= compared["first_loss_bound"], compared
