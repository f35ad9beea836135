"""A reward model's scalar score head (`modeling.heads.SCORE`): where it reads, how an adapter trains it, and the
merge of such an adapter into a model that `AutoModelForSequenceClassification` reloads and that scores the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from config.schema import load_run_config
from modeling.adapter import add_adapter, load_adapter_model, merge_adapter
from modeling.heads import SCORE, head_of
from modeling.loading import load_model, load_tokenizer, resolve_model_path


@pytest.fixture(scope="module")
def base() -> tuple:
    run = load_run_config(["model.adapter=lora"])
    path = resolve_model_path(run.model)
    return run, path, load_tokenizer(run.model, path)


def score_model(base: tuple, seed: int = 3) -> torch.nn.Module:
    run, path, tokenizer = base
    return load_model(
        run.model, path, bf16=False, deepspeed=False, head=SCORE, pad_token_id=tokenizer.pad_token_id, seed=seed
    )


def test_the_score_is_read_at_each_rows_last_real_token_whatever_the_padding(base: tuple) -> None:
    tokenizer = base[2]
    model = score_model(base).eval()
    assert head_of(model) == SCORE and model.config.num_labels == 1
    texts = ["a short one", "a somewhat longer sentence than the first"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        batched = model(**batch).logits.squeeze(-1)
        alone = torch.stack([model(**tokenizer(t, return_tensors="pt")).logits.squeeze() for t in texts])
        # Independent of the head's own indexing: the score head on the last real token's hidden state.
        hidden = model.model(**tokenizer(texts[0], return_tensors="pt")).last_hidden_state[0, -1]
    # float32 on one CPU: the padded row runs the same arithmetic on its real tokens, up to summation order.
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone[0], model.score(hidden).squeeze(), rtol=1e-5, atol=1e-5)


def test_the_same_seed_draws_the_same_new_head_on_every_rank(base: tuple) -> None:
    assert torch.equal(score_model(base, seed=5).score.weight, score_model(base, seed=5).score.weight)
    assert not torch.equal(score_model(base, seed=5).score.weight, score_model(base, seed=6).score.weight)


def test_an_adapter_trains_the_new_score_head_in_full(base: tuple) -> None:
    run = base[0]
    adapted = add_adapter(score_model(base), run.model, seed=0)
    trainable = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert any("lora_" in name for name in trainable)
    heads = [name for name in trainable if "score" in name]
    assert heads and all("modules_to_save" in name for name in heads)


def test_a_merged_reward_adapter_reloads_as_a_sequence_classifier_scoring_the_same(base: tuple, tmp_path: Path) -> None:
    run, path, tokenizer = base
    adapted = add_adapter(score_model(base), run.model, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as if trained: non-zero LoRA updates and a moved score head
        for parameter in adapted.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    adapted.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    batch = tokenizer(["the pair's chosen reply", "and its rejected one, longer"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = adapted.eval()(**batch).logits
        reloaded_adapter = load_adapter_model(score_model(base, seed=99), tmp_path)(**batch).logits
    torch.testing.assert_close(reloaded_adapter, expected)  # the saved head, not a new random one

    merged_dir = merge_adapter(path, tmp_path, head=SCORE, pad_token_id=tokenizer.pad_token_id)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        got = merged(**batch).logits
    # The merge folds W + s B A into float32 weights once: one rounding per weight against the unmerged sum.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
