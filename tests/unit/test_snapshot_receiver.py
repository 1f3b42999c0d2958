"""Unit tests of how a follower takes a snapshot from its leader (raft/snapshots.py).

A follower installs a received snapshot only when it brings something new: its last entry is
neither applied here nor held in the Raft log. Installing any other one would clear the log,
dropping entries the follower had acknowledged and the leader had counted towards a commit
(the fault suite lost confirmed messages that way). They prove that:

1. `DurableRaftLog.holds` answers for exactly the stored (index, term) pairs;
2. `SnapshotReceiver` assembles chunks into a staging file, replaces the node's own snapshot
   only when the snapshot is accepted, and leaves it untouched otherwise;
3. `SnapshotInstaller.accept` declines snapshots at or below the applied index, snapshots
   whose last entry is in the log, and damaged files; it accepts a newer one, and
   `SnapshotInstaller.load` installs it without hashing it again;
4. the follower's commit index moves only over entries the leader's message verified
   (`_follower_commit`, raft/node.py).
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from chasqui_node import storage as storage_module
from chasqui_node.journal import Entry, Journal
from chasqui_node.raft.log import DurableRaftLog
from chasqui_node.raft.node import _follower_commit
from chasqui_node.raft.snapshots import BackgroundSnapshot, SnapshotInstaller, SnapshotReceiver
from chasqui_node.storage import SnapshotCorrupt, Storage


def log_with(directory: Path, entries: list[Entry]) -> DurableRaftLog:
    log = DurableRaftLog(Journal(directory / "j"), directory, on_fatal=lambda _reason: None)
    for entry in entries:
        log.add(*entry)
    log.sync()
    return log


def test_holds_only_stored_index_and_term(tmp_path: Path) -> None:
    log = log_with(tmp_path, [(b"a", 5, 1), (b"b", 6, 1), (b"c", 7, 2)])
    assert log.holds(5, 1) and log.holds(7, 2)
    assert not log.holds(7, 1), "same index, other term: a conflicting entry"
    assert not log.holds(4, 1) and not log.holds(8, 2), "outside the log"
    log.deleteEntriesTo(1)
    assert not log.holds(5, 1) and log.holds(6, 1), "compacted entries are no longer held"


def test_holds_on_an_empty_log(tmp_path: Path) -> None:
    assert not log_with(tmp_path, []).holds(1, 1)


def send(receiver: SnapshotReceiver, payload: bytes, chunk_bytes: int = 4) -> list[bool]:
    """Feed `payload` the way pysyncobj's leader does: chunks, then an empty last one."""
    chunks = [payload[at : at + chunk_bytes] for at in range(0, len(payload), chunk_bytes)]
    answers = [receiver((chunk, at == 0, False)) for at, chunk in enumerate(chunks)]
    answers.append(receiver((b"", False, True)))
    return answers


def test_accepted_snapshot_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "raft.snapshot"
    target.write_bytes(b"ours")
    seen: list[bytes] = []

    def accept(path: str) -> bool:
        seen.append(Path(path).read_bytes())
        return True

    answers = send(SnapshotReceiver(str(target), accept), b"the leader's snapshot")
    assert answers[-1] is True and not any(answers[:-1])
    assert seen == [b"the leader's snapshot"], "judged once, on the complete file"
    assert target.read_bytes() == b"the leader's snapshot"
    assert not (tmp_path / "raft.snapshot.incoming").exists()


def test_declined_snapshot_leaves_ours_in_place(tmp_path: Path) -> None:
    target = tmp_path / "raft.snapshot"
    target.write_bytes(b"ours")
    answers = send(SnapshotReceiver(str(target), lambda _path: False), b"stale snapshot")
    assert not any(answers)
    assert target.read_bytes() == b"ours"
    assert not (tmp_path / "raft.snapshot.incoming").exists()


def test_chunks_without_a_start_are_ignored(tmp_path: Path) -> None:
    target = tmp_path / "raft.snapshot"
    receiver = SnapshotReceiver(str(target), lambda _path: True)
    assert receiver((b"middle", False, False)) is False
    assert receiver((b"", False, True)) is False
    assert receiver(None) is False
    assert not target.exists()


def test_a_new_transfer_restarts_the_staging_file(tmp_path: Path) -> None:
    target = tmp_path / "raft.snapshot"
    receiver = SnapshotReceiver(str(target), lambda _path: True)
    receiver((b"abandoned ", True, False))
    assert send(receiver, b"complete")[-1] is True
    assert target.read_bytes() == b"complete"


def test_a_leftover_staging_file_is_removed(tmp_path: Path) -> None:
    staging = tmp_path / "raft.snapshot.incoming"
    staging.write_bytes(b"cut short by a stop")
    SnapshotReceiver(str(tmp_path / "raft.snapshot"), lambda _path: True)
    assert not staging.exists()


@pytest.fixture
def snapshot_at_3(tmp_path: Path) -> str:
    """A real snapshot file of a state applied to index 3, last entry (3, term 2)."""
    storage = Storage(tmp_path / "leader")
    try:
        for index in (1, 2, 3):
            key = b"k%d" % index
            storage.apply(index, lambda store: store.put(key, b"v"))  # noqa: B023 (runs now)
        path = str(tmp_path / "leader.snapshot")
        raft_data: tuple[Entry, Entry, set[str]] = ((b"c3", 3, 2), (b"c2", 2, 2), set())
        storage.write_snapshot(path, pickle.dumps(raft_data, protocol=4))
    finally:
        storage.close()
    return path


@dataclass
class Follower:
    """A follower's storage and Raft log, its `SnapshotInstaller`, and what that reported."""

    storage: Storage
    raft_log: DurableRaftLog
    installer: SnapshotInstaller
    fatal: list[str]  # reasons given to on_fatal
    installed: list[None]  # one per on_installed call


def follower(tmp_path: Path, applied: int, log: list[Entry]) -> Follower:
    storage = Storage(tmp_path / "follower")
    for index in range(1, applied + 1):
        storage.apply(index, lambda store: None)
    raft_log = log_with(tmp_path / "follower", log)
    snapshots = BackgroundSnapshot(storage, str(tmp_path / "follower.snapshot"), "n3")
    fatal: list[str] = []
    installed: list[None] = []
    installer = SnapshotInstaller(
        storage, snapshots, raft_log, "n3", fatal.append, lambda: installed.append(None)
    )
    return Follower(storage, raft_log, installer, fatal, installed)


@pytest.mark.parametrize(
    ("applied", "log", "accepted"),
    [
        (0, [], True),  # empty follower: everything is new
        (1, [(b"c1", 1, 1), (b"x2", 2, 1)], True),  # behind, and its tail conflicts
        (2, [(b"c1", 1, 1), (b"c2", 2, 2)], True),  # behind, log ends before the snapshot
        (3, [(b"c3", 3, 2)], False),  # applied up to the snapshot already
        (7, [(b"c7", 7, 4)], False),  # applied past it, log compacted past it
        (1, [(b"c2", 2, 2), (b"c3", 3, 2), (b"c4", 4, 2)], False),  # holds its last entry
    ],
)
def test_accept_only_what_brings_something_new(
    tmp_path: Path, snapshot_at_3: str, applied: int, log: list[Entry], accepted: bool
) -> None:
    node = follower(tmp_path, applied, log)
    try:
        assert node.installer.accept(snapshot_at_3) is accepted
        if not accepted:
            assert len(node.raft_log) == len(log), "a declined snapshot leaves the log alone"
    finally:
        node.storage.close()


def test_a_damaged_snapshot_is_declined_and_logged(
    tmp_path: Path, snapshot_at_3: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = bytearray(Path(snapshot_at_3).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(snapshot_at_3).write_bytes(bytes(data))
    node = follower(tmp_path, 0, [])
    try:
        with caplog.at_level(logging.ERROR):
            assert node.installer.accept(snapshot_at_3) is False
        assert "declined a damaged snapshot" in caplog.text
    finally:
        node.storage.close()


# -- the follower's commit index --------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "installed", "expected"),
    [
        # entries 11..13 verified: the commit may follow the leader's up to 13, not past it
        ({"prevLogIdx": 10, "entries": [(b"a", 11, 2), (b"b", 12, 2), (b"c", 13, 2)]}, False, 13),
        ({"prevLogIdx": 10, "entries": []}, False, 10),  # a heartbeat verifies only 10
        ({"prevLogIdx": 14, "entries": [(b"a", 15, 2)]}, False, 15),  # pysyncobj's own answer
        ({"prevLogIdx": 10, "transmission": "finish", "data": b""}, False, 11),
        ({"serialized": (b"chunk", True, False)}, False, 8),  # a chunk: nothing verified yet
        ({"serialized": (b"", False, True)}, False, 8),  # a declined snapshot: nothing either
        ({"serialized": (b"", False, True)}, True, 15),  # installed: the log ends at its index
    ],
)
def test_the_commit_index_stays_within_what_the_leader_verified(
    message: dict[str, object], installed: bool, expected: int
) -> None:
    # pysyncobj moved the commit index from 8 to min(leader's commit, end of the log) = 15
    assert _follower_commit(8, 15, {"type": "append_entries", **message}, installed) == expected


def test_an_accepted_snapshot_is_not_hashed_again_when_loaded(
    tmp_path: Path, snapshot_at_3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = follower(tmp_path, 0, [])
    try:
        assert node.installer.accept(snapshot_at_3) is True
        target = str(tmp_path / "raft.snapshot")
        os.replace(snapshot_at_3, target)  # as the receiver does
        hashed: list[str] = []
        original = storage_module.read_snapshot_header
        monkeypatch.setattr(
            storage_module,
            "read_snapshot_header",
            lambda path: hashed.append(path) or original(path),
        )
        raft_data = node.installer.load(target)
        assert raft_data[0] == (b"c3", 3, 2)
        assert hashed == [] and node.storage.applied_index == 3
        assert len(node.installed) == 1, "the replicator re-reads clock and members once"
    finally:
        node.storage.close()


def test_a_different_file_at_the_path_is_verified_in_full(
    tmp_path: Path, snapshot_at_3: str
) -> None:
    node = follower(tmp_path, 0, [])
    try:
        assert node.installer.accept(snapshot_at_3) is True
        damaged = bytearray(Path(snapshot_at_3).read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        target = tmp_path / "raft.snapshot"
        target.write_bytes(bytes(damaged))  # another file than the one accepted
        with pytest.raises(SnapshotCorrupt):
            node.installer.load(str(target))
        assert node.storage.applied_index == 0
    finally:
        node.storage.close()


def test_a_disk_failure_while_installing_stops_the_node_and_keeps_the_state(
    tmp_path: Path, snapshot_at_3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = follower(tmp_path, 1, [])
    reasons = node.fatal
    real_open = open

    def full_disk_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith("data.mdb") and "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    try:
        before = node.storage.dump_state()
        monkeypatch.setattr("builtins.open", full_disk_open)
        with pytest.raises(OSError, match="No space left"):
            node.installer.load(snapshot_at_3)
        monkeypatch.undo()
        assert len(reasons) == 1 and "No space left on device" in reasons[0]
        assert snapshot_at_3 in reasons[0]
        assert node.storage.applied_index == 1
        assert node.storage.dump_state() == before
        assert node.installed == []
    finally:
        node.storage.close()
