"""`data.sources` entries: checked into `SourceSpec`s by the schema, every problem naming `data.sources[i]`."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.schema import load_run_config
from config.sources import parse_sources
from tests.helpers import write_chats


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (3, r"data.sources\[0\]: expected a path or a mapping"),
        ({"weight": 2}, r"data.sources\[0\].path: a file, glob or directory is required"),
        ({"path": "a", "weight": 0}, r"data.sources\[0\].weight=0 must be a number > 0"),
        ({"path": "a", "max_samples": 0}, r"data.sources\[0\].max_samples=0"),
        ({"path": "a", "format": "csv"}, r"data.sources\[0\].format='csv' is not one of"),
        ({"path": "a", "fields": {"body": "text"}}, r"data.sources\[0\].fields: 'body' is not a canonical field"),
        ({"path": "a", "fields": {"text": "body"}}, r"data.sources\[0\].fields.text: raw text only \(format: text"),
        ({"path": "a", "sample": 2}, r"data.sources\[0\]: unknown key\(s\) \['sample'\]"),
    ],
)
def test_bad_source_entries_name_their_index(entry: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_sources([entry])


def test_sources_in_the_config_may_be_mappings(tmp_path: Path) -> None:
    source = write_chats(tmp_path / "c.jsonl", 1)
    run = load_run_config([f"data.sources=[{source},{{path: {tmp_path},weight: 2.5,max_samples: 3}}]"])
    assert run.data.sources[1] == {"path": str(tmp_path), "weight": 2.5, "max_samples": 3}
    assert run.data.on_error == "raise" and run.data.cache_dir == ".cache/datasets"
    with pytest.raises(ValueError, match=r"data.sources\[0\].weight=-1 must be a number > 0"):
        load_run_config([f"data.sources=[{{path: {source},weight: -1}}]"])
    with pytest.raises(ValueError, match="data.on_error='ignore'"):
        load_run_config(["data.on_error=ignore"])
