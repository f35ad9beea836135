"""`core.files`: a file written atomically is replaced whole; a directory built once is built by one caller only,
and a build that fails leaves nothing behind. (Several processes at once: tests/data_pipeline/test_prepare.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.files import build_once, write_atomic


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, "old\n")
    write_atomic(path, b"new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_build_once_builds_only_when_the_directory_is_missing(tmp_path: Path) -> None:
    target, calls = tmp_path / "cache" / "abc", []

    def build(directory: Path) -> None:
        calls.append(directory)
        (directory / "data.txt").write_text("built")

    assert build_once(target, build) is True
    assert build_once(target, build) is False
    assert len(calls) == 1 and calls[0].parent == target.parent and calls[0] != target
    assert (target / "data.txt").read_text() == "built"
    assert sorted(p.name for p in target.parent.iterdir() if p.is_dir()) == ["abc"]  # no temporary directory left


def test_a_failed_build_leaves_nothing_and_the_next_call_builds(tmp_path: Path) -> None:
    target = tmp_path / "abc"

    def failing(directory: Path) -> None:
        (directory / "half.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(target, failing)
    assert not target.exists() and not [p for p in tmp_path.iterdir() if p.is_dir()]
    assert build_once(target, lambda directory: (directory / "data.txt").write_text("ok")) is True
    assert (target / "data.txt").read_text() == "ok"
