"""LoRA adapters (`model.adapter=lora`, modeling/adapter.py): what is trained, the guards, the fused head, and a
run of train.py's own `fine_tune` on one rank that saves, verifies, reloads with peft and merges.

The 2-rank ZeRO-3 run is in tests/modeling/test_lora_zero3.py; resume and the non-finite guard with an adapter
are in tests/cluster/test_adapter_resilience.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from config.schema import LoraConfig, LossConfig, ModelConfig
from dft.fused_head import fused_lm_head
from dft.loss import dft_loss
from dft.objectives import build_objective
from embedded.families import FAMILIES, family_model
from modeling.adapter import (
    ADAPTER_WEIGHTS,
    MERGED_DIR,
    PROBE_TEXT,
    add_adapter,
    check_adapter_supported,
    count_parameters,
    merge_tolerance,
)
from observability.artifacts import read_metrics
from tests.helpers import (
    LORA_RUN,
    TINY_SIZE,
    fine_tune_in_process,
    relative_error,
    tiny_qwen2,
)

LORA = ModelConfig(adapter="lora")
LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DFT = build_objective(LossConfig(alpha=1.0))  # the paper's DFT, as `dft_loss(..., 1.0)` computes it


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def test_all_linear_adapts_every_linear_layer_but_the_head() -> None:
    model = add_adapter(tiny_qwen2(), LORA, seed=0)
    names = trainable_names(model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), names
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert adapted == set(LINEAR_LAYERS), adapted
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters()) and 0 < trainable < total
    # r 16 on each linear layer: (in + out) * r per layer.
    base = tiny_qwen2()
    expected = sum(
        (m.in_features + m.out_features) * LORA.lora.r
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LINEAR_LAYERS
    )
    assert trainable == expected


def test_target_modules_that_match_nothing_are_refused_naming_the_key() -> None:
    config = ModelConfig(adapter="lora", lora=LoraConfig(target_modules=["no_such_proj"]))
    with pytest.raises(ValueError, match=r"model\.lora\.target_modules=\['no_such_proj'\]"):
        add_adapter(tiny_qwen2(), config, seed=0)


def test_the_same_seed_draws_the_same_adapter() -> None:
    first = dict(add_adapter(tiny_qwen2(), LORA, seed=3).named_parameters())
    second = dict(add_adapter(tiny_qwen2(), LORA, seed=3).named_parameters())
    other = dict(add_adapter(tiny_qwen2(), LORA, seed=4).named_parameters())
    lora_a = [n for n in first if ".lora_A." in n]
    assert all(torch.equal(first[n], second[n]) for n in lora_a)
    assert not all(torch.equal(first[n], other[n]) for n in lora_a)


def test_fp16_base_keeps_the_adapter_weights_in_float32() -> None:
    model = add_adapter(tiny_qwen2().half(), LORA, seed=0)
    for name, parameter in model.named_parameters():
        expected = torch.float32 if parameter.requires_grad else torch.float16
        assert parameter.dtype == expected, f"{name}: {parameter.dtype}"


@pytest.mark.parametrize(
    ("adapter", "fp16", "cuda", "bf16", "refusal"),
    [
        ("qlora", False, False, False, r"model\.adapter=qlora needs a CUDA GPU.*use model\.adapter=lora"),
        ("lora", True, True, True, r"training\.fp16=true on a GPU that has bf16.*training\.bf16=true"),
        ("lora", True, True, False, None),  # V100/T4: fp16 allowed, the adapter stays float32 (test above)
        ("lora", False, False, False, None),
        ("none", True, True, True, None),  # full-parameter fp16 is the Trainer's business
    ],
)
def test_adapter_guards(adapter: str, fp16: bool, cuda: bool, bf16: bool, refusal: str | None) -> None:
    config = ModelConfig(adapter=adapter)
    if refusal is None:
        check_adapter_supported(config, fp16=fp16, cuda=cuda, bf16_supported=bf16)
    else:
        with pytest.raises(ValueError, match=refusal):
            check_adapter_supported(config, fp16=fp16, cuda=cuda, bf16_supported=bf16)


def test_merge_without_an_adapter_is_refused() -> None:
    with pytest.raises(ValueError, match=r"model\.merge_adapter=true needs an adapter run"):
        ModelConfig(merge_adapter=True)


# float32 sums over 2 x 6 trained tokens of small softmaxes: 1e-5 is ~100x float32's spacing, far below what a
# weight the fused loss skipped or misread would change (O(1)).
FUSED_BOUND = 1e-5


def fused_and_reference(model: torch.nn.Module, seed: int) -> tuple[tuple[float, dict], tuple[float, dict]]:
    """(loss, trainable gradients) of the fused DFT loss and of the full-logits one, on one random batch."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=generator)
    labels = input_ids.clone()
    labels[:, :2] = -100

    def loss_and_grads(fused: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        if fused:
            with fused_lm_head(model, labels, DFT, None, 4):
                loss = model(input_ids=input_ids).logits
        else:
            loss, _ = dft_loss(model(input_ids=input_ids).logits, labels, 1.0)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    return loss_and_grads(fused=True), loss_and_grads(fused=False)


def test_fused_loss_trains_a_fully_trained_head_like_the_full_logits() -> None:
    """`train_embeddings` trains peft copies of the (tied) embedding and head: the fused loss must use and train
    the copy, exactly as the full logits do."""
    config = ModelConfig(adapter="lora", lora=LoraConfig(train_embeddings=True))
    model = add_adapter(tiny_qwen2(), config, seed=0)
    copies = [n for n in trainable_names(model) if "modules_to_save" in n]
    assert copies, "train_embeddings trained no embedding copy"
    (fused_loss, fused_grads), (reference_loss, reference_grads) = fused_and_reference(model, seed=0)
    assert relative_error(fused_loss, reference_loss) < FUSED_BOUND
    for name in copies:
        assert reference_grads[name].abs().sum() > 0, f"{name} got no gradient from the full logits"
        assert relative_error(fused_grads[name], reference_grads[name]) < FUSED_BOUND, name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_trains_its_adapter_through_the_fused_loss(family: str) -> None:
    """Each tiny family (embedded/families.py) under `all-linear` LoRA: the fused DFT loss and its adapter
    gradients equal the full-logits ones (Gemma 2's final soft-cap included, applied inside the fused loss)."""
    no_dropout = ModelConfig(adapter="lora", lora=LoraConfig(dropout=0.0))  # both passes must see the same model
    model = add_adapter(family_model(family, TINY_SIZE, 0, attn_implementation="eager"), no_dropout, seed=0)
    generator = torch.Generator().manual_seed(1)
    for parameter in model.parameters():  # lora_B starts at zero: make the adapter's path count
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.02, generator=generator)
    (fused_loss, fused_grads), (reference_loss, reference_grads) = fused_and_reference(model, seed=1)
    assert relative_error(fused_loss, reference_loss) < FUSED_BOUND
    assert set(fused_grads) == set(reference_grads) and all(".lora_" in n for n in fused_grads)
    flat_fused, flat_reference = (
        torch.cat([g.flatten() for g in grads.values()]) for grads in (fused_grads, reference_grads)
    )
    assert relative_error(flat_fused, flat_reference) < FUSED_BOUND


def test_fused_loss_refuses_a_lora_head() -> None:
    config = ModelConfig(adapter="lora", lora=LoraConfig(target_modules=["q_proj", "lm_head"]))
    model = add_adapter(tiny_qwen2(), config, seed=0)
    labels = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="LM head carries a LoRA adapter"):
        with fused_lm_head(model, labels, DFT, None, 4):
            pass


# --- train.py's fine_tune with an adapter, one rank ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, str]:
    output_dir = tmp_path_factory.mktemp("lora") / "run"
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    train_logger = logging.getLogger("train")
    level = train_logger.level
    train_logger.addHandler(handler)
    train_logger.setLevel(logging.INFO)
    try:
        fine_tuned = fine_tune_in_process([*LORA_RUN, "model.merge_adapter=true", f"output_dir={output_dir}"])
    finally:
        train_logger.removeHandler(handler)
        train_logger.setLevel(level)
    return output_dir, fine_tuned, "\n".join(records)


@pytest.mark.slow
def test_lora_run_trains_only_the_adapter_and_the_loss_falls(lora_run: tuple[Path, object, str]) -> None:
    output_dir, fine_tuned, log = lora_run
    losses = [r["loss"] for r in read_metrics(output_dir) if "loss" in r]
    assert len(losses) == 12 and losses[-1] < 0.9 * losses[0], losses
    # The base on disk against the trained model's frozen weights, every one of them, bitwise.
    model = fine_tuned.model
    base = AutoModelForCausalLM.from_pretrained(model.peft_config["default"].base_model_name_or_path).state_dict()
    frozen = {n: p for n, p in model.get_base_model().named_parameters() if not p.requires_grad}
    assert len(frozen) == len(dict(model.get_base_model().named_parameters())) - len(trainable_names(model))
    for name, parameter in frozen.items():
        assert torch.equal(parameter, base[name.replace(".base_layer.", ".")]), f"{name} changed"
    assert all(".lora_" in n for n in trainable_names(model))
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n), "lora_B never trained"
    assert "trainable        " in log and "lora r 8 on all-linear" in log, log


@pytest.mark.slow
def test_lora_run_saves_an_adapter_that_peft_reloads(lora_run: tuple[Path, object, str]) -> None:
    output_dir, fine_tuned, _ = lora_run
    saved = load_file(output_dir / ADAPTER_WEIGHTS)
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), sorted(saved)[:4]
    assert not (output_dir / "model.safetensors").exists(), "an adapter run saved the full model"
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(output_dir)
    trained = dict(fine_tuned.model.named_parameters())
    for name, parameter in reloaded.named_parameters():
        if ".lora_" in name:
            assert torch.equal(parameter, trained[name]), f"{name}: reloaded differs from trained"


@pytest.mark.slow
def test_merged_model_matches_the_adapter_model(lora_run: tuple[Path, object, str]) -> None:
    """The merged model is a plain transformers model with the base's names and shapes whose logits equal the
    base + adapter's on a probe, within `merge_tolerance` of the saved dtype (its docstring says why)."""
    output_dir, fine_tuned, _ = lora_run
    merged_dir = output_dir / MERGED_DIR
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    base_path = fine_tuned.model.peft_config["default"].base_model_name_or_path
    base = AutoModelForCausalLM.from_pretrained(base_path)
    assert {n: p.shape for n, p in merged.named_parameters()} == {n: p.shape for n, p in base.named_parameters()}
    merged_weights = merged.state_dict()
    assert not all(torch.equal(merged_weights[n], t) for n, t in base.state_dict().items()), "the merge changed nothing"
    adapter_model = peft.PeftModel.from_pretrained(base, output_dir).eval()
    probe = AutoTokenizer.from_pretrained(merged_dir)(PROBE_TEXT, return_tensors="pt")
    with torch.no_grad():
        expected, got = adapter_model(**probe).logits, merged(**probe).logits
    assert relative_error(got.double(), expected.double()) <= merge_tolerance(merged.dtype)
    assert not list(output_dir.glob(f".{MERGED_DIR}-*")), "the merge left its staging directory behind"


@pytest.mark.slow
def test_lora_run_with_cross_entropy(tmp_path: Path) -> None:
    """loss.type=ce goes through the stock Trainer loss on the peft model: the adapter trains, the base does not."""
    output_dir = tmp_path / "ce"
    overrides = [*LORA_RUN, "loss.type=ce", f"output_dir={output_dir}"]
    model = fine_tune_in_process(overrides).model
    losses = [r["loss"] for r in read_metrics(output_dir) if "loss" in r]
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(".lora_" in n for n in trainable_names(model))
    assert set(load_file(output_dir / ADAPTER_WEIGHTS)) == {n.replace(".default.", ".") for n in trainable_names(model)}
