"""The held-out evaluation on a released model and on a template without generation markers: the reference reply's
NLL against an independent float64 computation, refusals, and batched generation equal to one prompt at a time."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from config.schema import load_run_config
from data_pipeline.tokenize import TokenizeOptions, has_generation_markers
from embedded.addition import ADDITION_DIR
from embedded.paths import SAMPLE_DIR, TOKENIZER_DIR
from evaluation.heldout import HeldoutDialogue, encode_heldout, evaluate_heldout, greedy_replies, load_heldout
from evaluation.run_heldout import heldout_baseline

OPTIONS = TokenizeOptions(max_length=10**9)
TWO_TURNS = [
    {"role": "system", "content": "You answer with the equation."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42"},
    {"role": "user", "content": "And 25 + 25?"},
    {"role": "assistant", "content": "25 + 25 = 50"},
]


def float64_reply_nll(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dialogues: list[HeldoutDialogue], end_of_turn: str
) -> tuple[float, int]:
    """The reference: each reply located in the rendered text (the last occurrence of its content followed by the
    end-of-turn token), the tokens whose characters overlap it scored by a float64 copy of the model."""
    model64 = AutoModelForCausalLM.from_config(model.config, dtype=torch.float64)
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    total, count = 0.0, 0
    for dialogue in dialogues:
        text = tokenizer.apply_chat_template(dialogue.messages, tokenize=False)
        reply = dialogue.messages[-1]["content"] + end_of_turn
        start = text.rindex(reply)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([encoded["input_ids"]])
        positions = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < start + len(reply) and b > start]
        with torch.no_grad():
            log_probs = torch.log_softmax(model64(input_ids=ids).logits[0], dim=-1)
        total -= sum(log_probs[i - 1, ids[0, i]].item() for i in positions)
        count += len(positions)
    return total / count, count


def assert_nll_matches_float64(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dialogues: list[HeldoutDialogue], end_of_turn: str
) -> None:
    result = evaluate_heldout(model, tokenizer, dialogues, max_new_tokens=2, options=OPTIONS, batch_size=3)
    reference, count = float64_reply_nll(model, tokenizer, dialogues, end_of_turn)
    assert result.reply_tokens == count > 0
    assert result.nll > 0
    # float32 logits through the model carry a relative error of a few 1e-6 per layer; a token's NLL (log-sum-exp
    # minus one logit) then moves by about that times the logits' size (~10-30): 1e-4 nats is a 10x margin on the
    # errors measured here, and far below a wrong token set (one token more or less moves the mean by ~0.1).
    assert abs(result.nll - reference) < 1e-4, (result.nll, reference)


def test_released_model_heldout_nll_equals_an_independent_float64_computation(
    released_model: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = released_model
    assert not has_generation_markers(tokenizer)  # the released template: replies located by prefix rendering
    dialogues = load_heldout(ADDITION_DIR / "heldout.jsonl", max_samples=3) + [HeldoutDialogue("two-turn", TWO_TURNS)]
    assert_nll_matches_float64(model, tokenizer, dialogues, "<|im_end|>")


def test_a_template_without_markers_scores_the_reply_training_would_label(base_model_dir: Path) -> None:
    """The embedded model with the ChatML template stripped of its `{% generation %}` markers: the same reply."""
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.chat_template = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", tokenizer.chat_template)
    assert not has_generation_markers(tokenizer)
    dialogues = [
        HeldoutDialogue(
            "reversal",
            [{"role": "user", "content": "Reverse the word.\na b c"}, {"role": "assistant", "content": "c b a"}],
        ),
        HeldoutDialogue("follow-up", TWO_TURNS),
    ]
    assert_nll_matches_float64(model, tokenizer, dialogues, "<|im_end|>")


def test_a_reply_the_template_gives_no_token_is_refused_with_its_line(tmp_path: Path, chatml_tokenizer) -> None:
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"messages": TWO_TURNS[1:3]}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    # A template that never writes an assistant message: there is nothing to score.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role != 'assistant' %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (dialogue,) = load_heldout(heldout, max_samples=10)
    with pytest.raises(ValueError, match=rf"{heldout}:1: the chat template leaves the reference reply without"):
        encode_heldout(dialogue, tokenizer, OPTIONS)


def test_batched_generation_gives_the_tokens_of_one_prompt_at_a_time(
    released_model: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    """Left padding and length-sorted batches change nothing: the same replies, in the given order, and the
    tokenizer's padding side is restored."""
    model, tokenizer = released_model
    dialogues = load_heldout(ADDITION_DIR / "heldout.jsonl", max_samples=8)
    prompts = [encode_heldout(d, tokenizer, OPTIONS).prompt_ids for d in dialogues]
    prompts[3] = prompts[3][:-4] + prompts[0][-4:]  # lengths differ, so batches really pad
    side = tokenizer.padding_side
    batched = greedy_replies(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    assert tokenizer.padding_side == side
    one_at_a_time = [greedy_replies(model, tokenizer, [prompt], max_new_tokens=8)[0] for prompt in prompts]
    assert batched == one_at_a_time
    assert len(set(batched)) > 1  # real, varied replies


def test_the_base_models_heldout_pass_is_computed_once_per_model_file_and_settings(
    base_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every arm and seed of a comparison starts from the same pass: the second run reuses it, a changed held-out
    file or setting does not."""
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text((SAMPLE_DIR / "heldout.jsonl").read_text().splitlines()[0] + "\n")
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    common = [f"heldout.file={heldout}", f"data.cache_dir={tmp_path / 'cache'}", "heldout.max_new_tokens=4"]
    first = heldout_baseline(load_run_config(common), str(base_model_dir), tokenizer)
    (saved,) = (tmp_path / "cache" / "heldout").glob("*.json")
    with caplog.at_level(logging.INFO):
        again = heldout_baseline(load_run_config(common), str(base_model_dir), tokenizer)
    assert "reused" in caplog.text and again == first
    heldout.write_text((SAMPLE_DIR / "heldout.jsonl").read_text().splitlines()[1] + "\n")
    changed = heldout_baseline(load_run_config(common), str(base_model_dir), tokenizer)
    other_setting = heldout_baseline(
        load_run_config([*common, "heldout.max_new_tokens=5"]), str(base_model_dir), tokenizer
    )
    assert changed.generations[0].prompt != first.generations[0].prompt
    assert len(list(saved.parent.glob("*.json"))) == 3 and other_setting.generations
