"""SwanLab and WandB for real, offline: the run files hold the metrics, and no secret leaks into the run dir."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import run_ok

FAKE_SECRETS = {
    "SWANLAB_API_KEY": "fake-swanlab-key-8c1d2e",
    "WANDB_API_KEY": "fakewandbkey" + "7" * 28,
    "HF_TOKEN": "hf_fakeHubToken31337",
}
QUICK = ("debug=quick", "heldout.file=null")  # logs train metrics at steps 2, 4, 6


def run_with_secrets(tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / backend
    run_ok(out, f"logger={backend}", *QUICK)
    return out


def assert_no_secret_in(directory: Path) -> None:
    secrets = [value.encode() for value in FAKE_SECRETS.values()]
    for path in directory.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            leaked = [s.decode() for s in secrets if s in data]
            assert not leaked, f"{path} contains {leaked}"


def swanlab_scalars(run_dir: Path) -> Counter:
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    (run_file,) = run_dir.glob("trackers/swanlab/run-*/run-*.swanlab")
    reader = DataStoreReader()
    reader.open(run_file)
    counts: Counter = Counter()
    for data in reader:
        record = Record()
        record.ParseFromString(data)
        if record.HasField("scalar"):
            counts[record.scalar.key] += 1
    reader.close()
    return counts


def wandb_history(run_dir: Path) -> tuple[Counter, list[str]]:
    from swanlab.converter.wb.wbdatastore import WBDataStoreReader
    from wandb.proto import wandb_internal_pb2

    (run_file,) = run_dir.glob("trackers/wandb/offline-run-*/run-*.wandb")
    counts: Counter = Counter()
    config_keys: list[str] = []
    with WBDataStoreReader() as reader:
        reader.open(run_file)
        while (data := reader.scan()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "history":
                counts.update(item.key or "/".join(item.nested_key) for item in record.history.item)
            elif kind == "config":
                config_keys += [update.key or "/".join(update.nested_key) for update in record.config.update]
    return counts, config_keys


@pytest.mark.slow
def test_swanlab_offline_records_metrics_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = run_with_secrets(tmp_path, "swanlab", monkeypatch)
    counts = swanlab_scalars(out)
    for metric in ("loss", "nll", "avg_p_correct", "dft_alpha"):
        assert counts[f"train/{metric}"] == 3, counts
    assert counts["eval/nll"] >= 1 and "train/train/loss" not in counts
    (config,) = out.glob("trackers/swanlab/run-*/files/config.yaml")
    assert "run_config" in config.read_text()
    assert_no_secret_in(out)


@pytest.mark.slow
def test_wandb_offline_records_metrics_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = run_with_secrets(tmp_path, "wandb", monkeypatch)
    counts, config_keys = wandb_history(out)
    for metric in ("loss", "nll", "avg_p_correct", "dft_alpha"):
        assert counts[f"train/{metric}"] == 3, counts
    assert counts["eval/nll"] >= 1
    assert "run_config" in config_keys
    assert_no_secret_in(out)
    assert os.environ["WANDB_API_KEY"] == FAKE_SECRETS["WANDB_API_KEY"]  # the test really had a key set
