"""Released chat templates and LLaMA-Factory's data files, from package sdists on PyPI (nothing from a model hub).

The templates are the models' own, from their tokenizer_config.json files, as llama.cpp keeps them for its tests
(`models/templates/`), vendored in the llama-cpp-python sdist; LLaMA-Factory's sdist ships its `data/` folder.
Each sdist is downloaded once with pip (no build, no dependencies) and the files kept under `.cache/`, one folder per
pinned version, so a newer pin is fetched (and its new templates picked up) on its own.

A template goes on the embedded byte-level tokenizer with its markup as tokens (`template_tokenizer`): the
`<|...|>`, `<｜...｜>`, `[INST]`-like and `<tag>` literals it writes become special tokens, as role headers and
end-of-turn markers are in the real vocabularies, with the family's BOS and EOS.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from core.files import build_once
from embedded.paths import REPO_ROOT, TOKENIZER_DIR

TEMPLATES_SDIST, TEMPLATES_IN_SDIST = "llama-cpp-python==0.3.36", "/vendor/llama.cpp/models/templates/"
LLAMAFACTORY_SDIST, LLAMAFACTORY_DATA, _JSON = "llamafactory==0.9.5", "/data/", (".json", ".jsonl")
CACHE = REPO_ROOT / ".cache" / "released_templates"

# Quoted markup a template writes: `<|im_end|>`, `<｜User｜>`, `[INST]`, `<|turn>`, `<start_of_turn>`, `</think>`.
_MARKUP = re.compile(
    r"<\|[^|<>'\" ]{1,40}\|>|<｜[^｜]{1,40}｜>|\[/?[A-Z][A-Z_]{1,30}\]|<\|[a-z_]{2,30}>|<[a-z_]{2,30}\|>"
    r"|</?[A-Za-z][A-Za-z_0-9]{1,30}>"
)
# Tokens a template defines for itself (`{%- set eos_token = '<seed:eos>' %}`).
_SET_TOKEN = re.compile(r"set\s+\w*_token\s*=\s*['\"]([^'\"]+)['\"]")
# (part of the template's name, BOS, EOS) of the families whose BOS or EOS is not the embedded tokenizer's.
_FAMILY_BOS_EOS = (
    ("gpt-oss", "<|startoftext|>", "<|return|>"),
    ("Hermes", "<|begin_of_text|>", "<|im_end|>"),
    ("lama-3", "<|begin_of_text|>", "<|eot_id|>"),
    ("functionary", "<|begin_of_text|>", "<|eot_id|>"),
    ("istral", "<s>", "</s>"),
    ("Devstral", "<s>", "</s>"),
    ("Apriel", "<s>", "</s>"),
    ("gemma", "<bos>", "<eos>"),
    ("eepSeek", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    ("deepseek", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    ("Phi-3.5", "<s>", "<|endoftext|>"),
    ("MiniMax", "]~!b[", "[e~["),
    ("ohere", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    ("granite", None, "<|end_of_text|>"),
)


def sdist_files(spec: str, keep: Callable[[str], bool]) -> Path:
    """The folder holding the files of the PyPI sdist `spec` whose member names `keep` selects, fetched once."""

    def fetch(directory: Path) -> None:
        command = [sys.executable, "-m", "pip", "download", spec, "--no-deps", "--no-binary", ":all:", "--quiet"]
        result = subprocess.run([*command, "-d", str(directory)], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"could not download the {spec} sdist from the package index:\n{result.stderr}"
        (sdist,) = directory.glob("*.tar.gz")
        with tarfile.open(sdist) as archive:
            for member in archive:
                if member.isfile() and keep(member.name):
                    (directory / Path(member.name).name).write_bytes(archive.extractfile(member).read())
        sdist.unlink()

    directory = CACHE / spec.replace("==", "-")
    build_once(directory, fetch)
    return directory


def template_collection() -> dict[str, str]:
    """Every template of the pinned collection: file name (without `.jinja`) -> Jinja text."""
    directory = sdist_files(TEMPLATES_SDIST, lambda name: TEMPLATES_IN_SDIST in name and name.endswith(".jinja"))
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(directory.glob("*.jinja"))}


def llamafactory_data(*names: str) -> list[Path]:
    """Files of LLaMA-Factory's `data/` folder, as its sdist ships them (its JSON and JSONL files are kept)."""
    directory = sdist_files(LLAMAFACTORY_SDIST, lambda name: LLAMAFACTORY_DATA in name and name.endswith(_JSON))
    paths = [directory / name for name in names]
    assert all(path.is_file() for path in paths), f"{LLAMAFACTORY_SDIST} ships no {names} in {LLAMAFACTORY_DATA}"
    return paths


def template_tokenizer(name: str, template: str | dict[str, str]) -> PreTrainedTokenizerBase:
    """The embedded tokenizer with `template` (or several named ones), its markup as special tokens and the BOS and
    EOS of the family `name` belongs to."""
    texts = list(template.values()) if isinstance(template, dict) else [template]
    markup = sorted({token for text in texts for token in (*_MARKUP.findall(text), *_SET_TOKEN.findall(text))})
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    special: dict = {"additional_special_tokens": markup}
    for part, bos, eos in _FAMILY_BOS_EOS:
        if part in name:
            special |= {"eos_token": eos} | ({"bos_token": bos} if bos else {})
            break
    tokenizer.add_special_tokens(special)
    tokenizer.chat_template = template
    return tokenizer
