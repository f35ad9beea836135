"""See the loss mask before spending GPU hours: `python -m data_pipeline.inspect <train.py overrides>`.

Prepares the dataset exactly as `train.py` would (reusing the cache), then prints the first few training samples
as text with every trained token inside ⟦...⟧, so a wrong template, a missing assistant turn or an
over-eager truncation shows at a glance. A preference pair (`training.objective=reward|dpo`) shows its chosen and
its rejected sequence, each with its trained reply marked.
"""

from __future__ import annotations

import sys

from transformers import PreTrainedTokenizerBase

from config.schema import load_run_config
from core.errors import exit_on_user_error
from core.keys import (
    CHOSEN_INPUT_IDS_KEY,
    CHOSEN_LABELS_KEY,
    IGNORE_INDEX,
    INPUT_IDS_KEY,
    LABELS_KEY,
    REJECTED_INPUT_IDS_KEY,
    REJECTED_LABELS_KEY,
)
from data_pipeline.prepare import PreparedData, prepare_run

SAMPLES_SHOWN = 3
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"
# (label, input ids, labels) of the sequences a prepared row holds: one for a sample, two for a preference pair.
SEQUENCES = (
    ("", INPUT_IDS_KEY, LABELS_KEY),
    (" chosen", CHOSEN_INPUT_IDS_KEY, CHOSEN_LABELS_KEY),
    (" rejected", REJECTED_INPUT_IDS_KEY, REJECTED_LABELS_KEY),
)


def render_marked(input_ids: list[int], labels: list[int], tokenizer: PreTrainedTokenizerBase) -> str:
    """The decoded sample with each run of trained tokens wrapped in ⟦...⟧."""
    pieces, run, run_trained = [], [], None
    for token, label in zip(input_ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if run and trained != run_trained:
            pieces.append(_piece(run, run_trained, tokenizer))
            run = []
        run.append(token)
        run_trained = trained
    if run:
        pieces.append(_piece(run, run_trained, tokenizer))
    return "".join(pieces)


def _piece(tokens: list[int], trained: bool, tokenizer: PreTrainedTokenizerBase) -> str:
    text = tokenizer.decode(tokens)
    return f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text


def main(argv: list[str] | None = None) -> None:
    """Print the first training samples with their trained tokens marked."""
    with exit_on_user_error():  # a data or template problem: one line, no traceback (HYDRA_FULL_ERROR=1 keeps it)
        directory, _, tokenizer = prepare_run(load_run_config(sys.argv[1:] if argv is None else argv))
    train = PreparedData.load(directory).train
    # A CLI: the samples are its output.
    for index in range(min(SAMPLES_SHOWN, len(train))):
        row = train[index]
        for name, ids, labels in SEQUENCES:
            if ids not in row:
                continue
            header = f"--- sample {index}{name}: {len(row[ids])} tokens, trained ones inside {TRAINED_OPEN}…"
            print(f"{header}{TRAINED_CLOSE}")  # noqa: T201
            print(render_marked(row[ids], row[labels], tokenizer))  # noqa: T201
    print(f"prepared dataset: {directory.resolve()}")  # noqa: T201


if __name__ == "__main__":
    main()
