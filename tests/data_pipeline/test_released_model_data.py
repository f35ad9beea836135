"""The released model's own tokenizer (SmolLM2: 49,152 tokens, its special tokens, a ChatML template without
generation markers that inserts a default system prompt) through the data pipeline, on the bundled files and on
LLaMA-Factory-style ShareGPT and Alpaca records: every trained run is one assistant block of the rendered text."""

from __future__ import annotations

import json
import re
from pathlib import Path

from transformers import AutoTokenizer

from data_pipeline.prepare import build_datasets
from embedded.addition import ADDITION_DIR
from tests.helpers import SAMPLE_SOURCES, data_config, trained_runs

ASSISTANT_BLOCK = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.DOTALL)

LLAMA_FACTORY_SHAREGPT = [
    {
        "conversations": [
            {"from": "human", "value": "Name a prime number above 10."},
            {"from": "gpt", "value": "11 is prime."},
            {"from": "human", "value": "And one above 20?"},
            {"from": "gpt", "value": "23 is prime."},
        ],
        "system": "You are a careful mathematician.",
    },
    {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]},
]
LLAMA_FACTORY_ALPACA = [
    {
        "instruction": "Translate to French.",
        "input": "good morning",
        "output": "bonjour",
        "system": "Be brief.",
        "history": [["Translate to French: cat", "chat"]],
    },
    {"instruction": "Spell 'abc' backwards.", "input": "", "output": "cba"},
]


def test_released_tokenizer_trains_exactly_the_assistant_blocks(released_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(released_model_dir)
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"
    (tmp_path / "sharegpt.json").write_text(json.dumps(LLAMA_FACTORY_SHAREGPT))
    (tmp_path / "alpaca.json").write_text(json.dumps(LLAMA_FACTORY_ALPACA))
    sources = [
        *SAMPLE_SOURCES,
        str(ADDITION_DIR / "additions_chat.jsonl"),
        str(tmp_path / "sharegpt.json"),
        str(tmp_path / "alpaca.json"),
    ]
    train, _, stats = build_datasets(
        data_config([{"path": s, "max_samples": 40} for s in sources], validation_split_percentage=0), tokenizer, 0
    )
    assert len(train) == 3 * 40 + 2 + 2
    multi_turn = 0
    for row in train:
        text = tokenizer.decode(row["input_ids"])
        assert text.startswith("<|im_start|>system\n")  # the template's default system prompt, or the record's
        blocks = ASSISTANT_BLOCK.findall(text)
        assert trained_runs(row, tokenizer) == blocks, text
        multi_turn += len(blocks) > 1
    assert multi_turn > 0  # the follow-up dialogues, ShareGPT's and Alpaca's history: every turn trained
    assert all(s.untrained_turns == 0 for s in stats.sources.values())
