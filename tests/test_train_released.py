"""train.py on a released model (SmolLM2-135M-Instruct, `embedded:smollm2-135m`): a few steps of full SFT, of
LoRA and of `loss.type=ce`, each with the held-out before/after table, and the export reloaded and generating.

Short on purpose (2 steps of 4 samples, 8 held-out prompts): these check that a real model's vocabulary, template
and weights go through every step and that the reported numbers are real, not what the model learns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_pipeline.tokenize import TokenizeOptions
from embedded.addition import ADDITION_DIR
from evaluation.heldout import HELDOUT_JSON, encode_heldout, greedy_replies, load_heldout
from tests.helpers import run_ok

pytestmark = pytest.mark.slow

HELDOUT_PROMPTS = 8
QUICK_RELEASED = (
    "experiment=smollm2_addition",
    "training.max_steps=2",
    "training.per_device_train_batch_size=4",
    "training.logging_steps=1",
    "training.eval_strategy=no",
    f"data.sources=[{{path:{ADDITION_DIR / 'additions_chat.jsonl'},max_samples:16}}]",
    "data.validation_split_percentage=0",
    f"heldout.max_samples={HELDOUT_PROMPTS}",
    "heldout.max_new_tokens=10",
)


def heldout_record(output_dir: Path) -> dict:
    record = json.loads((output_dir / HELDOUT_JSON).read_text())
    assert record["prompts"] == HELDOUT_PROMPTS and record["reply_tokens"] > HELDOUT_PROMPTS
    for when in ("before", "after"):
        assert math.isfinite(record[when]["nll"]) and record[when]["nll"] > 0, record
    assert record["after"]["nll"] != record["before"]["nll"]  # the weights moved
    return record


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("full-dft", ("loss.type=dft", "loss.alpha=0.5")),
        ("lora", ("model.adapter=lora", "training.learning_rate=1e-3")),
        ("full-ce", ("loss.type=ce",)),
    ],
)
def test_released_model_trains_and_reports_real_heldout_numbers(
    name: str, overrides: tuple[str, ...], released_model_dir: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / name
    result = run_ok(output_dir, *QUICK_RELEASED, *overrides)
    record = heldout_record(output_dir)
    assert "held-out assistant NLL:            before 0.000" not in result.stdout + result.stderr
    if name == "lora":
        assert (output_dir / "adapter_model.safetensors").is_file()
        return
    # The export reloads on its own and generates what the run reported for it.
    model = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert len(tokenizer) == 49152
    (dialogue,) = load_heldout(ADDITION_DIR / "heldout.jsonl", max_samples=1)
    prompt = encode_heldout(dialogue, tokenizer, TokenizeOptions(max_length=96)).prompt_ids
    (reply,) = greedy_replies(model, tokenizer, [prompt], max_new_tokens=10)
    assert reply == record["generations"][0]["after"]
