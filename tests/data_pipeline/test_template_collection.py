"""Every chat template of the pinned collection (llama.cpp's `models/templates`, about 70 released templates; a file
a newer pin adds is run too) on a fixed set of dialogues, each held to one of two outcomes:

- prepared, and an independent reading of each prepared sample agrees: its tokens are the template's rendering,
  and each trained run of tokens holds one assistant turn (its reply, its tool calls, its rendered reasoning) and
  ends with a special token, with nothing of the other messages; turns the template rewrites once later turns
  follow are the only ones left untrained, and counted;
- or refused, at start-up or per record, in one line that says what the template does and what to do; a record
  whose tool calls the template does not render is refused as `tool_calls_not_rendered`, never trained as an
  empty turn.

The outcomes are docs/templates.md's table, which the test checks is current:

    WRITE_TEMPLATES_DOC=1 python -m pytest tests/data_pipeline/test_template_collection.py

rewrites it from the run.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from typing import Any

from transformers import PreTrainedTokenizerBase

from core.keys import IGNORE_INDEX, INPUT_IDS_KEY, LABELS_KEY
from data_pipeline.tokenize import (
    REASONING_NOT_RENDERED_KEY,
    REFUSAL_KEY,
    REFUSAL_REASON_KEY,
    TOOL_CALLS_NOT_RENDERED,
    UNTRAINED_TURNS_KEY,
    TokenizeOptions,
    ToolCallsNotRendered,
    chat_template,
    check_assistant_mask,
    template_messages,
    tokenize_dialogues,
)
from embedded.paths import REPO_ROOT
from tests.helpers import TEMPLATE_DIALOGUES as DIALOGUES
from tests.helpers import TEMPLATES_SDIST, template_collection, template_tokenizer

DOC = REPO_ROOT / "docs" / "templates.md"


def trained_runs(row: dict[str, Any]) -> list[list[int]]:
    pairs = zip(row[INPUT_IDS_KEY], row[LABELS_KEY], strict=True)
    return [
        [token for token, _ in run]
        for trained, run in itertools.groupby(pairs, lambda p: p[1] != IGNORE_INDEX)
        if trained
    ]


def independent_problems(
    messages: list[dict[str, Any]], tools: list | None, row: dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> list[str]:
    """What is wrong with a prepared sample, read from the rendering alone (not from how the spans were derived)."""
    template_tools = tools if tools and "tools" in chat_template(tokenizer, tools) else None
    rendered = template_messages(messages, tokenizer, tools=template_tools)
    text = tokenizer.apply_chat_template(rendered, tools=template_tools, tokenize=False)
    ids = tokenizer.apply_chat_template(rendered, tools=template_tools, tokenize=True, return_dict=True)[INPUT_IDS_KEY]
    problems = [] if list(ids) == row[INPUT_IDS_KEY] else ["the tokens are not the template's rendering"]
    # What each assistant turn must hold when trained: its reply, its calls' names, its reasoning where rendered.
    turns = []
    for message in (m for m in messages if m["role"] == "assistant"):
        pieces = [message["content"]] if message["content"] else []
        pieces += [c["function"]["name"] for c in message.get("tool_calls", [])]
        reasoning = message.get("reasoning_content")
        turns.append(pieces + ([reasoning] if reasoning and reasoning in text else []))
    others = [m["content"] for m in messages if m["role"] != "assistant"]
    # The assistant's role header is the generation prompt the model is given, not what it writes (a turn of several
    # messages, as muse-glimmer writes reasoning and each call, has the later headers inside it).
    first_user = [next(m for m in rendered if m["role"] == "user")]
    without, prompted = (
        tokenizer.apply_chat_template(first_user, tools=template_tools, tokenize=False, add_generation_prompt=prompt)
        for prompt in (False, True)
    )
    header = prompted.removeprefix(without).strip()
    runs = [tokenizer.decode(run) for run in trained_runs(row)]
    problems += [
        f"the trained run {run!r} opens with the role header"
        for run in runs
        if header and run.strip().startswith(header)
    ]
    special = set(tokenizer.all_special_ids)
    if len(runs) != len(turns) - row[UNTRAINED_TURNS_KEY]:
        problems.append(f"{len(runs)} trained runs for {len(turns)} turns, {row[UNTRAINED_TURNS_KEY]} untrained")
    remaining = iter(turns)
    for run, tokens in zip(runs, trained_runs(row), strict=True):
        if not any(all(piece in run for piece in pieces) for pieces in remaining):
            problems.append(f"the trained run {run!r} holds no assistant turn (in order)")
        problems += [f"the trained run {run!r} holds {other!r}" for other in others if other in run]
        if tokens[-1] not in special:
            problems.append(f"the trained run {run!r} does not end with an end-of-turn token")
    return problems


def one_line_with_a_fix(problem: str) -> bool:
    return "\n" not in problem and "data." in problem


def template_outcome(name: str, template: str) -> tuple[list[str], list[str]]:
    """The docs row of one template and the problems the test finds with it."""
    tokenizer = template_tokenizer(name, template)
    problems, refusals, warned = [], {}, False
    # The start-up probe on data without tools, and on data with tool calls (it then has an example of them).
    for data, example in (("without tools", None), ("with tool calls", DIALOGUES["tool call"])):
        try:
            check_assistant_mask(tokenizer, example)
        except ToolCallsNotRendered:
            warned = True
        except ValueError as e:
            refusals[data] = str(e)
            if not one_line_with_a_fix(str(e)):
                problems.append(f"{name}: the start-up refusal is not one line with a fix: {e}")
    if len(refusals) == 2:
        return [name, "refused at start-up", "", refusals["without tools"].replace("|", "\\|")], problems
    untrained, refused, unrendered, reasons = Counter(), Counter(), 0, {}
    for label, (messages, tools) in DIALOGUES.items():
        row = {
            key: column[0].as_py()
            for key, column in tokenize_dialogues([(messages, tools)], tokenizer, TokenizeOptions(10**6)).items()
        }
        if row[REFUSAL_REASON_KEY] is not None:
            refused[row[REFUSAL_REASON_KEY]] += 1
            reasons[label] = row[REFUSAL_REASON_KEY]
            if not one_line_with_a_fix(row[REFUSAL_KEY]):
                problems.append(f"{name}, {label}: the refusal is not one line with a fix: {row[REFUSAL_KEY]}")
            continue
        untrained[label] = row[UNTRAINED_TURNS_KEY]
        unrendered += row[REASONING_NOT_RENDERED_KEY]
        problems += [f"{name}, {label}: {problem}" for problem in independent_problems(messages, tools, row, tokenizer)]
    if reasons.get("tool call") == TOOL_CALLS_NOT_RENDERED and not warned:
        problems.append(f"{name}: records refused as {TOOL_CALLS_NOT_RENDERED} but the tool-call probe passes")
    with_calls = [label for label, (messages, _) in DIALOGUES.items() if any("tool_calls" in m for m in messages)]
    prepared_with_calls = [label for label in with_calls if label not in reasons]
    if warned and prepared_with_calls:  # a template that drops calls prepares no record with calls: 0 silent losses
        problems.append(f"{name}: drops tool calls yet prepared {prepared_with_calls}")
    notes = [f"{count} refused as {reason}" for reason, count in sorted(refused.items())]
    if unrendered:
        notes.append(f"reasoning not rendered ({unrendered} turn{'s' * (unrendered > 1)})")
    if warned:
        notes.append("the tool-call probe warns that records with calls are refused")
    notes += [f"{data} refused at start-up: {refusal}" for data, refusal in refusals.items()]
    untrained_text = ", ".join(f"{label} {count}" for label, count in untrained.items() if count)
    return [name, "prepared, exact", untrained_text, "; ".join(notes).replace("|", "\\|")], problems


def markdown(rows: list[list[str]]) -> str:
    header = [
        "template",
        "outcome",
        "turns left untrained (rewritten once later turns follow)",
        "records refused, notes",
    ]
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    return "\n".join([*lines, *(f"| {' | '.join(row)} |" for row in rows)]) + "\n"


DOC_HEADER = f"""# Released chat templates

Generated by `tests/data_pipeline/test_template_collection.py` (`WRITE_TEMPLATES_DOC=1 python -m pytest
tests/data_pipeline/test_template_collection.py`) from every template of llama.cpp's `models/templates` collection in
the `{TEMPLATES_SDIST}` sdist, each on the embedded tokenizer with its markup as special tokens, on {len(DIALOGUES)}
dialogues: {", ".join(DIALOGUES)}.

"Prepared, exact": every sample's tokens are the template's rendering and each trained run holds one assistant turn
(reply, tool calls, rendered reasoning) ending with a special token, nothing of the other messages and not the role
header the model is prompted with. A turn the template renders differently once later turns follow is left untrained
and counted (`untrained_turns` in stats.json); a record the template refuses, or whose tool calls it drops, is refused
in one line or skipped and counted under `data.on_error=skip`. "Refused at start-up": the start-up probe's line, which
says what the template does and what to do.

"""


def test_every_template_of_the_collection_prepares_exactly_or_is_refused_with_its_reason() -> None:
    templates = template_collection()
    assert len(templates) >= 70, sorted(templates)
    rows, problems = [], []
    for name, template in templates.items():
        row, found = template_outcome(name, template)
        rows.append(row)
        problems += found
    assert not problems, "\n".join(problems)
    # Neither outcome is vacuous: most templates prepare, and the known ones are refused with their reason.
    outcomes = {row[0]: row for row in rows}
    assert sum(row[1] == "prepared, exact" for row in rows) >= 50
    for granite in ("ibm-granite-granite-3.3-2B-Instruct", "HuggingFaceTB-SmolLM3-3B"):
        assert f"3 refused as {TOOL_CALLS_NOT_RENDERED}" in outcomes[granite][3]
    doc = DOC_HEADER + markdown(rows)
    if os.environ.get("WRITE_TEMPLATES_DOC") == "1":
        DOC.write_text(doc, encoding="utf-8")
    assert DOC.read_text(encoding="utf-8") == doc, (
        f"{DOC} is not this run's table: rewrite it with WRITE_TEMPLATES_DOC=1 python -m pytest {__file__}"
    )


def test_the_independent_check_finds_a_trained_role_header_and_a_turn_trained_without_its_call() -> None:
    # The check itself, on Qwen2.5's samples spoiled as the issues it looks for would spoil them.
    name = "Qwen-Qwen2.5-7B-Instruct"
    tokenizer = template_tokenizer(name, template_collection()[name])
    messages, tools = DIALOGUES["tool call"]
    columns = tokenize_dialogues([(messages, tools)], tokenizer, TokenizeOptions(10**6))
    row = {key: column[0].as_py() for key, column in columns.items()}
    assert independent_problems(messages, tools, row, tokenizer) == []
    first = next(i for i, label in enumerate(row[LABELS_KEY]) if label != IGNORE_INDEX)
    header = len(tokenizer("<|im_start|>assistant\n", add_special_tokens=False)[INPUT_IDS_KEY])
    with_header = {
        **row,
        LABELS_KEY: [
            *row[LABELS_KEY][: first - header],
            *row[INPUT_IDS_KEY][first - header : first],
            *row[LABELS_KEY][first:],
        ],
    }
    assert any(
        "opens with the role header" in problem
        for problem in independent_problems(messages, tools, with_header, tokenizer)
    )
    # The call turn trained as its end-of-turn token alone, as a template that drops tool calls would have it.
    end = next(i for i in range(first, len(row[LABELS_KEY])) if row[LABELS_KEY][i] == IGNORE_INDEX) - 1
    empty_call = {
        **row,
        LABELS_KEY: [IGNORE_INDEX if first <= i < end else label for i, label in enumerate(row[LABELS_KEY])],
    }
    assert any(
        "holds no assistant turn" in problem for problem in independent_problems(messages, tools, empty_call, tokenizer)
    )
