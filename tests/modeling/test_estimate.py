"""`python -m modeling.estimate`: the parameter counts and model-state bytes of each mode, checked against the
architecture's formula worked out by hand from the shipped 7B-shaped config (docs/shapes/qwen2.5-7b)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from modeling.estimate import NF4_DOUBLE_QUANT_BYTES
from tests.helpers import REPO_ROOT

SHAPE = "docs/shapes/qwen2.5-7b"


def qwen2_counts(config: dict, r: int) -> tuple[int, int, int]:
    """(all parameters, LoRA parameters on every linear layer but the head, parameters of those linear layers)."""
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    linears = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter)]
    linears.append((inter, hidden))
    linear_weights = layers * sum(i * o for i, o in linears)
    per_layer_extra = hidden + 2 * kv + 2 * hidden  # q/k/v biases, two RMSNorms
    embeddings = config["vocab_size"] * hidden * (1 if config["tie_word_embeddings"] else 2)
    total = linear_weights + layers * per_layer_extra + embeddings + hidden
    lora = layers * r * sum(i + o for i, o in linears)
    return total, lora, linear_weights


@pytest.mark.parametrize("r", [16, 8])
def test_estimate_of_a_7b_shape_matches_the_formula(r: int) -> None:
    config = json.loads((REPO_ROOT / SHAPE / "config.json").read_text())
    total, lora, linear_weights = qwen2_counts(config, r)
    output = subprocess.run(
        [sys.executable, "-m", "modeling.estimate", "--json", f"model.name_or_path={SHAPE}", f"model.lora.r={r}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    modes = {m["mode"]: m for m in json.loads(output)["modes"]}
    assert modes["full"]["trainable"] == modes["full"]["total"] == total
    assert modes["full"]["model_states_bytes"] == 16 * total  # bf16 weight and grad, fp32 master, m, v
    for mode in ("lora", "qlora"):
        assert modes[mode]["trainable"] == lora and modes[mode]["total"] == total + lora
        assert modes[mode]["training_state_bytes"] == 12 * lora  # fp32 grad, m, v; the fp32 weight is a weight
    assert modes["lora"]["weights_bytes"] == 2 * total + 4 * lora
    qlora_weights = NF4_DOUBLE_QUANT_BYTES * linear_weights + 2 * (total - linear_weights) + 4 * lora
    assert modes["qlora"]["weights_bytes"] == pytest.approx(qlora_weights, rel=1e-12)
    assert 7.6e9 < total < 7.7e9  # the released Qwen2.5-7B's 7.62B


def test_estimate_prints_a_table() -> None:
    output = subprocess.run(
        [sys.executable, "-m", "modeling.estimate", "--gpus", "8", f"model.name_or_path={SHAPE}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "| full | 7,615,616,512 | 100.00% |" in output, output
    assert "| lora | 40,370,176 | 0.53% |" in output, output
    assert "per GPU (ZeRO-3, 8 GPUs)" in output
