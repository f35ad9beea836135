"""Padding-free packing: a packed micro-batch trains exactly as the same samples padded.

Loss and every parameter gradient (fp32, 1e-5) through DFTTrainer.compute_loss, fused and reference, with the
step's token count (`num_items_in_batch`) taken from each layout's own labels, as the Trainer counts it; and the
parameters after two optimizer steps of `Trainer.train` with gradient accumulation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from data_pipeline.packing import PaddingFreeCollator
from dft.loss import IGNORE_INDEX
from dft.trainer import DFTTrainer
from tests.dft.test_trainer_fused import loss_and_grads, make_trainer
from tests.tiny_models import VOCAB, tiny_qwen2

LENGTHS = (5, 11, 8)


def features() -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(3)
    out = []
    for length in LENGTHS:
        input_ids = torch.randint(0, VOCAB, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * 2 + input_ids[2:]  # a two-token prompt
        out.append({"input_ids": input_ids, "attention_mask": [1] * length, "labels": labels})
    return out


def padded(samples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    width = max(len(s["input_ids"]) for s in samples)
    pad = [width - len(s["input_ids"]) for s in samples]
    return {
        "input_ids": torch.tensor([s["input_ids"] + [0] * p for s, p in zip(samples, pad, strict=True)]),
        "attention_mask": torch.tensor([s["attention_mask"] + [0] * p for s, p in zip(samples, pad, strict=True)]),
        "labels": torch.tensor([s["labels"] + [IGNORE_INDEX] * p for s, p in zip(samples, pad, strict=True)]),
    }


def trainable_tokens(labels: torch.Tensor) -> torch.Tensor:
    return (labels[..., 1:] != IGNORE_INDEX).sum()


def test_collator_restarts_positions_and_separates_labels() -> None:
    batch = PaddingFreeCollator()(features())
    assert batch["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in batch
    assert batch["use_cache"] is False
    starts = [0, LENGTHS[0], LENGTHS[0] + LENGTHS[1]]
    assert batch["position_ids"][0, starts].tolist() == [0, 0, 0]
    assert batch["labels"][0, starts].tolist() == [IGNORE_INDEX] * 3


@pytest.mark.parametrize("implementation", ["fused", "reference"])
def test_packed_batch_gives_the_padded_loss_and_gradients(tmp_path: Path, implementation: str) -> None:
    model = tiny_qwen2()
    samples = features()
    packed_inputs, padded_inputs = PaddingFreeCollator()(samples), padded(samples)
    assert trainable_tokens(packed_inputs["labels"]) == trainable_tokens(padded_inputs["labels"])
    trainer = make_trainer(model, tmp_path, alpha=0.6, implementation=implementation)
    # As with training.use_cache=true: the collator must still keep the samples apart.
    model.config.use_cache = True
    results = {}
    for name, inputs in (("padded", padded_inputs), ("packed", packed_inputs)):
        results[name] = loss_and_grads(trainer, model, inputs, trainable_tokens(inputs["labels"]))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results["padded"], results["packed"]
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_training_steps_with_packing_match_padding(tmp_path: Path) -> None:
    """Through `Trainer.train`: the Trainer's own token count, gradient accumulation and optimizer steps."""
    samples = features() * 4  # 12 samples: 2 optimizer steps of 2 micro-batches of 3 samples
    start = {key: p.detach().clone() for key, p in tiny_qwen2().named_parameters()}
    params = {}
    for name, collator in (("padded", padded), ("packed", PaddingFreeCollator())):
        model = tiny_qwen2()
        args = TrainingArguments(
            output_dir=str(tmp_path / name),
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            per_device_train_batch_size=3,
            gradient_accumulation_steps=2,
            max_steps=2,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
            disable_tqdm=True,
        )
        trainer = DFTTrainer(
            model=model, args=args, train_dataset=samples, data_collator=collator, alpha=0.6, implementation="fused"
        )
        trainer.train()
        params[name] = {key: p.detach().clone() for key, p in model.named_parameters()}
    for key, value in params["padded"].items():
        assert not torch.equal(value, start[key]), f"{key} did not train"
        torch.testing.assert_close(params["packed"][key], value, rtol=1e-5, atol=1e-6, msg=key)
