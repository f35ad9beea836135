"""LoRA under ZeRO-3 on 2 CPU ranks with the DFT loss (tests/modeling/lora_zero3_check.py): the loss falls, only
the adapter trains, the adapter is saved whole (not the empty tensors a ZeRO-3 save leaves without gathering) and
peft reloads it, and the merged model is written and checked on rank 0 after the process group's training."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modeling.adapter import ADAPTER_WEIGHTS, MERGED_DIR
from observability.artifacts import read_metrics
from tests.helpers import FAMILY_MATRIX_RECIPE, LORA_FROZEN_REPORT, LORA_RUN, REPO_ROOT, run_on_two_deepspeed_ranks

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_lora_under_zero3_on_two_ranks(tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    overrides = [*LORA_RUN, *FAMILY_MATRIX_RECIPE, "model.merge_adapter=true"]
    run_on_two_deepspeed_ranks(
        REPO_ROOT / "tests" / "modeling" / "lora_zero3_check.py", "--out", str(output_dir), *overrides
    )

    losses = [r["loss"] for r in read_metrics(output_dir) if "loss" in r]
    assert len(losses) == 12 and losses[-1] < 0.9 * losses[0], losses
    report = json.loads((output_dir / LORA_FROZEN_REPORT).read_text())
    assert report["checked"] > 0 and report["changed"] == [], report["changed"]
    assert report["trainable"] and all(".lora_" in name for name in report["trainable"]), report["trainable"]
    assert report["frozen_dtypes"] == ["torch.bfloat16"], report  # the bf16 recipe really ran

    saved = load_file(output_dir / ADAPTER_WEIGHTS)
    assert len(saved) == len(report["trainable"])
    for name, tensor in saved.items():
        assert ".lora_" in name and tensor.numel() > 0, f"{name}: {tuple(tensor.shape)}"
    assert any(".lora_B." in name and tensor.abs().sum() > 0 for name, tensor in saved.items()), "lora_B never trained"
    peft.AutoPeftModelForCausalLM.from_pretrained(output_dir)
    merged = AutoModelForCausalLM.from_pretrained(output_dir / MERGED_DIR)
    assert merged.num_parameters() > 0
