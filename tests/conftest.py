"""Shared fixtures: the repo root, the shipped tokenizer, and the embedded base model (built once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO_ROOT / "embedded" / "assets" / "tokenizer"
SAMPLE_SOURCES = [
    str(REPO_ROOT / "data" / "sample" / "chat_letters.jsonl"),
    str(REPO_ROOT / "data" / "sample" / "reverse_alpaca.json"),
]

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def chatml_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)
