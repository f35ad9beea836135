"""Reasoning traces: LLaMA-Factory's `reasoning` parts, a `reasoning_content` field and inline `<think>` content.

Each is kept through the canonical schema, trained as part of its assistant turn (the tests decode the trained
tokens), given to a template that reads `reasoning_content` as that field and written inline, between thinking
markers, for one that does not; and counted per source.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from config.schema import DataConfig
from data_pipeline.prepare import build_datasets
from data_pipeline.schema import MESSAGES_KEY, REASONING_KEY, to_canonical
from data_pipeline.tokenize import REASONING_TURNS_KEY, TokenizeOptions, tokenize_dialogue, tokenize_dialogues
from embedded.paths import TOKENIZER_DIR
from tests.helpers import NO_HELDOUT, run_ok, trained_runs

QUESTION = "Reverse the word.\nabc"
REASONING = "The letters are a, b, c; backwards they read c, b, a."
ANSWER = "c b a"
# The same turn written the three ways users' data carries it.
LLAMA_FACTORY_PARTS = {
    "messages": [
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": [{"type": "reasoning", "value": REASONING}, {"type": "text", "value": ANSWER}],
        },
    ]
}
REASONING_FIELD = {
    "messages": [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "reasoning_content": REASONING, "content": ANSWER},
    ]
}
INLINE_THINK = {
    "messages": [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"},
    ]
}
# A template that reads `reasoning_content` (as Qwen3's and DeepSeek's do), ChatML otherwise.
READS_REASONING = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content is defined %}<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def canonical(record: dict) -> list[dict]:
    converted, _ = to_canonical(record, Path("reasoning.jsonl"), 1)
    return converted[MESSAGES_KEY]


def trained_text(messages: list[dict], tokenizer: PreTrainedTokenizerBase, train_reasoning: bool = True) -> str:
    options = TokenizeOptions(10**6, train_reasoning=train_reasoning)
    columns = tokenize_dialogues([(messages, None)], tokenizer, options)
    row = {key: column[0].as_py() for key, column in columns.items()}
    assert row == tokenize_dialogue(messages, tokenizer, options)  # batch path = apply_chat_template
    assert row[REASONING_TURNS_KEY] == 1
    (run,) = trained_runs(row, tokenizer)
    return run


def test_parts_and_field_become_reasoning_content_and_inline_thinking_stays_in_the_content() -> None:
    for record in (LLAMA_FACTORY_PARTS, REASONING_FIELD):
        assistant = canonical(record)[-1]
        assert assistant[REASONING_KEY] == REASONING and assistant["content"] == ANSWER
    assert canonical(INLINE_THINK)[-1] == INLINE_THINK["messages"][-1]


def test_reasoning_in_a_user_turn_is_refused_naming_the_record() -> None:
    record = {"messages": [{"role": "user", "content": [{"type": "reasoning", "value": "x"}]}]}
    with pytest.raises(ValueError, match=r"reasoning\.jsonl:1: messages\[0\]\.content\[0\]: only an assistant turn"):
        canonical(record)


@pytest.mark.parametrize("train_reasoning", [True, False], ids=["with_reasoning", "answer_only"])
@pytest.mark.parametrize(
    "record", [LLAMA_FACTORY_PARTS, REASONING_FIELD, INLINE_THINK], ids=["parts", "field", "inline"]
)
@pytest.mark.parametrize("template", ["markers", "derived", "reads_reasoning"])
def test_the_reasoning_is_trained_with_its_turn(
    chatml_tokenizer: PreTrainedTokenizerBase, record: dict, template: str, train_reasoning: bool
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    if template == "derived":  # the shipped ChatML without its generation markers: spans derived by prefix rendering
        tokenizer.chat_template = chatml_tokenizer.chat_template.replace("{%- generation %}", "").replace(
            "{%- endgeneration %}", ""
        )
    elif template == "reads_reasoning":
        tokenizer.chat_template = READS_REASONING
    trained = trained_text(canonical(record), tokenizer, train_reasoning)
    if train_reasoning:
        assert trained == f"<think>\n{REASONING}\n</think>\n\n{ANSWER}<|im_end|>"
    else:  # data.train_reasoning=false: the reply alone
        assert trained == f"{ANSWER}<|im_end|>"


def test_reasoning_turns_are_counted_per_source(chatml_tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    path = tmp_path / "reasoning.jsonl"
    plain = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    records = [LLAMA_FACTORY_PARTS, REASONING_FIELD, INLINE_THINK, plain]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = DataConfig(sources=[str(path)], max_length=256, num_proc=1, cache_dir=None)
    train, _, stats = build_datasets(data, chatml_tokenizer, seed=0)
    (source,) = stats.sources.values()
    assert (source.kept, source.reasoning_turns) == (4, 3)
    assert "assistant turns with reasoning" in stats.summary()


@pytest.mark.slow
def test_a_run_trains_on_the_three_kinds_of_reasoning(tmp_path: Path) -> None:
    path = tmp_path / "reasoning.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [LLAMA_FACTORY_PARTS, REASONING_FIELD, INLINE_THINK] * 8))
    run_ok(
        tmp_path / "run",
        "debug=quick",
        NO_HELDOUT,
        "data.validation_split_percentage=0",
        "training.eval_strategy=no",
        f"data.sources=[{path}]",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("nll", 0) > 0 for r in records)  # trained tokens were there, reasoning among them
