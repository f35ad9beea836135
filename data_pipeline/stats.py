"""The data report: what every source gave, what was dropped and why, written as `stats.json` and a table.

For every source `kept + sum(dropped.values()) == records`: each record read ends up kept or dropped for one
counted reason (a broken line, a bad record, `max_samples`, down-sampling by `weight`, no trainable token left).
`tokens` and `trainable_tokens` count the kept records once; `samples` counts the training and validation rows
the source gives after up-sampling by `weight`. `dropped_columns` counts, per column name, the records whose
column was not part of their format. `source_metric_names` names each source in per-source metric keys.

Raw text (continued pre-training) is counted the same way with documents for records: `tokens` and
`trainable_tokens` are equal (every token is trained), `samples` counts the blocks a source's documents became,
`split_documents` the documents cut into several samples, and `short_blocks` the `concat` blocks shorter than
`data.max_length` (the last of each stream: kept, not dropped).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATS_FILE = "stats.json"


@dataclass
class SourceStats:
    """The accounting of one source (one `data.sources` entry's file)."""

    records: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    samples: int = 0
    dropped_columns: dict[str, int] = field(default_factory=dict)
    untrained_turns: int = 0
    """Assistant turns not trained because the chat template renders them differently once later turns follow
    (Qwen3 drops earlier thinking) or moves text into the prompt (Mistral's system message); see
    `data_pipeline.tokenize`."""
    reasoning_turns: int = 0
    """Assistant turns with reasoning (a reasoning part or field, or inline thinking), trained with their turn."""
    reasoning_not_rendered: int = 0
    """Of those, the turns whose reasoning the chat template leaves out of its rendering, so it is not trained
    (DeepSeek-R1's template drops the thinking of every assistant turn)."""
    split_documents: int = 0
    """Raw text: documents longer than `data.max_length` cut into several samples (`data.pretrain_blocks=packed`),
    none of their tokens dropped."""

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count


@dataclass
class DatasetStats:
    """Every source's accounting plus the split sizes."""

    sources: dict[str, SourceStats] = field(default_factory=dict)
    train_samples: int = 0
    validation_samples: int = 0
    pretrain_blocks: str | None = None
    """Raw text: how documents became samples (`data.pretrain_blocks`); None for chat data."""
    short_blocks: int = 0
    """Raw text, `concat`: blocks shorter than `data.max_length`, one at the end of each part's stream at most."""
    pairs: bool = False
    """Preference pairs: records are pairs, `kept` counts pairs, `tokens`/`trainable_tokens` both sequences'."""
    validation_split: str | None = None
    """What the validation share was drawn from: `records` (chat), `documents` or `blocks` (raw text whose documents
    are too few for the share); None without a validation set."""

    def summary(self) -> str:
        """A readable table: one row per source, a total, then the drop reasons and dropped columns."""
        columns = ("records", "kept", "dropped", "trunc", "tokens", "trained", "samples")
        rows = [
            (name, s.records, s.kept, sum(s.dropped.values()), s.truncated, s.tokens, s.trainable_tokens, s.samples)
            for name, s in self.sources.items()
        ]
        totals = ("total", *(sum(row[i] for row in rows) for i in range(1, len(columns) + 1)))
        width = max([len("source"), *(len(row[0]) for row in rows)])
        width = min(width, 60)

        def line(row: tuple) -> str:
            name = row[0] if len(row[0]) <= width else "…" + row[0][-(width - 1) :]
            return f"{name:<{width}} " + " ".join(f"{value:>9}" for value in row[1:])

        header = line(("source", *columns))
        rule = "-" * len(header)
        lines = [header, rule, *(line(row) for row in rows), rule, line(totals)]
        for name, s in self.sources.items():
            if s.dropped:
                reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(s.dropped.items()))
                lines.append(f"dropped from {name}: {reasons}")
            if s.dropped_columns:
                dropped = ", ".join(f"{column} ({n})" for column, n in sorted(s.dropped_columns.items()))
                lines.append(f"columns ignored in {name}: {dropped}")
            if s.reasoning_turns:
                lines.append(
                    f"assistant turns with reasoning in {name}: {s.reasoning_turns}, of which "
                    f"{s.reasoning_not_rendered} left out by the chat template (not trained)"
                )
            if s.untrained_turns:
                lines.append(
                    f"assistant turns left untrained in {name}: {s.untrained_turns} (the chat template renders "
                    "them differently once later turns follow)"
                )
            if s.split_documents:
                lines.append(
                    f"documents of {name} longer than data.max_length, cut into several samples: {s.split_documents}"
                )
        if self.pretrain_blocks is not None:
            lines.append(
                f"raw text: records are documents, every token trained, pretrain_blocks={self.pretrain_blocks}"
                + (f"; {self.short_blocks} block(s) shorter than max_length kept" if self.short_blocks else "")
            )
        if self.pairs:
            lines.append(
                "preference pairs: a record is a prompt with a chosen and a rejected reply; tokens count both sequences"
            )
        validation = f" (drawn from {self.validation_split})" if self.validation_split else ""
        lines.append(f"train samples: {self.train_samples}  validation samples: {self.validation_samples}{validation}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / STATS_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> DatasetStats:
        data = json.loads((Path(directory) / STATS_FILE).read_text(encoding="utf-8"))
        sources = {name: SourceStats(**values) for name, values in data.pop("sources").items()}
        return cls(sources=sources, **data)


def source_metric_names(source_names: Sequence[str]) -> list[str]:
    """Short unique names for metric keys: each file's stem (`data/chat.jsonl.gz` -> `chat`).

    A stem shared by several files gets its parent directory's name in front (`a_train`, `b_train`), and a
    name still shared gets its source index behind.
    """
    paths = [Path(name) for name in source_names]
    stems = [Path(path.name.removesuffix(".gz")).stem for path in paths]
    names = [
        stem if stems.count(stem) == 1 else f"{path.parent.name}_{stem}"
        for path, stem in zip(paths, stems, strict=True)
    ]
    return [name if names.count(name) == 1 else f"{name}_{index}" for index, name in enumerate(names)]
