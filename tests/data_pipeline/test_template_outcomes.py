"""What happens to the released templates that need care, each as a user meets it: gpt-oss, Hermes 3 as it ships
(two named templates), Command-R7B's tool_use template, GLM-4.6 and Granite 3.3; a record a template refuses under
`data.on_error`; and LLaMA-Factory's own reasoning and tool-call data files on the Qwen2.5 template.

Templates and data files come from package sdists on PyPI (`template_collection`, `llamafactory_data` in
tests/helpers.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from config.schema import DataConfig, load_run_config
from core.keys import IGNORE_INDEX
from data_pipeline.cache import tokenizer_digest
from data_pipeline.inspect import main as inspect_main
from data_pipeline.prepare import build_datasets, prepare_run
from data_pipeline.prepare import main as prepare_main
from data_pipeline.tokenize import (
    REFUSAL_KEY,
    REFUSAL_REASON_KEY,
    TOOL_CALLS_NOT_RENDERED,
    UNTRAINED_TURNS_KEY,
    TokenizeOptions,
    ToolCallsNotRendered,
    check_assistant_mask,
    tokenize_dialogue,
    tokenize_dialogues,
)
from tests.helpers import TEMPLATE_DIALOGUES as DIALOGUES
from tests.helpers import WEATHER_TOOLS as TOOLS
from tests.helpers import llamafactory_data, run_module, template_collection, template_tokenizer, trained_runs

GPT_OSS, GRANITE33 = "openai-gpt-oss-120b", "ibm-granite-granite-3.3-2B-Instruct"
HERMES3_TOOL_USE, COMMAND_R7B = (
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use",
)
GLM46, LLAMA32, QWEN25 = "GLM-4.6", "meta-llama-Llama-3.2-3B-Instruct", "Qwen-Qwen2.5-7B-Instruct"
# Hermes 3's `default` template, from its tokenizer_config.json (llama.cpp's collection keeps only its tool_use one):
# ChatML after the BOS, which never writes tool calls.
HERMES3_DEFAULT = (
    "{{bos_token}}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MULTI_TURN, (TOOL_CALL, _) = DIALOGUES["multi-turn"][0], DIALOGUES["tool call"]


@pytest.fixture(scope="module")
def templates() -> dict[str, str]:
    return template_collection()


def row_of(messages: list[dict], tokenizer: PreTrainedTokenizerBase, tools: list | None = None) -> dict:
    columns = tokenize_dialogues([(messages, tools)], tokenizer, TokenizeOptions(10**6))
    row = {key: column[0].as_py() for key, column in columns.items()}
    if row[REFUSAL_REASON_KEY] is None:
        assert row == tokenize_dialogue(messages, tokenizer, TokenizeOptions(10**6), tools)  # = apply_chat_template
    return row


def data_config(*paths: Path, **options: object) -> DataConfig:
    """In memory, no validation share, and long enough for the byte-level tokenizer's long samples."""
    return DataConfig(
        sources=[str(path) for path in paths],
        num_proc=1,
        cache_dir=None,
        max_length=32768,
        validation_split_percentage=0,
        **options,
    )


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_gpt_oss_trains_the_last_reply_with_its_return_token_and_counts_the_earlier_ones(
    templates: dict[str, str],
) -> None:
    # gpt-oss ends the last turn with <|return|> (its EOS) and earlier ones with <|end|>: the last turn is trained
    # with <|return|>, an earlier turn renders differently once another follows, so it is left untrained, counted.
    tokenizer = template_tokenizer(GPT_OSS, templates[GPT_OSS])
    assert tokenizer.eos_token == "<|return|>"
    check_assistant_mask(tokenizer)
    check_assistant_mask(tokenizer, DIALOGUES["tool call"])
    row = row_of(MULTI_TURN, tokenizer)
    assert row[UNTRAINED_TURNS_KEY] == 1
    assert trained_runs(row, tokenizer) == ["<|channel|>final<|message|>Two, the only even prime.<|return|>"]
    call, answer = trained_runs(row_of(TOOL_CALL, tokenizer, TOOLS), tokenizer)
    assert "get_weather" in call and call.endswith("<|call|>") and answer.endswith("No, it is dry in Lyon.<|return|>")


def test_hermes3_as_shipped_takes_its_tool_use_template_for_records_with_tools(
    templates: dict[str, str], tmp_path: Path
) -> None:
    named = {"default": HERMES3_DEFAULT, "tool_use": templates[HERMES3_TOOL_USE]}
    tokenizer = template_tokenizer("Hermes-3", named)
    check_assistant_mask(tokenizer)
    check_assistant_mask(
        tokenizer, DIALOGUES["tool call"]
    )  # the probe passes the record's tools to the tool_use template
    assert trained_runs(row_of(MULTI_TURN, tokenizer), tokenizer) == [
        "Seven.<|im_end|>",
        "Two, the only even prime.<|im_end|>",
    ]
    row = row_of(TOOL_CALL, tokenizer, TOOLS)
    (call,) = trained_runs(row, tokenizer)
    assert json.loads(call.removeprefix("<tool_call>\n").removesuffix("\n</tool_call><|im_end|>")) == {
        "name": "get_weather",
        "arguments": {"city": "Lyon"},
    }
    # The tool_use template writes a tool result differently once a reply follows: that reply is counted, untrained.
    assert row[UNTRAINED_TURNS_KEY] == 1
    assert tokenizer_digest(tokenizer) != tokenizer_digest(template_tokenizer("Hermes-3", named | {"default": ""}))
    # Each template on its own: the default one drops tool calls, the tool_use one needs tools.
    default = template_tokenizer("Hermes-3", HERMES3_DEFAULT)
    assert row_of(TOOL_CALL, default, TOOLS)[REFUSAL_REASON_KEY] == TOOL_CALLS_NOT_RENDERED
    with pytest.raises(ToolCallsNotRendered):
        check_assistant_mask(default, DIALOGUES["tool call"])
    tool_use = template_tokenizer("Hermes-3", templates[HERMES3_TOOL_USE])
    with pytest.raises(
        ValueError, match="renders only dialogues with tools .*data.chat_template to the model's default"
    ):
        check_assistant_mask(tool_use)
    # On data with tools it is probed with them; a record without tools is then refused, or skipped and counted.
    check_assistant_mask(tool_use, DIALOGUES["tool call"])
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": TOOL_CALL, "tools": TOOLS}, {"messages": MULTI_TURN}])
    train, _, stats = build_datasets(data_config(path, on_error="skip"), tool_use, seed=0)
    assert stats.sources[str(path)].dropped == {"chat_template_refused": 1} and len(train) == 1
    # data.chat_template=<name> chooses one of a tokenizer's named templates.
    tokenizer.save_pretrained(tmp_path / "hermes3")
    assert AutoTokenizer.from_pretrained(tmp_path / "hermes3").chat_template == named
    overrides = [
        f"model.tokenizer_name_or_path={tmp_path / 'hermes3'}",
        "data.num_proc=1",
        f"data.cache_dir={tmp_path / 'c'}",
    ]
    _, _, chosen = prepare_run(load_run_config([*overrides, "data.chat_template=default"]))
    assert chosen.chat_template == HERMES3_DEFAULT


def test_command_r7b_tool_use_template_is_refused_for_always_writing_the_generation_prompt(
    templates: dict[str, str],
) -> None:
    tokenizer = template_tokenizer(COMMAND_R7B, templates[COMMAND_R7B])
    with pytest.raises(ValueError, match="appends the generation prompt even without add_generation_prompt") as refused:
        check_assistant_mask(tokenizer)
    assert "\n" not in str(refused.value) and "set data.chat_template" in str(refused.value)


def test_glm46_is_refused_for_writing_no_end_of_turn_token(templates: dict[str, str]) -> None:
    tokenizer = template_tokenizer(GLM46, templates[GLM46])
    with pytest.raises(ValueError, match="writes no end-of-turn token after the last assistant reply") as refused:
        check_assistant_mask(tokenizer)
    assert "'\\n<think></think>\\nfirst answer'" in str(refused.value)  # the reply trained with nothing after it
    assert "\n" not in str(refused.value) and "set data.chat_template" in str(refused.value)


def test_granite33_prepares_and_refuses_or_skips_the_records_whose_tool_calls_it_drops(
    templates: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer = template_tokenizer(GRANITE33, templates[GRANITE33])
    check_assistant_mask(tokenizer)
    assert [run.strip() for run in trained_runs(row_of(MULTI_TURN, tokenizer), tokenizer)] == [
        "Seven.<|end_of_text|>",
        "Two, the only even prime.<|end_of_text|>",
    ]
    # Granite 3.3 never writes tool_calls: the call turn would be trained as a bare <|end_of_text|>.
    row = row_of(TOOL_CALL, tokenizer, TOOLS)
    assert row[REFUSAL_REASON_KEY] == TOOL_CALLS_NOT_RENDERED and row[REFUSAL_KEY].startswith("messages[1]: ")
    assert row["input_ids"] == row["labels"] == []
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": MULTI_TURN}, {"messages": TOOL_CALL, "tools": TOOLS}])
    refused = re.escape(f"{path}:2: messages[1]: the chat template does not render the tool calls of this assistant")
    with pytest.raises(ValueError, match=f"^{refused}"):
        build_datasets(data_config(path), tokenizer, seed=0)
    train, _, stats = build_datasets(data_config(path, on_error="skip"), tokenizer, seed=0)
    assert stats.sources[str(path)].dropped == {TOOL_CALLS_NOT_RENDERED: 1} and len(train) == 1
    # The start-up probe ran the data's tool call through the template and said so before the records were counted.
    probe = "probing the chat template with the first tool call of the data: the chat template does not render"
    assert any(probe in message and "are skipped and counted" in message for message in caplog.messages)


def test_a_record_the_template_refuses_is_counted_under_skip_not_fatal(
    templates: dict[str, str], tmp_path: Path
) -> None:
    # Llama 3.2 raises on parallel calls and drops the text sent with a call: two reasons, each counted.
    tokenizer = template_tokenizer(LLAMA32, templates[LLAMA32])
    records = [
        {"messages": MULTI_TURN},
        {"messages": DIALOGUES["parallel calls"][0], "tools": TOOLS},
        {"messages": DIALOGUES["text with a call"][0], "tools": TOOLS},
        {"messages": TOOL_CALL, "tools": TOOLS},
    ]
    path = write_jsonl(tmp_path / "calls.jsonl", records)
    train, _, stats = build_datasets(data_config(path, on_error="skip"), tokenizer, seed=0)
    source = stats.sources[str(path)]
    assert source.dropped == {"chat_template_refused": 1, TOOL_CALLS_NOT_RENDERED: 1}
    assert source.kept == len(train) == 2
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: the chat template refused the dialogue: This"):
        build_datasets(data_config(path), tokenizer, seed=0)


@pytest.fixture
def granite_refusal(templates: dict[str, str], tmp_path: Path) -> tuple[list[str], Path]:
    """Overrides that prepare a record with a tool call on Granite 3.3's template, which refuses it, and its file."""
    template_tokenizer(GRANITE33, templates[GRANITE33]).save_pretrained(tmp_path / "granite")
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": TOOL_CALL, "tools": TOOLS}])
    tokenizer, cache = f"model.tokenizer_name_or_path={tmp_path / 'granite'}", f"data.cache_dir={tmp_path / 'c'}"
    return [f"data.sources=[{path}]", tokenizer, cache], path


def test_a_refusal_prints_one_line_and_no_traceback(granite_refusal: tuple[list[str], Path]) -> None:
    overrides, path = granite_refusal
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("HYDRA_FULL_ERROR", None)
    result = run_module("data_pipeline.prepare", overrides, env=environment)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout, result.stderr
    (error,) = [line for line in result.stderr.splitlines() if str(path) in line]
    assert error.startswith(f"{path}:1: messages[1]: the chat template does not render the tool calls")
    assert error.endswith("or data.on_error=skip to skip such records (counted as tool_calls_not_rendered)")


def test_inspect_refuses_in_one_line_too_and_hydra_full_error_keeps_the_exception(
    granite_refusal: tuple[list[str], Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides, path = granite_refusal
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exited:
        inspect_main(overrides)
    assert exited.value.code == 2
    (error,) = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert error.startswith(f"{path}:1: messages[1]: ")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:1: messages\[1\]: "):
        prepare_main(overrides)


def test_llamafactory_reasoning_and_tool_call_demos_prepare_with_reasoning_and_calls_trained(
    templates: dict[str, str],
) -> None:
    names = ("reason_tool_use_demo_50.jsonl", "glaive_toolcall_en_demo.json", "v1_sft_demo.jsonl")
    reason_tool_use, glaive, v1_sft = llamafactory_data(*names)
    tokenizer = template_tokenizer(QWEN25, templates[QWEN25])
    data = data_config(reason_tool_use, glaive, v1_sft)
    train, _, stats = build_datasets(data, tokenizer, seed=0)
    for path in (reason_tool_use, glaive, v1_sft):
        source = stats.sources[str(path)]
        assert source.records > 0 and source.kept == source.records and not source.dropped and source.truncated == 0
        assert source.untrained_turns == 0
    records = [json.loads(line) for line in reason_tool_use.read_text(encoding="utf-8").splitlines()]
    parts = [part["type"] for r in records for m in r["messages"] if m["role"] == "assistant" for part in m["content"]]
    reasoning = stats.sources[str(reason_tool_use)]
    assert reasoning.reasoning_turns == parts.count("reasoning") and reasoning.reasoning_not_rendered == 0
    trained = [tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) for labels in train["labels"]]
    calls = [text.count("<tool_call>") for text in trained]
    # Each tool_call part of the reasoning file and each function_call turn of the glaive file, trained as a call.
    conversations = [record["conversations"] for record in json.loads(glaive.read_text(encoding="utf-8"))]
    function_calls = sum(turn["from"] == "function_call" for turns in conversations for turn in turns)
    glaive_calls = calls[len(records) : len(records) + len(conversations)]
    assert sum(calls[: len(records)]) == parts.count("tool_call") and sum(glaive_calls) == function_calls
    assert all("<think>" in text for text in trained[: len(records)])  # the reasoning is trained with its turn
