"""`source_metric_names`: each source's name in per-source metric keys."""

from __future__ import annotations

from data_pipeline.stats import source_metric_names


def test_source_metric_names_are_short_and_unique() -> None:
    assert source_metric_names(["/d/a/train.jsonl", "/d/b/train.jsonl.gz", "/d/chat.json"]) == [
        "a_train",
        "b_train",
        "chat",
    ]
    assert source_metric_names(["a/x.jsonl", "a/x.json"]) == ["a_x_0", "a_x_1"]
