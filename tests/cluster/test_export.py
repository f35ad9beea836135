"""Verified export: a saved model that differs from the trained one is refused with the parameter named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from cluster.export import ExportError, verify_export


@pytest.fixture
def saved_model(tmp_path: Path) -> tuple[Qwen2ForCausalLM, Path]:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_a_faithful_export_passes(saved_model: tuple[Qwen2ForCausalLM, Path]) -> None:
    model, out = saved_model
    assert verify_export(model, out, is_rank_zero=True, zero3=False) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"}, "model.norm.weight: missing"),
        (lambda t: {**t, "model.norm.weight": torch.empty(0)}, "model.norm.weight: saved tensor is empty"),
        (lambda t: {**t, "model.norm.weight": torch.ones(3)}, "model.norm.weight: saved shape (3,)"),
        (lambda t: {**t, "model.norm.weight": t["model.norm.weight"] + 1e-3}, "model.norm.weight: saved values differ"),
    ],
)
def test_a_corrupt_export_is_refused(saved_model: tuple[Qwen2ForCausalLM, Path], corrupt, message: str) -> None:
    model, out = saved_model
    path = out / "model.safetensors"
    save_file(corrupt(load_file(path)), path, metadata={"format": "pt"})
    with pytest.raises(ExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        verify_export(model, out, is_rank_zero=True, zero3=False)


def test_no_saved_files_is_refused(tmp_path: Path) -> None:
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1))  # fmt: skip
    with pytest.raises(ExportError, match="no \\*.safetensors"):
        verify_export(model, tmp_path, is_rank_zero=True, zero3=False)
