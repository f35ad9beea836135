"""Where the embedded default lives, importable without the model stack (the config check reads it).

`model.name_or_path=embedded:<name>` names a tiny model built locally (`embedded.base_model`); it and the
bundled sample data use the tokenizer the repo ships under `TOKENIZER_DIR`.
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_PREFIX = "embedded:"
REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO_ROOT / "embedded" / "assets" / "tokenizer"
SAMPLE_DIR = REPO_ROOT / "data" / "sample"


def is_embedded(name_or_path: str) -> bool:
    return name_or_path.startswith(EMBEDDED_PREFIX)
