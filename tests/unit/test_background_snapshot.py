"""Snapshots written beside the tick thread: `Storage.snapshot_writer` and
`raft.snapshots.BackgroundSnapshot`, on real LMDB files.

They prove that:
1. a snapshot holds the state as of `snapshot_writer`, whatever is applied while it is
   written, and installs on another node as exactly that state;
2. the storage cannot be closed under a snapshot being written, and is free once it is
   written or discarded;
3. `BackgroundSnapshot` answers pysyncobj's checker as pysyncobj needs: SERIALIZING while a
   write runs, SUCCESS or FAILED exactly once, then NOT_SERIALIZING; a failed write leaves
   the previous snapshot in place and no partial file.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pysyncobj import SERIALIZER_STATE

from chasqui_node import limits
from chasqui_node.raft.snapshots import BackgroundSnapshot
from chasqui_node.storage import Storage, read_snapshot_header

WAIT_S = 30.0


def _apply(storage: Storage, first: int, last: int) -> None:
    for index in range(first, last + 1):
        key = b"k%d" % index
        storage.apply(index, lambda store: store.put(key, b"v" * 100))  # noqa: B023 (runs now)


def test_a_snapshot_holds_the_state_as_of_its_start(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "leader")
    try:
        _apply(storage, 1, 50)
        expected = storage.dump_state()
        writer = storage.snapshot_writer(b"raft data")
        _apply(storage, 51, 80)  # applied while the snapshot waits to be written
        path = str(tmp_path / "snapshot")
        writer.write(path)
        assert storage.applied_index == 80
    finally:
        storage.close()
    header, raft_data, _, _ = read_snapshot_header(path)
    assert (header["applied_index"], raft_data) == (50, b"raft data")
    follower = Storage(tmp_path / "follower")
    try:
        assert follower.install_snapshot(path) == b"raft data"
        assert follower.applied_index == 50
        assert follower.dump_state() == expected
    finally:
        follower.close()


@pytest.mark.parametrize("finish", ["write", "discard"])
def test_close_waits_for_a_snapshot_being_written(tmp_path: Path, finish: str) -> None:
    storage = Storage(tmp_path / "node")
    _apply(storage, 1, 5)
    writer = storage.snapshot_writer(b"")
    closer = threading.Thread(target=storage.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive(), "closed the storage under a snapshot's read transaction"
    if finish == "write":
        writer.write(str(tmp_path / "snapshot"))
    else:
        writer.discard()
    closer.join(WAIT_S)
    assert not closer.is_alive()
    writer.discard()  # a second end does nothing


@dataclass
class _Node:
    storage: Storage
    target: Path  # the snapshot
    snapshots: BackgroundSnapshot

    def start(self) -> None:
        """What pysyncobj does at a log compaction (its own rename then finds no file)."""
        self.snapshots.start(str(self.target) + ".tmp", ("entries", self.storage.applied_index))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[_Node]:
    """A node's storage with 10 entries applied and its background snapshot writer."""
    storage = Storage(tmp_path / "node")
    target = tmp_path / "raft.snapshot"
    try:
        _apply(storage, 1, 10)
        yield _Node(storage, target, BackgroundSnapshot(storage, str(target), "n1"))
    finally:
        storage.close()  # also proves every snapshot let go of the storage


def _fail_a_write(node: _Node) -> Path:
    """Run one snapshot whose write fails, as on a full disk (a directory stands where its
    file would go), and see it reported; return that directory."""
    blocker = node.target.with_name(node.target.name + ".writing")
    blocker.mkdir()
    node.start()
    node.snapshots.wait(WAIT_S)
    assert node.snapshots.progress() == SERIALIZER_STATE.FAILED
    return blocker


def _answer_after_the_pause(snapshots: BackgroundSnapshot) -> int:
    """Ask as pysyncobj does every tick until the answer is not SERIALIZING (bounded)."""
    deadline = time.monotonic() + WAIT_S
    while (answer := snapshots.progress()) == SERIALIZER_STATE.SERIALIZING:
        assert time.monotonic() < deadline, "the pause never ended"
        time.sleep(0.01)
    return answer


def test_background_snapshot_reports_success_once(node: _Node) -> None:
    assert node.snapshots.progress() == SERIALIZER_STATE.NOT_SERIALIZING
    node.start()
    assert node.snapshots.progress() in (SERIALIZER_STATE.SERIALIZING, SERIALIZER_STATE.SUCCESS)
    _apply(node.storage, 11, 20)
    node.snapshots.wait(WAIT_S)
    assert node.snapshots.progress() == SERIALIZER_STATE.SUCCESS
    assert node.snapshots.progress() == SERIALIZER_STATE.NOT_SERIALIZING
    header, raft_data, _, _ = read_snapshot_header(str(node.target))
    assert header["applied_index"] == 10
    assert pickle.loads(raft_data) == ("entries", 10)
    assert not os.path.exists(str(node.target) + ".tmp")
    assert not os.path.exists(str(node.target) + ".writing")


def test_a_failed_write_reports_failure_once_and_keeps_the_old_snapshot(node: _Node) -> None:
    node.storage.write_snapshot(str(node.target), b"old")
    before = node.target.read_bytes()
    _fail_a_write(node)
    assert node.snapshots.progress() == SERIALIZER_STATE.NOT_SERIALIZING
    assert node.target.read_bytes() == before
    _apply(node.storage, 11, 12)  # the storage was let go: applies go on


def test_after_a_failure_a_quiet_pause_then_the_next_attempt(
    node: _Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(limits, "SNAPSHOT_RETRY_S", 0.5)
    blocker = _fail_a_write(node)
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert "cannot write a snapshot" in errors[0].getMessage()
    blocker.rmdir()
    node.start()  # pysyncobj asks again at once: the pause
    assert node.snapshots.progress() == SERIALIZER_STATE.SERIALIZING
    assert _answer_after_the_pause(node.snapshots) == SERIALIZER_STATE.FAILED  # asks again
    assert not node.target.exists()
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1  # a quiet pause
    node.start()
    node.snapshots.wait(WAIT_S)
    assert node.snapshots.progress() == SERIALIZER_STATE.SUCCESS
    assert read_snapshot_header(str(node.target))[0]["applied_index"] == 10


def test_close_ends_the_pause_after_a_failure(node: _Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "SNAPSHOT_RETRY_S", 60.0)
    _fail_a_write(node)
    node.start()
    # A snapshot from the leader waits only for a write, not for the pause (tick thread).
    waiter = threading.Thread(target=node.snapshots.wait)
    waiter.start()
    waiter.join(WAIT_S)
    assert not waiter.is_alive()
    node.snapshots.close(WAIT_S)  # well before the 60 s pause is over
    assert node.snapshots.progress() == SERIALIZER_STATE.FAILED
    assert not node.target.exists()


def test_a_stale_staging_file_never_replaces_the_snapshot(node: _Node) -> None:
    """pysyncobj renames the path it passes to the serializer over the snapshot right after
    the call; a partial file left there by a stop must not be what it renames."""
    staging = node.target.with_name(node.target.name + ".tmp")
    staging.write_bytes(b"partial snapshot from before a crash")
    node.start()
    assert not staging.exists()
    node.snapshots.wait(WAIT_S)
    assert node.snapshots.progress() == SERIALIZER_STATE.SUCCESS
    assert read_snapshot_header(str(node.target))[0]["applied_index"] == 10


def test_a_partial_file_from_a_stopped_write_is_removed(node: _Node) -> None:
    partial = node.target.with_name(node.target.name + ".writing")
    partial.write_bytes(b"cut short")
    BackgroundSnapshot(node.storage, str(node.target), "n1")
    assert not partial.exists()


def test_a_snapshot_that_cannot_start_reports_failure_then_pauses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "SNAPSHOT_RETRY_S", 60.0)
    storage = Storage(tmp_path / "node")
    snapshots = BackgroundSnapshot(storage, str(tmp_path / "raft.snapshot"), "n1")
    storage.close()  # a closed environment cannot begin a transaction
    snapshots.start(str(tmp_path / "raft.snapshot.tmp"), ("entries",))
    assert snapshots.progress() == SERIALIZER_STATE.FAILED
    assert snapshots.progress() == SERIALIZER_STATE.NOT_SERIALIZING
    snapshots.start(str(tmp_path / "raft.snapshot.tmp"), ("entries",))
    assert snapshots.progress() == SERIALIZER_STATE.SERIALIZING  # not every tick: a pause
    snapshots.close(WAIT_S)
    assert snapshots.progress() == SERIALIZER_STATE.FAILED
