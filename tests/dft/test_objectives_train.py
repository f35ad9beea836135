"""`train.py` with the objectives beyond DFT, end to end on the embedded model, with packing (padding-free
micro-batches, positions restarting per sample: the reference model gets the same batch): ASFT on a full
fine-tune (a frozen copy), under LoRA (the base with the adapter off) and under ZeRO-3 on 2 ranks with bf16 and
activation checkpointing; EAFT under LoRA. Each run trains, saves, and logs what a user checks: the KL to the
starting model starts at 0 (the reference is the starting model) and grows as the policy moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from observability.artifacts import read_metrics
from tests.helpers import LAUNCH_DIR, run_script, run_train

QUICK = ("debug=quick", "heldout.file=null", "data.packing=true")


def logged(output_dir: Path, key: str) -> list[float]:
    return [record[key] for record in read_metrics(output_dir) if key in record]


def assert_kl_starts_at_zero_and_grows(output_dir: Path) -> None:
    kl = logged(output_dir, "kl")
    assert len(kl) == 3, kl  # every logging interval of 6 steps, 2 apart
    # The first interval's steps start from the reference itself: a KL of rounding size (float32 softmaxes over the
    # embedded vocabulary, bf16 weights under ZeRO-3); later ones, after optimizer steps, measurably above it.
    assert abs(kl[0]) < 1e-6 < kl[-1], kl
    assert logged(output_dir, "eval_kl"), "evaluation logs no KL"


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["none", "lora"], ids=["full_copy", "lora_base"])
def test_asft_trains_packed_and_logs_its_kl(tmp_path: Path, adapter: str) -> None:
    result = run_train(tmp_path, *QUICK, "loss.type=asft", f"model.adapter={adapter}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_kl_starts_at_zero_and_grows(tmp_path)
    assert set(logged(tmp_path, "dft_alpha")) == {1.0}
    log = (tmp_path / "logs" / "rank0.log").read_text()
    reference = "a frozen copy" if adapter == "none" else "the base with the adapter off (no copy)"
    assert f"asft (alpha 1, kl_coef 0.1); KL to the starting model: {reference}" in log


@pytest.mark.slow
def test_eaft_trains_packed_under_lora(tmp_path: Path) -> None:
    result = run_train(tmp_path, *QUICK, "loss.type=eaft", "model.adapter=lora")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses, nlls = logged(tmp_path, "loss"), logged(tmp_path, "nll")
    # The loss is CE weighted by normalised entropies in [0, 1]: below the plain CE of the same tokens.
    assert all(0 < loss < nll for loss, nll in zip(losses, nlls, strict=True)), (losses, nlls)
    assert not logged(tmp_path, "kl") and not logged(tmp_path, "dft_alpha")


@pytest.mark.distributed
def test_asft_under_zero3_on_two_ranks_with_bf16_and_checkpointing(tmp_path: Path, launch_env: dict) -> None:
    overrides = (*QUICK, "loss.type=asft", "deepspeed=zero3", "training.bf16=true")
    overrides += ("training.gradient_checkpointing=true",)
    run_script(
        [str(LAUNCH_DIR / "multi_node.sh"), *overrides, f"output_dir={tmp_path}"],
        env={**launch_env, "NNODES": "1", "NODE_RANK": "0", "NUM_GPUS": "2"},
        timeout=300,
        log_dirs=[tmp_path / "logs"],
    )
    assert_kl_starts_at_zero_and_grows(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
