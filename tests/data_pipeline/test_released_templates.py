"""Released chat templates, as their models ship them (no `{% generation %}` markers): the derived masks.

The templates are the models' own, from llama.cpp's collection in the llama-cpp-python sdist on PyPI (see
`tests/helpers.py`; `test_template_collection.py` runs every one of them). Here each template
goes on the embedded byte-level tokenizer with its family's special tokens written out, so its role headers and
end-of-turn tokens are single special tokens as in the real vocabularies, and the tests name exact strings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cluster.check import config_problems
from config.schema import DataConfig, load_run_config
from core.keys import INPUT_IDS_KEY, ORIGIN_KEY
from data_pipeline.prepare import build_datasets, prepare_run
from data_pipeline.stats import DatasetStats
from data_pipeline.tokenize import (
    CONVERSATION_KEY,
    REASONING_NOT_RENDERED_KEY,
    REASONING_TURNS_KEY,
    REFUSAL_KEY,
    UNTRAINED_TURNS_KEY,
    TokenizeOptions,
    check_assistant_mask,
    tokenize_batch,
    tokenize_dialogue,
    tokenize_dialogues,
)
from embedded.paths import SAMPLE_DIR, TOKENIZER_DIR
from tests.helpers import NO_HELDOUT, run_ok, template_collection, trained_runs

QWEN25, QWEN3 = "Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B"
LLAMA31, MISTRAL = "meta-llama-Llama-3.1-8B-Instruct", "mistralai-Mistral-Nemo-Instruct-2407"
GEMMA2, R1_DISTILL = "google-gemma-2-2b-it", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"
PHI35, QWEN35 = "microsoft-Phi-3.5-mini-instruct", "Qwen3.5-4B"

CHATML = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
# Per template: the special tokens of the family's vocabulary (and plain added tokens), the end-of-turn token a
# trained turn ends with, and what the last turn ends with when the template closes the whole rendering itself.
FAMILIES = {
    QWEN25: (CHATML, [], "<|im_end|>", "<|im_end|>"),
    QWEN3: (CHATML, ["<think>", "</think>"], "<|im_end|>", "<|im_end|>"),
    # Qwen3.5's generation prompt opens the thinking block itself ("<|im_start|>assistant\n<think>\n").
    QWEN35: (CHATML, ["<think>", "</think>"], "<|im_end|>", "<|im_end|>"),
    LLAMA31: (
        {
            "bos_token": "<|begin_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"],
        },
        [],
        "<|eot_id|>",
        "<|eot_id|>",
    ),
    MISTRAL: (
        {"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": ["[INST]", "[/INST]", "[TOOL_CALLS]"]},
        [],
        "</s>",
        "</s>",
    ),
    GEMMA2: (
        {"bos_token": "<bos>", "eos_token": "<eos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
        [],
        "<end_of_turn>",
        "<end_of_turn>",
    ),
    R1_DISTILL: (
        {
            "bos_token": "<｜begin▁of▁sentence｜>",
            "eos_token": "<｜end▁of▁sentence｜>",
            "additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>"],
        },
        ["<think>", "</think>"],
        "<｜end▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
    ),
    # Phi-3.5 writes its EOS after the whole rendering: the last turn is trained to end with it too.
    PHI35: (
        {
            "bos_token": "<s>",
            "eos_token": "<|endoftext|>",
            "additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"],
        },
        [],
        "<|end|>",
        "<|end|>\n<|endoftext|>",
    ),
}
SYSTEM = {"role": "system", "content": "You answer in one short line."}
MULTI_TURN = [
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "And an even one?"},
    {"role": "assistant", "content": "Two, the only even prime."},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_DIALOGUE = [
    {"role": "user", "content": "Is it raining in Lyon?"},
    {
        "role": "assistant",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}}],
    },
    {"role": "tool", "content": '{"rain": false, "sky": "clear"}'},
    {"role": "assistant", "content": "No, the sky is clear in Lyon."},
]


@pytest.fixture(scope="session")
def released_templates() -> dict[str, str]:
    """Template name -> Jinja text, every template of the pinned collection (fetched once into `.cache/`)."""
    return template_collection()


def family_tokenizer(name: str, template: str) -> PreTrainedTokenizerBase:
    special_tokens, plain_tokens, _, _ = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.add_special_tokens(special_tokens)
    tokenizer.add_tokens(plain_tokens)
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, released_templates: dict[str, str]) -> tuple[str, PreTrainedTokenizerBase]:
    return request.param, family_tokenizer(request.param, released_templates[request.param])


# Gemma refuses a system message and Mistral moves it into the last prompt: both are tested on their own below.
# Qwen3 rewrites earlier turns once a later one follows: tested on its own too.
EVERY_TURN_LOCATED = sorted(set(FAMILIES) - {QWEN3, QWEN35})
TAKES_A_SYSTEM_MESSAGE = sorted(set(EVERY_TURN_LOCATED) - {GEMMA2, MISTRAL})


def batch_row(messages: list[dict], tokenizer: PreTrainedTokenizerBase, tools: list | None = None) -> dict:
    columns = tokenize_dialogues([(messages, tools)], tokenizer, TokenizeOptions(10**6))
    return {key: column[0].as_py() for key, column in columns.items()}


def test_the_fixture_templates_are_the_released_ones_without_markers(released_templates: dict[str, str]) -> None:
    for name in FAMILIES:
        assert "generation %}" not in released_templates[name].replace("add_generation", ""), name
    assert "<tool_response>" in released_templates[QWEN25]  # Qwen2.5's tool results as user turns
    assert "raise_exception('System role not supported')" in released_templates[GEMMA2]


def test_released_template_passes_the_start_up_probe(family: tuple[str, PreTrainedTokenizerBase]) -> None:
    check_assistant_mask(family[1])


@pytest.mark.parametrize(
    ("name", "with_system"),
    [*((name, False) for name in EVERY_TURN_LOCATED), *((name, True) for name in TAKES_A_SYSTEM_MESSAGE)],
)
def test_every_assistant_turn_is_trained_with_its_end_of_turn_token_and_nothing_else(
    released_templates: dict[str, str], name: str, with_system: bool
) -> None:
    tokenizer = family_tokenizer(name, released_templates[name])
    messages = [SYSTEM, *MULTI_TURN] if with_system else MULTI_TURN
    row = batch_row(messages, tokenizer)
    assert row == tokenize_dialogue(messages, tokenizer, TokenizeOptions(10**6))  # batch path = apply_chat_template
    assert row[UNTRAINED_TURNS_KEY] == 0
    _, _, end_of_turn, end_of_last_turn = FAMILIES[name]
    first, last = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = [run.strip() for run in trained_runs(row, tokenizer)]
    assert runs == [first + end_of_turn, last + end_of_last_turn]
    full_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)[INPUT_IDS_KEY]
    assert row[INPUT_IDS_KEY] == list(full_ids)
    if tokenizer.bos_token is not None and tokenizer.bos_token in FAMILIES[name][0].values() and name != PHI35:
        # The template writes the BOS itself: encoding with add_special_tokens=False must not add a second one.
        assert row[INPUT_IDS_KEY].count(tokenizer.bos_token_id) == 1 and row[INPUT_IDS_KEY][0] == tokenizer.bos_token_id


def test_qwen25_tool_calls_and_tool_results(released_templates: dict[str, str]) -> None:
    tokenizer = family_tokenizer(QWEN25, released_templates[QWEN25])
    row = batch_row(TOOL_DIALOGUE, tokenizer, TOOLS)
    assert row == tokenize_dialogue(TOOL_DIALOGUE, tokenizer, TokenizeOptions(10**6), tools=TOOLS)
    call, answer = trained_runs(row, tokenizer)
    # The tool call as the model must write it, ending its turn; the tool result (a user turn) is not trained.
    assert call.startswith("<tool_call>\n") and call.endswith("</tool_call><|im_end|>")
    assert json.loads(call.removeprefix("<tool_call>\n").split("\n</tool_call>")[0]) == {
        "name": "get_weather",
        "arguments": {"city": "Lyon"},
    }
    assert answer.strip() == "No, the sky is clear in Lyon.<|im_end|>"
    assert "get_weather" in tokenizer.decode(row[INPUT_IDS_KEY])  # the tool schema is in the (untrained) prompt


def test_llama31_tool_calls_and_tool_results(released_templates: dict[str, str]) -> None:
    tokenizer = family_tokenizer(LLAMA31, released_templates[LLAMA31])
    row = batch_row(TOOL_DIALOGUE, tokenizer, TOOLS)
    assert row == tokenize_dialogue(TOOL_DIALOGUE, tokenizer, TokenizeOptions(10**6), tools=TOOLS)
    call, answer = (run.strip() for run in trained_runs(row, tokenizer))
    # Llama 3.1 writes a call as a JSON object with "parameters"; the result is an untrained "ipython" turn.
    assert json.loads(call.removesuffix("<|eot_id|>")) == {"name": "get_weather", "parameters": {"city": "Lyon"}}
    assert answer == "No, the sky is clear in Lyon.<|eot_id|>"
    text = tokenizer.decode(row[INPUT_IDS_KEY])
    assert "<|start_header_id|>ipython<|end_header_id|>" in text and text.count("<|begin_of_text|>") == 1


def test_gemma_refuses_a_system_message_naming_the_record(released_templates: dict[str, str], tmp_path: Path) -> None:
    tokenizer = family_tokenizer(GEMMA2, released_templates[GEMMA2])
    conversations = [{"messages": MULTI_TURN}, {"messages": [SYSTEM, *MULTI_TURN]}]
    batch = pa.table({CONVERSATION_KEY: [json.dumps(c) for c in conversations], ORIGIN_KEY: ["c:1", "c:2"]})
    refusals = tokenize_batch(batch, tokenizer, TokenizeOptions(512)).column(REFUSAL_KEY).to_pylist()
    assert refusals[0] is None and refusals[1].startswith("the chat template refused the dialogue: System role")
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    refused = re.escape(f"{path}:2: the chat template refused the dialogue: System role not supported (data.on_error=")
    with pytest.raises(ValueError, match=f"^{refused}"):
        build_datasets(DataConfig(sources=[str(path)], num_proc=1, cache_dir=None), tokenizer, seed=0)


def test_mistral_system_message_leaves_the_turns_untrained_and_counted(released_templates: dict[str, str]) -> None:
    # Mistral writes the system message into the last user turn only: the prompt of each turn differs from the
    # rendering that follows, so no turn can be located and none is trained, rather than a wrong one.
    tokenizer = family_tokenizer(MISTRAL, released_templates[MISTRAL])
    row = batch_row([SYSTEM, *MULTI_TURN], tokenizer)
    assert row[UNTRAINED_TURNS_KEY] == 2
    assert trained_runs(row, tokenizer) == []


@pytest.mark.parametrize(
    ("name", "last_run"),
    [
        (QWEN3, "<think>\n\n</think>\n\nTwo, the only even prime.<|im_end|>"),
        # The generation prompt opened the block ("<think>\n"): the model closes it (empty here) and replies.
        (QWEN35, "</think>\n\nTwo, the only even prime.<|im_end|>"),
    ],
)
def test_qwen3_earlier_turns_rewritten_by_the_template_are_counted_not_mistrained(
    released_templates: dict[str, str], name: str, last_run: str
) -> None:
    # Qwen3 writes a thinking block into the last assistant turn only: the first turn, as rendered when it was the
    # last one, is not a prefix of the whole dialogue, so it is counted and left untrained.
    tokenizer = family_tokenizer(name, released_templates[name])
    row = batch_row(MULTI_TURN, tokenizer)
    assert row == tokenize_dialogue(MULTI_TURN, tokenizer, TokenizeOptions(10**6))
    assert row[UNTRAINED_TURNS_KEY] == 1
    (last,) = trained_runs(row, tokenizer)
    assert last.strip() == last_run  # the thinking block and the reply: the role header is not trained
    check_assistant_mask(tokenizer)


def test_flagship_recipe_prepares_the_bundled_data_with_the_released_qwen25_template(
    released_templates: dict[str, str], tmp_path: Path
) -> None:
    tokenizer_dir = tmp_path / "qwen2.5-tokenizer"
    family_tokenizer(QWEN25, released_templates[QWEN25]).save_pretrained(tokenizer_dir)
    run = load_run_config(
        [
            "experiment=qwen2_5_7b_zero3",
            f"model.tokenizer_name_or_path={tokenizer_dir}",
            f"data.sources=[{SAMPLE_DIR / 'chat_letters.jsonl'},{SAMPLE_DIR / 'reverse_alpaca.json'}]",
            "data.num_proc=1",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    directory, built, _ = prepare_run(run)
    stats = DatasetStats.load(directory)
    assert built
    for source in stats.sources.values():
        assert source.records > 0 and source.kept == source.records and source.untrained_turns == 0
        assert 0 < source.trainable_tokens < source.tokens


def test_derived_masks_equal_the_generation_markers_of_the_same_template() -> None:
    # The embedded ChatML template with and without its {% generation %} markers: two independent ways to the mask.
    marked = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    unmarked = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    unmarked.chat_template = marked.chat_template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    assert unmarked.chat_template != marked.chat_template
    check_assistant_mask(unmarked)
    for messages in (
        [SYSTEM, *MULTI_TURN],
        MULTI_TURN,
        [*MULTI_TURN[:1], {**MULTI_TURN[1], "train": False}, *MULTI_TURN[2:]],
    ):
        assert batch_row(messages, unmarked) == batch_row(messages, marked)


def test_a_template_that_rewrites_every_earlier_turn_is_refused_at_start_up() -> None:
    # The message count written up front changes every earlier rendering: no turn can be located.
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.chat_template = (
        "{{ messages | length }} messages\n{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ValueError, match="empty assistant mask.*located no assistant reply"):
        check_assistant_mask(tokenizer)


def test_data_chat_template_replaces_the_tokenizers_and_a_missing_one_is_named(
    released_templates: dict[str, str], tmp_path: Path
) -> None:
    template = tmp_path / "qwen25.jinja"
    template.write_text(released_templates[QWEN25], encoding="utf-8")
    overrides = ["data.num_proc=1", f"data.cache_dir={tmp_path / 'cache'}"]
    _, _, tokenizer = prepare_run(load_run_config([*overrides, f"data.chat_template={template}"]))
    assert tokenizer.chat_template == released_templates[QWEN25]
    _, _, shipped = prepare_run(load_run_config([*overrides, "data.chat_template=chatml"]))
    assert shipped.chat_template == (TOKENIZER_DIR / "chat_template.jinja").read_text(encoding="utf-8")
    problems = config_problems(load_run_config([*overrides, "data.chat_template=missing.jinja"]))
    assert any(p.startswith("data.chat_template: no such file 'missing.jinja'") for p in problems), problems
    # A name is one of the tokenizer's named templates (Hermes' tool_use): checked when the tokenizer loads.
    problems = config_problems(load_run_config([*overrides, "data.chat_template=tool_use"]))
    assert not any(p.startswith("data.chat_template") for p in problems), problems


@pytest.mark.slow
def test_the_template_a_run_trained_with_is_saved_with_its_model(
    released_templates: dict[str, str], tmp_path: Path
) -> None:
    template = tmp_path / "qwen25.jinja"
    template.write_text(released_templates[QWEN25], encoding="utf-8")
    output_dir = tmp_path / "run"
    run_ok(output_dir, "debug=quick", NO_HELDOUT, f"data.chat_template={template}", f"data.cache_dir={tmp_path / 'c'}")
    saved = AutoTokenizer.from_pretrained(output_dir)
    assert saved.chat_template == released_templates[QWEN25]


@pytest.mark.parametrize(
    ("name", "opening"),
    [(QWEN3, "<think>\n"), (QWEN35, "")],  # Qwen3.5's generation prompt already opened the block
)
def test_qwen3_templates_train_the_reasoning_content_they_render(
    released_templates: dict[str, str], name: str, opening: str
) -> None:
    tokenizer = family_tokenizer(name, released_templates[name])
    reasoning = "Two is divisible only by 1 and 2."
    answer = {"role": "assistant", "reasoning_content": reasoning, "content": MULTI_TURN[3]["content"]}
    messages = [MULTI_TURN[2], answer]
    row = batch_row(messages, tokenizer)
    assert row == tokenize_dialogue(messages, tokenizer, TokenizeOptions(10**6))
    (run,) = trained_runs(row, tokenizer)
    assert run.strip() == f"{opening}{reasoning}\n</think>\n\nTwo, the only even prime.<|im_end|>"


def test_gemma_takes_a_system_message_merged_into_the_first_user_turn_when_asked(
    released_templates: dict[str, str], tmp_path: Path
) -> None:
    tokenizer = family_tokenizer(GEMMA2, released_templates[GEMMA2])
    messages = [SYSTEM, *MULTI_TURN]
    columns = tokenize_dialogues([(messages, None)], tokenizer, TokenizeOptions(10**6, merge_system=True))
    row = {key: column[0].as_py() for key, column in columns.items()}
    assert row == tokenize_dialogue(messages, tokenizer, TokenizeOptions(10**6, merge_system=True))
    assert [run.strip() for run in trained_runs(row, tokenizer)] == [
        "Seven.<end_of_turn>",
        "Two, the only even prime.<end_of_turn>",
    ]
    text = tokenizer.decode(row[INPUT_IDS_KEY])
    assert f"<start_of_turn>user\n{SYSTEM['content']}\n\n{MULTI_TURN[0]['content']}<end_of_turn>" in text
    # Through the data config, as a user asks for it: every record kept, none refused.
    path = tmp_path / "with_system.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"messages": MULTI_TURN}) + "\n")
    data = DataConfig(sources=[str(path)], num_proc=1, system_message="merge", cache_dir=None)
    _, _, stats = build_datasets(data, tokenizer, seed=0)
    (source,) = stats.sources.values()
    assert (source.records, source.kept) == (2, 2)


def test_r1_distill_template_drops_the_reasoning_and_it_is_counted(released_templates: dict[str, str]) -> None:
    # DeepSeek-R1's template keeps only what follows </think> in every assistant turn: the reasoning is not rendered,
    # so it cannot be trained; the turn is still trained, and the loss of its reasoning is counted.
    tokenizer = family_tokenizer(R1_DISTILL, released_templates[R1_DISTILL])
    reasoning = "Two is divisible only by 1 and 2."
    messages = [MULTI_TURN[2], {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\nTwo."}]
    row = batch_row(messages, tokenizer)
    assert row == tokenize_dialogue(messages, tokenizer, TokenizeOptions(10**6))
    assert (row[REASONING_TURNS_KEY], row[REASONING_NOT_RENDERED_KEY]) == (1, 1)
    assert [run.strip() for run in trained_runs(row, tokenizer)] == ["Two.<｜end▁of▁sentence｜>"]
    qwen3 = family_tokenizer(QWEN3, released_templates[QWEN3])  # renders it: counted as trained
    assert batch_row(messages, qwen3)[REASONING_NOT_RENDERED_KEY] == 0


@pytest.mark.parametrize("name", [QWEN3, QWEN35])
def test_the_reasoning_is_left_untrained_when_asked(released_templates: dict[str, str], name: str) -> None:
    tokenizer = family_tokenizer(name, released_templates[name])
    answer = {"role": "assistant", "reasoning_content": "Two divides only by 1 and 2.", "content": "Two."}
    messages, options = [MULTI_TURN[2], answer], TokenizeOptions(10**6, train_reasoning=False)
    row = {key: column[0].as_py() for key, column in tokenize_dialogues([(messages, None)], tokenizer, options).items()}
    assert row == tokenize_dialogue(messages, tokenizer, options)
    assert [run.strip() for run in trained_runs(row, tokenizer)] == ["Two.<|im_end|>"]
