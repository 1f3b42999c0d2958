from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A started 3-node cluster; every process is stopped by PID afterwards, pass or fail."""
    running = Cluster(tmp_path)
    try:
        running.start()
        yield running
    finally:
        running.close()


@pytest.fixture
def compacting_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Like `cluster`, but snapshots and trims the Raft log every 20 entries."""
    running = Cluster(tmp_path, extra_args=["--raft-compaction-entries", "20"])
    try:
        running.start()
        yield running
    finally:
        running.close()
