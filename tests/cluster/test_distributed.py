"""What a rank leaves when a collective fails: the lost node named in the log and in `lost_node.json`."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest

from cluster.distributed import LOST_NODE_MARKER, teardown

# As gloo words a peer's reset socket (an address of TEST-NET-1: no reverse record, so the address is the name).
GLOO_RESET = "[../gloo/transport/tcp/pair.cc:534] Read error [192.0.2.7]:61662: Connection reset by peer"


def fail_and_tear_down(error: BaseException, output_dir: Path) -> None:
    with pytest.raises(type(error)):
        try:
            raise error
        finally:
            teardown(output_dir)


def test_a_failed_collective_leaves_a_marker_naming_the_lost_node(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="cluster.distributed"):
        fail_and_tear_down(RuntimeError(GLOO_RESET), tmp_path)
    marker = json.loads((tmp_path / LOST_NODE_MARKER).read_text())
    assert marker["lost"] == ["192.0.2.7"] and marker["seen_on"] == socket.gethostname(), marker
    assert marker["rank"] == 0 and "Connection reset by peer" in marker["error"], marker
    assert f"Lost contact with 192.0.2.7 on {socket.gethostname()}" in caplog.text
    assert not list(tmp_path.glob(".*.tmp*")), "the marker's temporary file was left"


def test_another_error_leaves_no_marker(tmp_path: Path) -> None:
    fail_and_tear_down(ValueError("a user's error in the data"), tmp_path)
    assert not (tmp_path / LOST_NODE_MARKER).exists()


def test_a_marker_that_cannot_be_written_does_not_hide_the_collective_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "gone"  # the run dir on a shared disk that failed with the node
    with caplog.at_level(logging.ERROR, logger="cluster.distributed"):
        fail_and_tear_down(RuntimeError(GLOO_RESET), missing)
    assert f"Could not write {missing / LOST_NODE_MARKER}" in caplog.text
