"""`python -m modeling.estimate`: the parameter counts and model-state bytes of each mode, checked against the
architecture's formula worked out by hand from the shipped 7B-shaped config (docs/shapes/qwen2.5-7b), and the
QLoRA weights against the dtypes of a prepared model counted independently of the estimate's code path."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch

from config.schema import load_run_config
from embedded.families import FamilySize, family_model
from modeling.adapter import add_adapter, quantization_config
from modeling.estimate import NF4_DOUBLE_QUANT_BYTES, estimate
from tests.helpers import REPO_ROOT

SHAPE = "docs/shapes/qwen2.5-7b"
# Every linear weight a multiple of 16,384 (64-weight blocks, 256 blocks per second-level scale), so NF4 with
# double quantization costs exactly 0.5 + 1/64 + 4/16384 bytes per weight, no partial block.
TINY = FamilySize(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)
TINY_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    # peft's prepare_model_for_kbit_training casts every bf16 parameter that is not 4-bit to fp32: the embedding,
    # biases and norms cost 4 bytes each under QLoRA.
    qlora_weights = NF4_DOUBLE_QUANT_BYTES * linear_weights + 4 * (total - linear_weights) + 4 * lora
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


@pytest.fixture(scope="module")
def tiny_bf16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 with an untied LM head (which QLoRA leaves unquantised), saved in bf16 as a run loads it."""
    path = tmp_path_factory.mktemp("tiny_qwen2")
    family_model("qwen2", TINY, tie_word_embeddings=False).to(torch.bfloat16).save_pretrained(path)
    return path


def qlora_estimate(path: Path) -> tuple[object, dict]:
    model_cfg = load_run_config([f"model.name_or_path={path}", "model.adapter=qlora"]).model
    return model_cfg, next(dataclasses.asdict(row) for row in estimate(model_cfg, str(path)) if row.mode == "qlora")


def weights_by_dtype(model: torch.nn.Module, quantized_bytes: dict[int, float]) -> dict[str, float]:
    """Bytes of every parameter by the dtype it is left in; the 4-bit ones (by id) at the bytes given for them."""
    counts: dict[str, float] = {}
    for parameter in model.parameters():
        key = "4bit" if id(parameter) in quantized_bytes else str(parameter.dtype)
        counts[key] = counts.get(key, 0) + quantized_bytes.get(
            id(parameter), parameter.numel() * parameter.element_size()
        )
    return counts


def test_qlora_weights_match_a_prepared_model_counted_by_dtype(tiny_bf16_model: Path) -> None:
    """Independent of the estimate's meta-device marking: the real bf16 weights loaded from disk, the 4-bit linear
    layers named by hand and packed as bitsandbytes stores NF4 by default (two 4-bit codes per uint8, which
    peft's rule never casts: it casts bf16/fp16 only), then peft's own `prepare_model_for_kbit_training` and
    `get_peft_model`; the bytes read from the dtypes peft leaves. Block scales are added per weight, since a
    packed tensor carries none."""
    from transformers import AutoModelForCausalLM

    model_cfg, row = qlora_estimate(tiny_bf16_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_bf16_model, dtype=torch.bfloat16)
    quantized: dict[int, float] = {}
    for name, linear in model.named_modules():
        if name.rsplit(".", 1)[-1] in TINY_LINEARS:
            packed = torch.zeros(linear.weight.numel() // 2, dtype=torch.uint8)
            linear.weight = torch.nn.Parameter(packed, requires_grad=False)
            quantized[id(linear.weight)] = 2 * packed.numel() * NF4_DOUBLE_QUANT_BYTES
    prepared = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = model_cfg.lora
    adapted = peft.get_peft_model(
        prepared,
        peft.LoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, target_modules=list(TINY_LINEARS)),
        autocast_adapter_dtype=True,
    )
    counts = weights_by_dtype(adapted, quantized)
    # Nothing is left in bf16: the embedding, the untied head, the norms and biases are fp32, as is the adapter.
    assert set(counts) == {"4bit", "torch.float32"}, counts
    assert row["weights_bytes"] == pytest.approx(sum(counts.values()), rel=1e-12)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert row["trainable"] == trainable and row["training_state_bytes"] == 12 * trainable


def test_qlora_weights_match_bitsandbytes_on_cpu(tiny_bf16_model: Path) -> None:
    """With bitsandbytes (the `qlora` extra; its 4-bit path runs on CPU from 0.46): the model as a QLoRA run builds
    it (`from_pretrained` with the run's 4-bit config, then `add_adapter`), its 4-bit weights counted from their
    packed storage plus their quantization state's 8-bit block scales and fp32 second-level scales, every other
    parameter by its dtype. Exact: each linear weight fills its blocks (TINY); the per-tensor code tables and
    offset (about 1 KiB a layer) are left out, by the estimate too."""
    pytest.importorskip("bitsandbytes", reason="the qlora extra: pip install 'dft-sft[qlora]'")
    from transformers import AutoModelForCausalLM

    model_cfg, row = qlora_estimate(tiny_bf16_model)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_bf16_model, dtype=torch.bfloat16, quantization_config=quantization_config(model_cfg), device_map="cpu"
    )
    quantized = {}
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            scales = state.absmax.numel() * state.absmax.element_size()
            scales += state.state2.absmax.numel() * state.state2.absmax.element_size()
            quantized[id(parameter)] = parameter.numel() * parameter.element_size() + scales
    assert len(quantized) == len(TINY_LINEARS) * TINY.num_hidden_layers
    adapted = add_adapter(model, model_cfg, seed=0)
    counts = weights_by_dtype(adapted, quantized)
    assert set(counts) == {"4bit", "torch.float32"}, counts
    assert row["weights_bytes"] == pytest.approx(sum(counts.values()), rel=1e-12)
