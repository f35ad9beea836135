"""`data.chat_template`: the chat template to render dialogues with, in place of the tokenizer's own.

A path to a Jinja file, the name of a template the project ships (`SHIPPED_TEMPLATES`), or the name of one of the
tokenizer's own named templates (Hermes and Command-R ship `default` and `tool_use`; without the option the
`tool_use` one renders the records with tools and `default` the others, as transformers does). The tokenizer carries
the template from then on, so it is part of the prepared data's fingerprint and is saved with the model.
Without the option the tokenizer's own template is used as shipped: with `{% generation %}` markers or without
(see `data_pipeline.tokenize`).
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from config.schema import RunConfig
from embedded.paths import TOKENIZER_DIR
from modeling.loading import load_tokenizer

# ChatML with `{% generation %}` markers, the embedded tokenizer's template.
SHIPPED_TEMPLATES = {"chatml": TOKENIZER_DIR / "chat_template.jinja"}


def chat_template_path(chat_template: str) -> Path:
    """The file `data.chat_template` names.

    Raises:
        ValueError: neither a shipped name nor an existing file.
    """
    path = SHIPPED_TEMPLATES.get(chat_template, Path(chat_template).expanduser())
    if not path.is_file():
        raise ValueError(
            f"data.chat_template: no such file '{chat_template}' (relative paths start at the launch directory "
            f"{Path.cwd()}), and not one of the shipped templates {sorted(SHIPPED_TEMPLATES)} nor of the tokenizer's "
            "named ones"
        )
    return path


def load_chat_tokenizer(run: RunConfig, path: str) -> PreTrainedTokenizerBase:
    """The run's tokenizer (`model.tokenizer_name_or_path`, else `path`) with the chat template `data.chat_template`
    names, or its own when that is null."""
    tokenizer = load_tokenizer(run.model, path)
    name = run.data.chat_template
    if isinstance(tokenizer.chat_template, dict) and name in tokenizer.chat_template:
        tokenizer.chat_template = tokenizer.chat_template[name]
    elif name is not None:
        tokenizer.chat_template = chat_template_path(name).read_text(encoding="utf-8")
    return tokenizer
