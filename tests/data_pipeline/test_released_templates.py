"""Released chat templates, as their models ship them (no `{% generation %}` markers): the derived masks.

The templates are the ones axolotl 0.19.0 distributes on PyPI (`axolotl/utils/chat_templates/templates/`,
copies of what Qwen2.5-Instruct, Qwen3, Llama 3, Mistral v0.3, Gemma and DeepSeek V3 ship in their
tokenizer_config.json); the session fixture downloads that wheel once with pip (no dependencies) into
`.cache/`. Each template goes on the embedded byte-level tokenizer with its family's special tokens added, so
its role headers and end-of-turn tokens are single special tokens as in the real vocabularies.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cluster.check import config_problems
from config.schema import load_run_config
from core.keys import INPUT_IDS_KEY, ORIGIN_KEY
from data_pipeline.prepare import prepare_run
from data_pipeline.stats import DatasetStats
from data_pipeline.tokenize import (
    CONVERSATION_KEY,
    UNTRAINED_TURNS_KEY,
    check_assistant_mask,
    tokenize_batch,
    tokenize_dialogue,
    tokenize_dialogues,
)
from embedded.paths import REPO_ROOT, SAMPLE_DIR, TOKENIZER_DIR
from tests.helpers import NO_HELDOUT, run_ok, trained_runs

AXOLOTL_WHEEL = "axolotl==0.19.0"
TEMPLATES_IN_WHEEL = "axolotl/utils/chat_templates/templates/"
CACHE = REPO_ROOT / ".cache" / "released_templates"

# Per template: the special tokens of the family's vocabulary and the end-of-turn token a trained turn ends with.
FAMILIES = {
    "qwen_25": ({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, "<|im_end|>"),
    "llama3": (
        {
            "bos_token": "<|begin_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        },
        "<|eot_id|>",
    ),
    "mistral_v2v3": (
        {"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": ["[INST]", "[/INST]"]},
        "</s>",
    ),
    "gemma": (
        {"bos_token": "<bos>", "eos_token": "<eos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
        "<end_of_turn>",
    ),
    "deepseek_v3": (
        {
            "bos_token": "<｜begin▁of▁sentence｜>",
            "eos_token": "<｜end▁of▁sentence｜>",
            "additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>"],
        },
        "<｜end▁of▁sentence｜>",
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
    """Template name -> Jinja text, from the axolotl wheel (downloaded once, without its dependencies)."""
    wheels = sorted(CACHE.glob("axolotl-*.whl"))
    if not wheels:
        CACHE.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", AXOLOTL_WHEEL, "--no-deps", "--quiet", "-d", str(CACHE)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"could not download {AXOLOTL_WHEEL} from the package index:\n{result.stderr}"
        wheels = sorted(CACHE.glob("axolotl-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        return {
            Path(name).stem: wheel.read(name).decode("utf-8")
            for name in wheel.namelist()
            if name.startswith(TEMPLATES_IN_WHEEL) and name.endswith(".jinja")
        }


def family_tokenizer(name: str, template: str) -> PreTrainedTokenizerBase:
    special_tokens, _ = FAMILIES.get(name, FAMILIES["qwen_25"])
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.add_special_tokens(special_tokens)
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, released_templates: dict[str, str]) -> tuple[str, PreTrainedTokenizerBase]:
    return request.param, family_tokenizer(request.param, released_templates[request.param])


# Gemma refuses a system message and Mistral moves it into the last prompt: both are tested on their own below.
TAKES_A_SYSTEM_MESSAGE = sorted(set(FAMILIES) - {"gemma", "mistral_v2v3"})


def batch_row(messages: list[dict], tokenizer: PreTrainedTokenizerBase, tools: list | None = None) -> dict:
    columns = tokenize_dialogues([(messages, tools)], tokenizer, max_length=10**6)
    return {key: column[0].as_py() for key, column in columns.items()}


def test_the_fixture_templates_are_the_released_ones_without_markers(released_templates: dict[str, str]) -> None:
    for name in [*FAMILIES, "qwen3"]:
        assert "generation %}" not in released_templates[name].replace("add_generation", "")
    assert "<tool_response>" in released_templates["qwen_25"]  # Qwen2.5's tool results as user turns


def test_released_template_passes_the_start_up_probe(family: tuple[str, PreTrainedTokenizerBase]) -> None:
    check_assistant_mask(family[1])


@pytest.mark.parametrize(
    ("name", "with_system"),
    [*((name, False) for name in sorted(FAMILIES)), *((name, True) for name in TAKES_A_SYSTEM_MESSAGE)],
)
def test_every_assistant_turn_is_trained_with_its_end_of_turn_token_and_nothing_else(
    released_templates: dict[str, str], name: str, with_system: bool
) -> None:
    tokenizer = family_tokenizer(name, released_templates[name])
    messages = [SYSTEM, *MULTI_TURN] if with_system else MULTI_TURN
    row = batch_row(messages, tokenizer)
    assert row == tokenize_dialogue(messages, tokenizer, max_length=10**6)  # batch path = apply_chat_template path
    assert row[UNTRAINED_TURNS_KEY] == 0
    end_of_turn = FAMILIES[name][1]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [run.strip() for run in trained_runs(row, tokenizer)] == [reply + end_of_turn for reply in replies]
    full_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)[INPUT_IDS_KEY]
    assert row[INPUT_IDS_KEY] == list(full_ids)
    if tokenizer.bos_token is not None and tokenizer.bos_token in FAMILIES[name][0].values():
        # The template writes the BOS itself: encoding with add_special_tokens=False must not add a second one.
        assert row[INPUT_IDS_KEY].count(tokenizer.bos_token_id) == 1 and row[INPUT_IDS_KEY][0] == tokenizer.bos_token_id


def test_qwen25_tool_calls_and_tool_results(released_templates: dict[str, str]) -> None:
    tokenizer = family_tokenizer("qwen_25", released_templates["qwen_25"])
    row = batch_row(TOOL_DIALOGUE, tokenizer, TOOLS)
    assert row == tokenize_dialogue(TOOL_DIALOGUE, tokenizer, max_length=10**6, tools=TOOLS)
    call, answer = trained_runs(row, tokenizer)
    # The tool call as the model must write it, ending its turn; the tool result (a user turn) is not trained.
    assert call.startswith("<tool_call>\n") and call.endswith("</tool_call><|im_end|>")
    assert json.loads(call.removeprefix("<tool_call>\n").split("\n</tool_call>")[0]) == {
        "name": "get_weather",
        "arguments": {"city": "Lyon"},
    }
    assert answer.strip() == "No, the sky is clear in Lyon.<|im_end|>"
    assert "get_weather" in tokenizer.decode(row[INPUT_IDS_KEY])  # the tool schema is in the (untrained) prompt


def test_gemma_refuses_a_system_message_naming_the_record(released_templates: dict[str, str]) -> None:
    tokenizer = family_tokenizer("gemma", released_templates["gemma"])
    conversations = [{"messages": MULTI_TURN}, {"messages": [SYSTEM, *MULTI_TURN]}]
    batch = pa.table(
        {
            CONVERSATION_KEY: [json.dumps(c) for c in conversations],
            ORIGIN_KEY: ["chats.jsonl:1", "chats.jsonl:2"],
        }
    )
    with pytest.raises(ValueError, match=r"chats\.jsonl:2: the chat template refused the dialogue: System role"):
        tokenize_batch(batch, tokenizer, max_length=512)


def test_mistral_system_message_leaves_the_turns_untrained_and_counted(released_templates: dict[str, str]) -> None:
    # Mistral v0.3 writes the system message into the last user turn only: the prompt of each turn differs from
    # the rendering that follows, so no turn can be located and none is trained, rather than a wrong one.
    tokenizer = family_tokenizer("mistral_v2v3", released_templates["mistral_v2v3"])
    row = batch_row([SYSTEM, *MULTI_TURN], tokenizer)
    assert row[UNTRAINED_TURNS_KEY] == 2
    assert trained_runs(row, tokenizer) == []


def test_qwen3_earlier_turns_rewritten_by_the_template_are_counted_not_mistrained(
    released_templates: dict[str, str],
) -> None:
    # Qwen3 writes an (empty) thinking block into the last assistant turn only: the first turn, as rendered when it
    # was the last one, is not a prefix of the whole dialogue.
    tokenizer = family_tokenizer("qwen3", released_templates["qwen3"])
    tokenizer.add_tokens(["<think>", "</think>"])
    row = batch_row(MULTI_TURN, tokenizer)
    assert row == tokenize_dialogue(MULTI_TURN, tokenizer, max_length=10**6)
    assert row[UNTRAINED_TURNS_KEY] == 1
    (last,) = trained_runs(row, tokenizer)
    # This template's generation prompt opens the thinking block ("<|im_start|>assistant\n<think>\n\n"): the model
    # closes it (empty here) and replies, both trained; the role header is not.
    assert last.strip() == "</think>\n\nTwo, the only even prime.<|im_end|>"
    check_assistant_mask(tokenizer)


def test_flagship_recipe_prepares_the_bundled_data_with_the_released_qwen25_template(
    released_templates: dict[str, str], tmp_path: Path
) -> None:
    tokenizer_dir = tmp_path / "qwen2.5-tokenizer"
    family_tokenizer("qwen_25", released_templates["qwen_25"]).save_pretrained(tokenizer_dir)
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
    template.write_text(released_templates["qwen_25"], encoding="utf-8")
    overrides = ["data.num_proc=1", f"data.cache_dir={tmp_path / 'cache'}"]
    _, _, tokenizer = prepare_run(load_run_config([*overrides, f"data.chat_template={template}"]))
    assert tokenizer.chat_template == released_templates["qwen_25"]
    _, _, shipped = prepare_run(load_run_config([*overrides, "data.chat_template=chatml"]))
    assert shipped.chat_template == (TOKENIZER_DIR / "chat_template.jinja").read_text(encoding="utf-8")
    problems = config_problems(load_run_config([*overrides, "data.chat_template=missing.jinja"]))
    assert any(p.startswith("data.chat_template: no such file 'missing.jinja'") for p in problems), problems


@pytest.mark.slow
def test_the_template_a_run_trained_with_is_saved_with_its_model(
    released_templates: dict[str, str], tmp_path: Path
) -> None:
    template = tmp_path / "qwen25.jinja"
    template.write_text(released_templates["qwen_25"], encoding="utf-8")
    output_dir = tmp_path / "run"
    run_ok(output_dir, "debug=quick", NO_HELDOUT, f"data.chat_template={template}", f"data.cache_dir={tmp_path / 'c'}")
    saved = AutoTokenizer.from_pretrained(output_dir)
    assert saved.chat_template == released_templates["qwen_25"]
