"""DFTTrainer.compute_loss: the fused path against the reference path on a real (tiny) model, single process.

Same loss and parameter gradients (tied embeddings, a final logit soft-cap), a graph-connected zero on a
micro-batch with no trainable token, the alpha warm-up, and that the head is restored after the call.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from core.keys import IGNORE_INDEX
from tests.helpers import VOCAB, loss_and_grads, make_trainer, tiny_gemma2, tiny_qwen2


def batch(seed: int = 1, rows: int = 2, seq: int = 12, prompt: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (rows, seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0  # right padding on the second row
    labels = input_ids.clone()
    labels[:, :prompt] = IGNORE_INDEX
    labels[attention_mask == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# float32 rounding (eps 1.19e-7) grows about as sqrt(n) over a reduction of n terms; the longest here is the softmax
# over the vocabulary (300), and a gradient chains a few such reductions through 2 layers forward and backward. Each
# float32 path must be within 4 * eps * sqrt(300) = 8.3e-6 of float64, relative in norm (measured: at most 9.5e-7 on
# 2 cores, whatever the thread count); a real error (a missed chunk, a wrong scale, the soft-cap left out) is 1e-3 or
# more. The two float32 paths are compared only through the float64 reference, never with each other.
FLOAT32_BOUND = 4 * torch.finfo(torch.float32).eps * 300**0.5


def float64_reference(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], alpha: float, num_items: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DFT loss and gradients written out independently, on a float64 copy of the model."""
    model64 = copy.deepcopy(model).double().train()
    logits = model64(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    labels = inputs["labels"][:, 1:]
    valid = labels != IGNORE_INDEX
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0][valid]
    weight = (alpha * torch.exp(-nll) + 1 - alpha).detach()
    loss = (weight * nll).sum() / (num_items if num_items is not None else valid.sum())
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model64.named_parameters()}


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("num_items", [None, torch.tensor(29)])
@pytest.mark.parametrize("build", [tiny_qwen2, tiny_gemma2], ids=["qwen2_tied", "gemma2_softcap"])
def test_fused_matches_reference_loss_and_gradients(
    tmp_path: Path, alpha: float, num_items: torch.Tensor | None, build
) -> None:
    model = build()
    inputs = batch()
    truth_loss, truth_grads = float64_reference(model, inputs, alpha, num_items)
    for implementation in ("reference", "fused"):
        # chunk_size 5 splits the 15 trainable tokens into several chunks.
        trainer = make_trainer(model, tmp_path, alpha=alpha, implementation=implementation, chunk_size=5)
        loss, grads = loss_and_grads(trainer, model, inputs, num_items)
        trainer.accelerator.free_memory()
        loss_error = abs(loss.double() - truth_loss) / abs(truth_loss)
        assert loss_error <= FLOAT32_BOUND, f"{implementation}: loss relative error {loss_error:.2e}"
        assert grads.keys() == truth_grads.keys()
        for name, truth in truth_grads.items():
            assert grads[name] is not None, f"{implementation}: {name} has no gradient"
            error = (grads[name].double() - truth).norm() / truth.norm()
            assert error <= FLOAT32_BOUND, f"{implementation}: {name}: relative error in norm {error:.2e}"
    # The head is itself again: logits come back, and the soft-cap is restored on the config.
    logits = model(input_ids=inputs["input_ids"]).logits
    assert logits.shape == (*inputs["input_ids"].shape, VOCAB)
    assert getattr(model.config, "final_logit_softcapping", None) == (2.0 if build is tiny_gemma2 else None)


@pytest.mark.parametrize("implementation", ["fused", "reference"])
def test_empty_micro_batch_gives_zero_loss_and_zero_gradients(tmp_path: Path, implementation: str) -> None:
    model = tiny_qwen2()
    inputs = batch()
    inputs["labels"] = torch.full_like(inputs["labels"], IGNORE_INDEX)
    trainer = make_trainer(model, tmp_path, implementation=implementation)
    # num_items_in_batch > 0: other micro-batches of the step have trainable tokens.
    loss, grads = loss_and_grads(trainer, model, inputs, torch.tensor(7))
    assert loss.item() == 0.0 and torch.isfinite(loss)
    for name, grad in grads.items():
        assert grad is not None, f"{name} got no gradient: a ZeRO-3 reduce-scatter would wait for it"
        assert torch.count_nonzero(grad) == 0, name


def test_alpha_warms_up_linearly_over_optimizer_steps(tmp_path: Path) -> None:
    trainer = make_trainer(tiny_qwen2(), tmp_path, alpha=0.8, alpha_warmup_steps=4)
    seen = []
    for step in (0, 1, 2, 4, 9):
        trainer.state.global_step = step
        seen.append(trainer.current_alpha())
    assert seen == pytest.approx([0.0, 0.2, 0.4, 0.8, 0.8])
    assert make_trainer(tiny_qwen2(), tmp_path, alpha=0.8).current_alpha() == 0.8


def test_warm_up_alpha_is_the_one_used_and_logged(tmp_path: Path) -> None:
    model = tiny_qwen2()
    inputs = batch()
    trainer = make_trainer(model, tmp_path, alpha=1.0, alpha_warmup_steps=2)
    trainer.state.global_step = 1
    warm_loss, _ = loss_and_grads(trainer, model, inputs, None)
    half_loss, _ = loss_and_grads(make_trainer(model, tmp_path, alpha=0.5), model, inputs, None)
    torch.testing.assert_close(warm_loss, half_loss)
    logs = {"loss": warm_loss.item()}
    trainer.log(logs)
    assert logs["dft_alpha"] == 0.5
