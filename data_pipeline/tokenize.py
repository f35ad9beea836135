"""Chat-template tokenisation with assistant-only labels.

The loss mask comes from the tokenizer's own chat template, as the model's authors shipped it, in one of two ways:

- With `{% generation %}` markers (the embedded tokenizer's template), the markers give the character spans of
  the assistant replies, as in `apply_chat_template(..., return_assistant_tokens_mask=True)`.
- Without them (the templates Qwen2.5, Qwen3, Llama 3, Mistral, Gemma, DeepSeek and Phi ship), each assistant
  turn's span is derived from the template by prefix rendering: the dialogue up to the turn with the
  generation prompt (`add_generation_prompt=True`) is the prompt the model sees, the dialogue up to and with the
  turn adds exactly what the model must generate: the reply (tool calls included) and the end-of-turn token
  (`<|im_end|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>`, ...), trailing whitespace left out. Each span is
  verified: the prompt rendering must be a prefix of the rendering with the turn, and that must be a prefix of
  the whole dialogue's rendering. A turn that fails (the template rewrites earlier turns once later ones follow,
  as Qwen3 drops earlier thinking, or moves text into the prompt, as Mistral's system message) is not trained
  and is counted per source (`untrained_turns` in stats.json), never trained on the wrong tokens.

Either way every assistant turn of a multi-turn dialogue is trained (with its end-of-turn token) and nothing
else is. `check_assistant_mask` runs the template on a probe dialogue at start-up and refuses a template whose
mask is empty or does not cover exactly the assistant replies, rather than training on nothing.

`tokenize_dialogues` is the path data preparation takes: it renders each dialogue once with transformers'
template renderer, encodes the whole batch in one fast-tokenizer call, and turns token offsets and generation
spans into labels with numpy, returning Arrow columns. `tokenize_dialogue` is its reference, one
`apply_chat_template` call per dialogue: the tests and the start-up check hold the two token for token equal.

An assistant turn marked `train: False` in the canonical record (a `loss: 0` flag in the source) is masked out:
with markers the template's mask has one run of tokens per assistant turn, and the runs of untrained turns are
cleared; derived spans are per turn already.
Tools are passed to the template when it refers to them (`tools` in its source). Of several named templates (a
tokenizer whose `chat_template` is a dict: Hermes, Command-R), a dialogue with tools is rendered with `tool_use` and
the others with `default`, as transformers' `get_chat_template` chooses.

A dialogue that cannot be trained as its template renders it is refused, never trained on the wrong tokens: the
template raises on it (`chat_template_refused`: Gemma on a system message, Llama 3 on parallel calls), or it drops
an assistant turn's tool calls or the text sent with them (`tool_calls_not_rendered`: SmolLM3 and Granite 3.3 never
write `tool_calls`, which would train the turn as a bare end-of-turn token). Its row is empty and carries the reason
and a one-line problem with the fix; preparation stops on it with its `file:line` or skips and counts it
(`data.on_error`).

Truncation (`data.truncation`): a sample longer than `max_length` keeps its first `max_length` tokens
(`keep_start`), its last ones (`keep_end`: the prompt is cut from the left, the last assistant turn survives), or
none (`drop`); a sample left with no trainable token is dropped by the caller and counted.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from config.schema import DataConfig
from core.keys import ATTENTION_MASK_KEY, IGNORE_INDEX, INPUT_IDS_KEY, LABELS_KEY
from data_pipeline.schema import MESSAGES_KEY, REASONING_KEY, TOOLS_KEY, TRAIN_KEY

NUM_TRAINABLE_KEY, TRUNCATED_KEY = "num_trainable_tokens", "truncated"
# Assistant turns left untrained because the template renders them differently once later turns follow.
UNTRAINED_TURNS_KEY = "untrained_turns"
# Assistant turns with reasoning (trained with the turn), and those whose reasoning the template does not render.
REASONING_TURNS_KEY, REASONING_NOT_RENDERED_KEY = "reasoning_turns", "reasoning_not_rendered"
# Why a record is refused (None when it is not), as counted, and the one line that says what and the fix.
REFUSAL_REASON_KEY, REFUSAL_KEY = "refusal_reason", "refusal"
# Reasoning written into the content for a template that does not read `reasoning_content` (DeepSeek-R1's markers).
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"
THINK_END = THINK_CLOSE.strip()
CONVERSATION_KEY = "conversation"
TOKENIZED_KEYS = (
    INPUT_IDS_KEY,
    ATTENTION_MASK_KEY,
    LABELS_KEY,
    NUM_TRAINABLE_KEY,
    TRUNCATED_KEY,
    UNTRAINED_TURNS_KEY,
    REASONING_TURNS_KEY,
    REASONING_NOT_RENDERED_KEY,
    REFUSAL_REASON_KEY,
    REFUSAL_KEY,
)
# What a template raises on a dialogue it refuses, the reasons a record is refused for, and the fix of the first.
RENDER_ERRORS = (TemplateError, TypeError, KeyError, ValueError)
TEMPLATE_REFUSED, TOOL_CALLS_NOT_RENDERED = "chat_template_refused", "tool_calls_not_rendered"
TEMPLATE_REFUSED_FIX = (
    f" (data.on_error=skip skips such records, counted as {TEMPLATE_REFUSED}; or set data.chat_template to a "
    "template that accepts them)"
)
# transformers' own test for a template's generation markers (chat_template_utils.render_jinja_template).
GENERATION_MARKER = re.compile(r"\{\%-?\s*generation\s*-?\%\}")

PROBE_DIALOGUE = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "second question"},
    {"role": "assistant", "content": "second answer"},
]

Dialogue = tuple[list[dict[str, Any]], list[dict[str, Any]] | None]
"""Canonical messages and the dialogue's tool schemas (or None)."""


@dataclass(frozen=True)
class TokenizeOptions:
    """How a dialogue becomes a sample: the `data.*` keys that change its tokens or labels (all in the cache key)."""

    max_length: int
    """Tokens kept at most (`data.max_length`)."""
    truncation: str = "keep_start"
    """What a longer sample keeps: `keep_start`, `keep_end` or `drop` (`data.truncation`; see the module doc)."""
    merge_system: bool = False
    """Write a leading system message into the first user turn (`data.system_message=merge`)."""
    train_reasoning: bool = True
    """Train an assistant turn's thinking block; False trains only what follows its closing `</think>`
    (`data.train_reasoning`)."""

    @classmethod
    def from_data(cls, data: DataConfig) -> TokenizeOptions:
        return cls(data.max_length, data.truncation, data.system_message == "merge", data.train_reasoning)


def chat_template(tokenizer: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None = None) -> str:
    """The template `apply_chat_template` renders a dialogue with: the tokenizer's own or, of several named ones
    (Hermes, Command-R: `chat_template` is a dict), `tool_use` for a dialogue with tools and `default` otherwise."""
    return tokenizer.get_chat_template(None, tools or None)


def _template_tools(tools: list[dict[str, Any]] | None, tokenizer: PreTrainedTokenizerBase) -> list | None:
    return tools if tools and TOOLS_KEY in chat_template(tokenizer, tools) else None


def has_generation_markers(tokenizer: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None = None) -> bool:
    """Whether the chat template a dialogue (with these tools) is rendered with marks its replies with
    `{% generation %}`."""
    return GENERATION_MARKER.search(chat_template(tokenizer, tools)) is not None


def _untrained_turns(messages: list[dict[str, Any]]) -> tuple[list[int], int]:
    """The indices (among assistant turns) of the turns flagged `train: False`, and the number of assistant turns."""
    assistant = [m for m in messages if m["role"] == "assistant"]
    return [i for i, m in enumerate(assistant) if m.get(TRAIN_KEY) is False], len(assistant)


def tokenize_dialogue(
    messages: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    options: TokenizeOptions,
    tools: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The reference of `tokenize_dialogues`: one dialogue through `apply_chat_template`, labels as Python lists.

    Args:
        messages: canonical messages; an assistant turn with `train: False` gets no label.
        tokenizer: a tokenizer with a chat template, with or without generation markers.
        options: length, truncation, system message and reasoning choices.
        tools: tool schemas, passed to templates that use them.

    Returns:
        `input_ids`, `attention_mask`, `labels`, the number of trainable tokens, whether it was truncated, the
        number of assistant turns the template would not let us locate, the assistant turns with reasoning and
        those whose reasoning the template does not render, and why the dialogue is refused (None: it is not).
        A dialogue the template raises on raises here (`tokenize_dialogues` refuses it).
    """
    template_tools = _template_tools(tools, tokenizer)
    untrained, num_assistant_turns = _untrained_turns(messages)
    original, messages = messages, template_messages(messages, tokenizer, options.merge_system, template_tools)

    def render(part: list[dict[str, Any]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            part, tools=template_tools, tokenize=False, add_generation_prompt=generation_prompt
        )

    refusal = _unrendered_tool_calls(original, messages, render)
    text = "" if refusal else render(messages, False)
    reasoning_turns, reasoning_not_rendered = _reasoning_counts(original, text)
    if refusal:
        input_ids, mask, unlocated = [], [], 0
    elif has_generation_markers(tokenizer, template_tools):
        encoded = tokenizer.apply_chat_template(
            messages, tools=template_tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        input_ids = list(encoded[INPUT_IDS_KEY])
        mask = list(encoded["assistant_masks"])
        if untrained:
            mask = _clear_turns(mask, untrained, num_assistant_turns)
        unlocated = 0
    else:
        input_ids, mask, unlocated = _prefix_token_mask(messages, tokenizer, template_tools)
    if not options.train_reasoning:
        mask = _answer_only_mask(input_ids, mask, tokenizer)
    max_length = options.max_length
    truncated = len(input_ids) > max_length
    if truncated:
        kept = {"keep_start": slice(0, max_length), "keep_end": slice(-max_length, None), "drop": slice(0, 0)}
        input_ids, mask = input_ids[kept[options.truncation]], mask[kept[options.truncation]]
    labels = [token if trained else IGNORE_INDEX for token, trained in zip(input_ids, mask, strict=True)]
    return {
        INPUT_IDS_KEY: input_ids,
        ATTENTION_MASK_KEY: [1] * len(input_ids),
        LABELS_KEY: labels,
        NUM_TRAINABLE_KEY: sum(mask),
        TRUNCATED_KEY: truncated,
        UNTRAINED_TURNS_KEY: unlocated,
        REASONING_TURNS_KEY: reasoning_turns,
        REASONING_NOT_RENDERED_KEY: reasoning_not_rendered,
        REFUSAL_REASON_KEY: refusal.reason if refusal else None,
        REFUSAL_KEY: refusal.problem if refusal else None,
    }


def _prefix_token_mask(
    messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, tools: list | None
) -> tuple[list[int], list[int], int]:
    """The token-level reference of the derived spans: each turn's tokens are those the rendering with the turn
    adds to the tokens of the prompt rendering (or, where the generation prompt pre-fills part of the turn, of the
    prompt text the two renderings share), trailing whitespace tokens left out, when both are token prefixes of
    the next rendering. Returns the dialogue's tokens, the mask and the number of turns not located."""

    def render(part: list[dict[str, Any]], generation_prompt: bool, tokenize: bool = True) -> Any:
        rendered = tokenizer.apply_chat_template(
            part, tools=tools, tokenize=tokenize, return_dict=tokenize, add_generation_prompt=generation_prompt
        )
        return list(rendered[INPUT_IDS_KEY]) if tokenize else rendered

    input_ids = render(messages, False)
    mask, unlocated = [0] * len(input_ids), 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, with_turn = render(messages[:k], True), render(messages[: k + 1], False)
        start: int | None = len(prompt)
        if with_turn[: len(prompt)] != prompt:
            history = render(messages[:k], False)
            start = len(os.path.commonprefix([prompt, with_turn]))
            if with_turn[: len(history)] != history or start < len(history):
                start = None
        end = _without_whitespace(with_turn, len(with_turn), start, tokenizer)
        if end and with_turn[end - 1] == tokenizer.eos_token_id and input_ids[:end] != with_turn[:end]:
            # The EOS a template writes after the whole rendering (Phi-3.5), not after this turn: only after the
            # turn's own end-of-turn token (see _without_closing_eos).
            before = _without_whitespace(with_turn, end - 1, start, tokenizer)
            if before and with_turn[before - 1] in tokenizer.all_special_ids:
                end = before
        if start is None or end <= start or input_ids[:end] != with_turn[:end]:
            unlocated += 1
        elif message.get(TRAIN_KEY) is not False:
            mask[start:end] = [1] * (end - start)
    return input_ids, mask, unlocated


def _without_whitespace(ids: list[int], end: int, start: int | None, tokenizer: PreTrainedTokenizerBase) -> int:
    """`end` moved back over the whitespace tokens before it, not past `start`."""
    while start is not None and end > start and not tokenizer.decode(ids[end - 1 : end]).strip():
        end -= 1
    return end


def _answer_only_mask(input_ids: list[int], mask: list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token-level reference of `_after_thinking`: in each trained run, untrain the tokens up to the closing
    `</think>` and the whitespace after it."""
    mask = list(mask)
    for trained, group in itertools.groupby(enumerate(mask), key=lambda item: item[1]):
        positions = [position for position, _ in group]
        if not trained:
            continue
        begin, end = positions[0], positions[-1] + 1
        cut = next((j for j in range(begin + 1, end + 1) if THINK_END in tokenizer.decode(input_ids[begin:j])), None)
        if cut is None:
            continue
        while cut < end and not tokenizer.decode(input_ids[cut : cut + 1]).strip():
            cut += 1
        mask[begin:cut] = [0] * (cut - begin)
    return mask


def _after_thinking(text: str, span: tuple[int, int]) -> tuple[int, int]:
    """The span without its thinking block: what follows the last `</think>` in it and the whitespace after it."""
    start, end = span
    close = text.rfind(THINK_END, start, end)
    if close < 0:
        return span
    start = close + len(THINK_END)
    while start < end and text[start].isspace():
        start += 1
    return start, end


def _clear_turns(mask: list[int], turns: list[int], num_assistant_turns: int) -> list[int]:
    """Zero the mask runs of the given assistant turns (the n-th run of ones is the n-th assistant turn)."""
    flags = np.asarray(mask, dtype=bool)
    edges = np.diff(np.concatenate([[False], flags, [False]]).astype(np.int8))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if len(starts) != num_assistant_turns:
        raise ValueError(
            f"the chat template's assistant mask has {len(starts)} runs for {num_assistant_turns} assistant turns, "
            "so per-turn `loss: 0` flags cannot be honoured with this template; give each reply a {% generation %} "
            "block of its own, or drop the flags"
        )
    for turn in turns:
        flags[starts[turn] : ends[turn]] = False
    return flags.astype(int).tolist()


class ChatTemplateError(ValueError):
    """The chat template refused a dialogue (its `raise_exception`, or a template error)."""


class Refusal(NamedTuple):
    """Why a dialogue cannot be trained as its template renders it: `reason` counts it (`data.on_error=skip`),
    `problem` is the one line that says what and the fix."""

    reason: str
    problem: str


class RenderedDialogues(NamedTuple):
    """Each dialogue as its chat template writes it, and what to train of it."""

    texts: list[str]
    spans: list[list[tuple[int, int]]]
    """Per dialogue, the character spans of the assistant turns to train, in order."""
    untrained_turns: list[int]
    """Per dialogue, the assistant turns that could not be located (derived spans only; see the module doc)."""
    per_turn: list[bool]
    """Per dialogue, whether `spans` already leave out the `train: False` turns (derived spans) or are the
    template's generation blocks, one per assistant turn (markers)."""
    refusals: list[Refusal | None]
    """Per dialogue, None, or why it is refused (its text is then empty)."""


def render_dialogues(
    dialogues: Sequence[Dialogue], tokenizer: PreTrainedTokenizerBase, merge_system: bool = False
) -> RenderedDialogues:
    """Render each dialogue with the tokenizer's chat template and find the character spans to train.

    The same rendering `apply_chat_template` does (its template choice, special tokens as template variables,
    messages without None values), with one renderer call per kind of rendering for all the dialogues that pass
    no tools. A dialogue the template refuses, or whose tool calls it drops, is refused (see `Refusal`), not
    raised: the caller stops on it or skips and counts it (`data.on_error`).
    """
    try:
        return _render_dialogues(dialogues, tokenizer, merge_system)
    except RENDER_ERRORS:
        # One dialogue broke the batch's renderer call: render each alone to refuse only the ones that fail.
        parts = []
        for dialogue in dialogues:
            try:
                parts.append(_render_dialogues([dialogue], tokenizer, merge_system))
            except RENDER_ERRORS as e:
                problem = f"the chat template refused the dialogue: {e}{TEMPLATE_REFUSED_FIX}"
                refusal = Refusal(TEMPLATE_REFUSED, problem)
                parts.append(RenderedDialogues([""], [[]], [0], [True], [refusal]))
        return RenderedDialogues(*(list(itertools.chain.from_iterable(column)) for column in zip(*parts, strict=True)))


def _unrendered_tool_calls(
    original: list[dict[str, Any]], messages: list[dict[str, Any]], render: Callable[[list, bool], str]
) -> Refusal | None:
    """A dialogue whose template drops an assistant turn's tool calls, or the text sent with them (SmolLM3,
    Granite 3.3, Llama 3.2): trained as it renders, the turn would teach the model to answer a tool request with
    nothing. What a turn renders is what the rendering up to and with it adds to the prompt before it (`render`:
    messages, add_generation_prompt -> text); a called function's name and the text must be in it."""
    offset = len(original) - len(messages)  # a system message merged into the first user turn
    if not any(message.get("tool_calls") for message in messages):
        return None
    for k, message in enumerate(messages):
        calls = message.get("tool_calls")
        if message["role"] != "assistant" or not calls:
            continue
        prompt, upto = render(messages[:k], True), render(messages[: k + 1], False)
        turn = upto[len(os.path.commonprefix([prompt, upto])) :]
        missing = [call["function"]["name"] for call in calls if call["function"]["name"] not in turn]
        reply = (message.get("content") or "").split(THINK_END)[-1].strip()
        if missing:
            lost = f"the tool calls of this assistant turn ({', '.join(missing)})"
        elif reply and reply not in turn:
            lost = f"the text this assistant turn sends with its tool calls ({reply!r:.40})"
        else:
            continue
        return Refusal(
            TOOL_CALLS_NOT_RENDERED,
            f"messages[{k + offset}]: the chat template does not render {lost}, so the turn would be trained "
            "without it; set data.chat_template to a template that renders it, or data.on_error=skip to skip such "
            f"records (counted as {TOOL_CALLS_NOT_RENDERED})",
        )
    return None


def _render_dialogues(
    dialogues: Sequence[Dialogue], tokenizer: PreTrainedTokenizerBase, merge_system: bool
) -> RenderedDialogues:
    count = len(dialogues)
    rendered = RenderedDialogues([""] * count, [[] for _ in range(count)], [0] * count, [True] * count, [None] * count)
    groups: dict[int, tuple[list | None, list[int]]] = {}
    for i, (_, tools) in enumerate(dialogues):
        template_tools = _template_tools(tools, tokenizer)
        # Dialogues without tools share one call; a dialogue with tools renders on its own.
        groups.setdefault(-1 if template_tools is None else i, (template_tools, []))[1].append(i)
    for template_tools, indices in groups.values():
        template = chat_template(tokenizer, template_tools)
        render = partial(
            render_jinja_template, tools=template_tools, chat_template=template, **tokenizer.special_tokens_map
        )
        conversations = [template_messages(dialogues[i][0], tokenizer, merge_system, template_tools) for i in indices]
        for i, conversation in zip(indices, conversations, strict=True):
            rendered.refusals[i] = _unrendered_tool_calls(dialogues[i][0], conversation, partial(_render_one, render))
        derived = GENERATION_MARKER.search(template) is None
        if not derived:
            texts, generation_spans = render(conversations=conversations, return_assistant_tokens_mask=True)
            for i, text, generation in zip(indices, texts, generation_spans, strict=True):
                rendered.texts[i], rendered.spans[i], rendered.per_turn[i] = text, generation, False
            continue
        texts, _ = render(conversations=conversations)
        turns = [(j, k) for j, c in enumerate(conversations) for k, m in enumerate(c) if m["role"] == "assistant"]
        prompts = [conversations[j][:k] for j, k in turns]
        prompts = render(conversations=prompts, add_generation_prompt=True)[0] if turns else []
        # The rendering up to a dialogue's last message is the whole dialogue's: render only the others.
        inner = [(j, k) for j, k in turns if k < len(conversations[j]) - 1]
        inner_texts = render(conversations=[conversations[j][: k + 1] for j, k in inner])[0] if inner else []
        with_turn = dict(zip(inner, inner_texts, strict=True))
        for (j, k), prompt in zip(turns, prompts, strict=True):
            i, text = indices[j], texts[j]
            upto = with_turn.get((j, k), text)
            start, end = len(prompt), len(upto.rstrip())
            if not upto.startswith(prompt):
                # The generation prompt pre-fills part of the turn (an opened thinking block) that this turn writes
                # otherwise: the turn starts where the two renderings part, if that is after the earlier messages.
                history = _render_one(render, conversations[j][:k], False)
                start = len(os.path.commonprefix([prompt, upto]))
                if not upto.startswith(history) or start < len(history):
                    start = end
            end = _without_closing_eos(upto, end, text, tokenizer)
            if end <= start or not text.startswith(upto[:end]):
                rendered.untrained_turns[i] += 1
            elif conversations[j][k].get(TRAIN_KEY) is not False:
                rendered.spans[i].append((start, end))
        for i, text in zip(indices, texts, strict=True):
            rendered.texts[i] = text
    for i, refusal in enumerate(rendered.refusals):
        if refusal is not None:
            rendered.texts[i], rendered.spans[i], rendered.untrained_turns[i] = "", [], 0
    return rendered


def _render_one(render: Callable[..., tuple[list[str], Any]], messages: list[dict[str, Any]], prompt: bool) -> str:
    return render(conversations=[messages], add_generation_prompt=prompt)[0][0]


def _without_closing_eos(upto: str, end: int, text: str, tokenizer: PreTrainedTokenizerBase) -> int:
    """The end of a turn that others follow, without the EOS a template writes after the whole rendering (Phi-3.5:
    `<|end|>\n<|endoftext|>`): only what follows the turn's own end-of-turn token, which then ends the span.
    gpt-oss ends its last turn with its EOS (`<|return|>`) in place of `<|end|>`: that is the turn's end and is kept
    (the turn is then not a prefix of the whole rendering, so it is left untrained and counted)."""
    eos = tokenizer.eos_token
    if not eos or not upto[:end].endswith(eos) or text.startswith(upto[:end]):
        return end
    before = upto[: end - len(eos)].rstrip()
    return len(before) if any(before.endswith(token) for token in tokenizer.all_special_tokens) else end


def template_messages(
    messages: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    merge_system: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The messages as the chat template gets them, on both tokenisation paths.

    None values are dropped, as apply_chat_template does (templates test for a key's presence, not for None). An
    assistant turn's reasoning goes to a template that reads `reasoning_content` (Qwen3, DeepSeek) as that field;
    any other template gets it written into the content, between thinking markers, before the reply. With
    `merge_system` (`data.system_message=merge`) a leading system message opens the first user turn instead. `tools`
    (those passed to the template) choose among named templates.
    """
    reads_reasoning = REASONING_KEY in chat_template(tokenizer, tools)
    if merge_system and len(messages) > 1 and messages[0]["role"] == "system" and messages[1]["role"] == "user":
        first_user = {**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
        messages = [first_user, *messages[2:]]
    out = []
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}
        if not reads_reasoning and REASONING_KEY in message:
            reasoning = message.pop(REASONING_KEY)
            message["content"] = f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{message.get('content', '')}"
        out.append(message)
    return out


def _reasonings(messages: list[dict[str, Any]]) -> list[str]:
    """The reasoning of each assistant turn that has some: a `reasoning_content` field, or inline thinking."""
    found = []
    for m in messages:
        content = m.get("content") or ""
        if m["role"] != "assistant":
            continue
        if m.get(REASONING_KEY):
            found.append(m[REASONING_KEY])
        elif THINK_CLOSE.strip() in content:
            found.append(content.split(THINK_CLOSE.strip())[0].removeprefix(THINK_OPEN.strip()).strip())
    return found


def _reasoning_counts(messages: list[dict[str, Any]], text: str) -> tuple[int, int]:
    """Assistant turns with reasoning, and those whose reasoning the rendered `text` leaves out (DeepSeek-R1's
    template drops the thinking of every assistant turn)."""
    reasonings = _reasonings(messages)
    return len(reasonings), sum(1 for reasoning in reasonings if reasoning not in text)


def tokenize_dialogues(
    dialogues: Sequence[Dialogue], tokenizer: PreTrainedTokenizerBase, options: TokenizeOptions
) -> dict[str, pa.Array]:
    """Tokenise a batch of canonical dialogues and label their trained assistant turns, as Arrow columns.

    Token for token what `tokenize_dialogue` gives, in a fraction of its time: one fast-tokenizer call for the
    batch, and the per-token loop of `apply_chat_template` (offsets against generation spans) done with numpy.

    Args:
        dialogues: (messages, tools) pairs; an assistant turn with `train: False` gets no label.
        tokenizer: a fast tokenizer with a chat template, with or without generation markers.
        options: length, truncation, system message and reasoning choices.

    Returns:
        `input_ids`, `attention_mask`, `labels` (int32 and int8 lists), `num_trainable_tokens`, `truncated`,
        `untrained_turns` (assistant turns the template would not let us locate), `reasoning_turns`,
        `reasoning_not_rendered`, and `refusal_reason` and `refusal` (null, or why the row, then empty, is refused).

    Raises:
        ValueError: a tokenizer without offsets (not a fast one), generation spans out of order, or `train:
            False` flags on a template whose mask does not have one run per assistant turn.
    """
    rendered = render_dialogues(dialogues, tokenizer, options.merge_system)
    texts, spans = rendered.texts, rendered.spans
    if not options.train_reasoning:
        spans = [[_after_thinking(text, span) for span in of] for text, of in zip(texts, spans, strict=True)]
    # What apply_chat_template does after rendering: the special tokens are written by the template.
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)
    if encoded.encodings is None:
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: assistant masks need the token offsets of a "
            "`tokenizers`-backed tokenizer (load it with use_fast=True)"
        )
    lengths = np.fromiter((len(ids) for ids in encoded[INPUT_IDS_KEY]), dtype=np.int64, count=len(texts))
    token_starts = np.concatenate([[0], np.cumsum(lengths)])
    input_ids = np.fromiter(itertools.chain.from_iterable(encoded[INPUT_IDS_KEY]), dtype=np.int32)
    mask = _assistant_mask(encoded.encodings, texts, spans, lengths)
    for i, (messages, _) in enumerate(dialogues):
        untrained, num_assistant_turns = _untrained_turns(messages)
        if untrained and not rendered.per_turn[i] and rendered.refusals[i] is None:
            begin, end = token_starts[i], token_starts[i + 1]
            try:
                mask[begin:end] = _clear_turns(mask[begin:end], untrained, num_assistant_turns)
            except ValueError as e:  # this record's flags, not the others': refused (or skipped and counted)
                mask[begin:end] = False
                rendered.refusals[i] = Refusal(TEMPLATE_REFUSED, f"{e}{TEMPLATE_REFUSED_FIX}")

    # Per dialogue: assistant turns with reasoning, and those whose reasoning the rendering leaves out.
    reasoning = np.array(
        [_reasoning_counts(messages, text) for (messages, _), text in zip(dialogues, texts, strict=True)],
        dtype=np.int32,
    ).reshape(-1, 2)
    max_length, truncation = options.max_length, options.truncation
    truncated = lengths > max_length
    kept_lengths = np.where(truncated, 0 if truncation == "drop" else max_length, lengths)
    if truncated.any():
        position = np.arange(len(input_ids)) - np.repeat(token_starts[:-1], lengths)
        if truncation == "keep_end":
            keep = position >= np.repeat(lengths - kept_lengths, lengths)
        else:
            keep = position < np.repeat(kept_lengths, lengths)
        input_ids, mask = input_ids[keep], mask[keep]
    offsets = np.concatenate([[0], np.cumsum(kept_lengths)])
    trained_before = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    arrow_offsets = pa.array(offsets, type=pa.int32())
    return {
        INPUT_IDS_KEY: pa.ListArray.from_arrays(arrow_offsets, pa.array(input_ids)),
        ATTENTION_MASK_KEY: pa.ListArray.from_arrays(arrow_offsets, pa.array(np.ones(len(input_ids), np.int8))),
        LABELS_KEY: pa.ListArray.from_arrays(
            arrow_offsets, pa.array(np.where(mask, input_ids, np.int32(IGNORE_INDEX)))
        ),
        NUM_TRAINABLE_KEY: pa.array(trained_before[offsets[1:]] - trained_before[offsets[:-1]]),
        TRUNCATED_KEY: pa.array(truncated),
        UNTRAINED_TURNS_KEY: pa.array(rendered.untrained_turns, type=pa.int32()),
        REASONING_TURNS_KEY: pa.array(reasoning[:, 0]),
        REASONING_NOT_RENDERED_KEY: pa.array(reasoning[:, 1]),
        REFUSAL_REASON_KEY: pa.array([r.reason if r else None for r in rendered.refusals], type=pa.string()),
        REFUSAL_KEY: pa.array([r.problem if r else None for r in rendered.refusals], type=pa.string()),
    }


def _assistant_mask(
    encodings: list, texts: list[str], spans: list[list[tuple[int, int]]], lengths: np.ndarray
) -> np.ndarray:
    """Which tokens overlap a generation span: `apply_chat_template`'s per-token loop, vectorised.

    That loop walks each dialogue's spans in order, skipping those that end at or before the token's start,
    and marks the token when it ends after the start of the span it stopped at. With the dialogues laid end to
    end (each shifted by the lengths of the texts before it, plus one), the number of spans skipped is a
    `searchsorted` over the span ends, kept non-decreasing as the loop's index is; a token never reaches the
    next dialogue's first span, which starts after the token's own text ends.
    """
    text_starts = np.concatenate([[0], np.cumsum([len(text) + 1 for text in texts])])[:-1]
    offsets = (
        np.fromiter(
            itertools.chain.from_iterable(itertools.chain.from_iterable(e.offsets for e in encodings)), dtype=np.int64
        ).reshape(-1, 2)
        + np.repeat(text_starts, lengths)[:, None]
    )
    shifted = [
        (start + shift, end + shift)
        for shift, spans_of in zip(text_starts.tolist(), spans, strict=True)
        for start, end in spans_of
    ]
    span_bounds = np.array(shifted, dtype=np.int64).reshape(-1, 2)
    span_starts, span_ends = span_bounds[:, 0], span_bounds[:, 1]
    # Only the ends need to be in order for the count of skipped spans to be a searchsorted.
    if not len(span_ends):
        return np.zeros(len(offsets), dtype=bool)
    if (np.diff(span_ends) < 0).any():
        raise ValueError(
            "the chat template's {% generation %} blocks end out of order (nested blocks?): "
            "give each assistant reply one block of its own"
        )
    skipped = np.maximum.accumulate(np.searchsorted(span_ends, offsets[:, 0], side="right"))
    reached = skipped < len(span_ends)
    return reached & (offsets[:, 1] > span_starts[np.minimum(skipped, len(span_ends) - 1)])


def tokenize_batch(batch: pa.Table, tokenizer: PreTrainedTokenizerBase, options: TokenizeOptions) -> pa.Table:
    """One Arrow batch of canonical dialogues tokenised (`data_pipeline.parallel.map_arrow_batches` runs it).

    Each row's `conversation` is canonical JSON (messages, tools); it is replaced by the tokenised columns and
    the other columns pass through untouched. A refused dialogue gives an empty row with its `refusal_reason` and
    `refusal`: the caller stops on it or skips and counts it.
    """
    dialogues = []
    for conversation in batch.column(CONVERSATION_KEY).to_pylist():
        dialogue = json.loads(conversation)
        dialogues.append((dialogue[MESSAGES_KEY], dialogue.get(TOOLS_KEY)))
    columns = tokenize_dialogues(dialogues, tokenizer, options)
    table = batch.drop_columns([CONVERSATION_KEY])
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table


class ToolCallsNotRendered(ValueError):
    """The chat template drops the tool calls of the probe's tool exchange: records with tool calls are refused."""


def check_assistant_mask(tokenizer: PreTrainedTokenizerBase, example: Dialogue | None = None) -> None:
    """Refuse a chat template whose assistant mask is empty or covers anything but the replies.

    The probe dialogue goes through `tokenize_dialogues`, the path preparation takes, which must also agree
    with `apply_chat_template` (`tokenize_dialogue`) on it. Each trained run of tokens must hold one reply, in
    order, nothing of the other messages, and end with a special token (the template's end of turn). A template
    that refuses a system message (Gemma) or moves it into the last prompt (Mistral) is probed again without one:
    data with system messages then fails at the record with `file:line`, or leaves its turns untrained and counted.

    Args:
        tokenizer: its chat template (or named templates) is probed.
        example: a record of the data with tools or tool calls (messages, tools), when the data has any. A template
            that renders only dialogues with tools (a tool_use template alone) is then probed with the record's
            tools (the data's records without tools are refused one by one), and when the record has tool calls
            the probe also runs its first call and a result through the template.

    Raises:
        ToolCallsNotRendered: the template drops the probe's tool call.
        ValueError: no chat template, an empty mask, or a mask that covers more or less than the replies; each
            says what the template does and what to do.
        RuntimeError: the batch path and `apply_chat_template` disagree (a transformers change?).
    """
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template: set one (e.g. ChatML) before training on chat data")
    messages, tools = example if example is not None else ([], None)
    try:
        _check_dialogue_probe(tokenizer)
    except ChatTemplateError:
        if not tools:
            raise
        _check_dialogue_probe(tokenizer, tools)
    if any(message.get("tool_calls") for message in messages):
        probe, tools = _tool_probe(messages, tools)
        _check_probe(probe, tokenizer, tools)


def _check_dialogue_probe(tokenizer: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None = None) -> None:
    """The probe dialogue, and without its system message if the template refuses or moves that."""
    try:
        _check_probe(PROBE_DIALOGUE, tokenizer, tools)
    except (ChatTemplateError, _SystemMessageMoved):
        _check_probe([m for m in PROBE_DIALOGUE if m["role"] != "system"], tokenizer, tools)


PROBE_OPTIONS = TokenizeOptions(max_length=10**9)
PROBE_TOOL_RESULT, PROBE_TOOL_ANSWER = "probe tool result", "answer from the tool result"
# A tool schema for telling a template that needs tools from one that refuses the probe for another reason.
PROBE_TOOL = {
    "type": "function",
    "function": {"name": "probe", "description": "A probe", "parameters": {"type": "object", "properties": {}}},
}


def _tool_probe(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> tuple[list, list | None]:
    """The probe dialogue followed by the first tool call of a record (and its tools) and a result."""
    call = next(message["tool_calls"][0] for message in messages if message.get("tool_calls"))
    result = {"role": "tool", "content": PROBE_TOOL_RESULT, "name": call["function"]["name"]}
    if "id" in call:
        result["tool_call_id"] = call["id"]
    exchange = [
        {"role": "user", "content": "third question"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        result,
        {"role": "assistant", "content": PROBE_TOOL_ANSWER},
    ]
    return [*PROBE_DIALOGUE, *exchange], tools


class _SystemMessageMoved(ValueError):
    """The probe's turns could not be located with a system message: the template moves it."""


def _check_probe(
    probe: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None = None
) -> None:
    columns = tokenize_dialogues([(probe, tools)], tokenizer, PROBE_OPTIONS)
    row = {key: column[0].as_py() for key, column in columns.items()}
    if row[REFUSAL_REASON_KEY] == TOOL_CALLS_NOT_RENDERED:
        # The problem without its "messages[k]: ", a place in the probe, not in the data.
        problem = row[REFUSAL_KEY].partition(": ")[2]
        raise ToolCallsNotRendered(f"probing the chat template with the first tool call of the data: {problem}")
    if row[REFUSAL_REASON_KEY] is not None:
        raise ChatTemplateError(_template_refusal(probe, tools, tokenizer, row[REFUSAL_KEY]))
    reference = tokenize_dialogue(probe, tokenizer, PROBE_OPTIONS, tools)
    if row != reference:
        raise RuntimeError(
            "data_pipeline.tokenize: the batch tokenisation disagrees with apply_chat_template on the probe "
            f"dialogue ({row} vs {reference}); check the installed transformers version against this module"
        )
    template_tools = _template_tools(tools, tokenizer)
    markers = has_generation_markers(tokenizer, template_tools)
    # What each assistant turn must hold: its reply, or the name of the function it calls.
    replies = [m["content"] or m["tool_calls"][0]["function"]["name"] for m in probe if m["role"] == "assistant"]
    if row[UNTRAINED_TURNS_KEY] == len(replies) and probe[0]["role"] == "system":
        raise _SystemMessageMoved("no turn located with a system message")
    pairs = zip(row[INPUT_IDS_KEY], row[LABELS_KEY], strict=True)
    runs = [
        [token for token, _ in run]
        for trained, run in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX)
        if trained
    ]
    if not runs:
        raise ValueError("the chat template gives an empty assistant mask: " + _empty_mask_cause(tokenizer, markers))
    texts = [tokenizer.decode(run) for run in runs]
    special_ids = set(tokenizer.all_special_ids)
    if markers:
        matched = len(runs) == len(replies) and all(
            reply in tokenizer.decode(run, skip_special_tokens=True) for run, reply in zip(runs, replies, strict=True)
        )
    else:
        matched = _derived_runs_match(runs, replies, probe, tokenizer)
    if matched and not markers and all(any(text.endswith(reply) for reply in replies) for text in texts):
        raise ValueError(
            "the chat template writes no end-of-turn token after the last assistant reply (GLM-4.6's writes none after "
            "any reply, the next role header ends it; Apertus', Apriel 1.6's and Hunyuan's close a reply only once "
            f"another turn follows), so a trained reply would not teach the model to stop (trained: {texts}); set "
            "data.chat_template to a template that closes each reply with the model's end-of-turn token"
        )
    if not matched or any(run[-1] not in special_ids for run in runs):
        raise ValueError(
            f"the chat template's assistant mask covers {texts}, expected each reply of {replies} followed by the "
            "template's end-of-turn token, and nothing of the other messages; set data.chat_template to a template "
            + (
                "whose {% generation %} blocks hold just that"
                if markers
                else "that renders each reply so, or add {% generation %} ... {% endgeneration %} around each reply"
            )
        )


def _template_refusal(
    probe: list[dict[str, Any]], tools: list | None, tokenizer: PreTrainedTokenizerBase, problem: str
) -> str:
    """Why the template refused the probe: a template written for tools only (a `tool_use` template alone fails on
    a dialogue without tools) is named as such."""
    if tools is None:
        template = chat_template(tokenizer, [PROBE_TOOL])
        try:
            render_jinja_template([probe], [PROBE_TOOL], chat_template=template, **tokenizer.special_tokens_map)
        except RENDER_ERRORS:
            pass
        else:
            error = problem.removesuffix(TEMPLATE_REFUSED_FIX)
            return (
                f"probing the chat template on a dialogue without tools, {error}: it renders only dialogues with "
                "tools (a tool_use template); set data.chat_template to the model's default template, or give the "
                "tokenizer both, named default and tool_use"
            )
    return f"probing the chat template: {problem}"


def _empty_mask_cause(tokenizer: PreTrainedTokenizerBase, markers: bool) -> str:
    """Why no assistant turn of the probe could be located, and what to do."""
    if markers:
        return "its {% generation %} blocks cover no token"
    user_turn = PROBE_DIALOGUE[1:2]
    prompt = tokenizer.apply_chat_template(user_turn, tokenize=False, add_generation_prompt=True)
    if tokenizer.apply_chat_template(user_turn, tokenize=False, add_generation_prompt=False) == prompt:
        return (
            "it appends the generation prompt even without add_generation_prompt (as Command-R7B's tool_use "
            "template does), so a reply's end cannot be told apart from the next turn's start; set "
            "data.chat_template to a template that writes the generation prompt only when asked (the model's "
            "default template)"
        )
    return (
        "rendering the probe dialogue turn by turn located no assistant reply (the template rewrites earlier turns "
        "when later ones are added); set data.chat_template to one that renders each turn as a prefix of the next, "
        "or add {% generation %} ... {% endgeneration %} around each reply"
    )


def _derived_runs_match(
    runs: list[list[int]], replies: list[str], probe: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase
) -> bool:
    """Derived spans start where the generation prompt ends, so a run may hold text the template makes the model
    write around its reply (Qwen3's thinking block, Kimi-K3's closing tags), never another message's text. Turns the
    template rewrites later are left out (and counted): the runs are the replies of a subsequence of the turns, which
    holds the probe's last turn (the whole rendering is its rendering) or, with tools, at least the tool call (a
    template may write a tool result differently once a reply follows, as Bielik's does)."""
    others = [m["content"] for m in probe if m["role"] != "assistant"]
    texts = [tokenizer.decode(run, skip_special_tokens=True).strip() for run in runs]
    if any(other in text for other in others for text in texts):
        return False
    remaining, located = iter(enumerate(replies)), []
    for text in texts:
        located.append(next((k for k, reply in remaining if reply in text), None))
    calls = [k for k, m in enumerate(m for m in probe if m["role"] == "assistant") if m.get("tool_calls")]
    return None not in located and (len(replies) - 1 in located or bool(calls) and calls[0] in located)
