"""bench/train_throughput_gpu.py: its `--smoke` mode runs every GPU-mode row on CPU at a tiny size with the MFU
arithmetic of its docstring, and the docs section of a GPU run renders from its rows."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import bench.docs
from bench.train_throughput_gpu import (
    ARMS,
    QWEN25_15B,
    SECTION_HEADING,
    SMOKE,
    comparisons,
    format_table,
    with_mfu,
    write_docs_section,
)
from embedded.families import family_config
from modeling.adapter import meta_model
from observability.flops import flop_parameters

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_flop_parameters_of_the_qwen25_15b_shape_are_its_layers_and_head() -> None:
    model = meta_model(family_config("qwen2", QWEN25_15B))
    layers_and_head = (
        sum(p.numel() for p in model.model.layers.parameters())
        + model.model.norm.weight.numel()
        + model.lm_head.weight.numel()
    )
    assert flop_parameters(model) == (layers_and_head, 0)
    # Qwen2.5-1.5B: 1.54B parameters, 1.31B of them outside the (tied) embedding.
    total = sum(p.numel() for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert 1.53e9 <= total <= 1.55e9, total
    assert 1.30e9 <= total - model.model.embed_tokens.weight.numel() <= 1.32e9


@pytest.mark.slow
def test_smoke_mode_runs_every_gpu_row_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("trl")
    results = tmp_path / "smoke.json"
    command = [sys.executable, "-m", "bench.train_throughput_gpu", "--smoke", "--peak-tflops", "2.5"]
    subprocess.run([*command, "--json", str(results)], cwd=REPO_ROOT, check=True, capture_output=True, timeout=300)
    result = json.loads(results.read_text())
    rows = result["rows"]
    assert len(rows) == len(ARMS) and result["peak_flops"] == 2.5e12
    config = family_config("qwen2", SMOKE.size)
    for row in rows:
        if row["liger"]:  # Liger's kernels are Triton: CUDA only
            assert "CUDA" in row["skipped"], row
            continue
        assert "skipped" not in row, row
        assert len(row["losses"]) == SMOKE.steps and all(math.isfinite(loss) for loss in row["losses"]), row
        assert row["tokens_per_s"] > 0 and row["timed_steps"] == SMOKE.steps - SMOKE.warmup_steps
        assert row["attn_implementation"] == "sdpa" and row["peak_allocated_gib"] is None
        # MFU = (6 N + 12 L H C) x tokens/s / peak: every weight trains; N counted from the shape.
        assert (row["trainable_flop_parameters"], row["frozen_flop_parameters"]) == flop_parameters(meta_model(config))
        attention = 12 * SMOKE.size.num_hidden_layers * SMOKE.size.hidden_size * row["mean_attended_context"]
        flops = 6 * row["trainable_flop_parameters"] + attention
        assert row["model_flops_per_token"] == pytest.approx(flops, rel=1e-12)
        assert row["mfu"] == pytest.approx(flops * row["tokens_per_s"] / 2.5e12, rel=1e-12)
    # The same micro-batches on both sides: the first losses agree within the bf16 bound the script states.
    assert {c["versus"] for c in result["comparisons"]} == {"TRL dft", "TRL ce"}
    for compared in result["comparisons"]:
        assert compared["first_loss_relative_difference"] <= compared["first_loss_bound"], compared
    # The docs section a GPU run writes renders from these rows (a skipped Liger row included).
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    monkeypatch.setattr(bench.docs, "DOCS_PATH", docs)
    write_docs_section(result)
    text = docs.read_text()
    assert "## Other\n\nkept\n" in text and text.count(SECTION_HEADING) == 1
    assert "TRL+Liger DFT's tokens/s: not measured" in text and "MFU >= 35%: dft " in text


def test_a_failed_row_is_reported_and_left_out_of_the_comparisons() -> None:
    """On a GPU each row runs in its own process; one that crashes (a Liger release at odds with transformers, say)
    is recorded as failed while the others are measured, and no ratio or MFU is computed from it."""
    measured = {"tokens_per_s": 100.0, "model_flops_per_token": 6e9, "losses": [2.0, 1.9], "vocab_size": 512}
    measured |= {"attn_implementation": "sdpa", "seconds": 1.0, "peak_rss_mib": 900.0}
    measured |= {"peak_allocated_gib": 10.0, "peak_reserved_gib": 12.0}
    project = {"side": "project", "loss": "dft", "liger": False, **measured}
    failed = {"side": "TRL", "loss": "dft", "liger": True, "failed": "ImportError: cannot import name 'x'"}
    rows = with_mfu([project, failed], peak_flops=1e12)
    assert rows[0]["mfu"] == pytest.approx(6e9 * 100 / 1e12) and "mfu" not in rows[1]
    assert comparisons(rows) == []
    assert "| dft | TRL+Liger | FAILED: ImportError: cannot import name 'x' |" in format_table(rows)
