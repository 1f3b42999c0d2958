"""Snapshots between pysyncobj and Chasqui's storage: written beside the tick thread, received
from a leader into a staging file, and installed only when they bring something new.

pysyncobj's hooks, all on its tick thread: `BackgroundSnapshot.start` and `.progress` are its
`serializer` and `serializeChecker`; `SnapshotReceiver` replaces its serializer's
`setTransmissionData` (node.py); `SnapshotInstaller.accept` judges a received snapshot and
`SnapshotInstaller.load` is its `deserializer`. A snapshot is one self-contained file
(storage.py) holding the state and pysyncobj's raft data, `(lastAppliedEntry, prevEntry,
clusterNodes)`, pickled.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from pysyncobj import SERIALIZER_STATE

from chasqui_node import limits
from chasqui_node.journal import fsync_directory
from chasqui_node.raft.log import DurableRaftLog
from chasqui_node.storage import (
    SnapshotCorrupt,
    SnapshotWriter,
    Storage,
    StorageError,
    VerifiedSnapshot,
    read_snapshot_header,
)

logger = logging.getLogger(__name__)

FileIdentity = tuple[int, int, int]  # inode, size, modification time (see `file_identity`)


class SnapshotReceiver:
    """Takes a leader's snapshot chunks (pysyncobj's serializer.setTransmissionData) into a
    staging file, and hands it to pysyncobj for installing only when `accept` says so.

    pysyncobj writes the chunks straight over the node's own snapshot file and then clears the
    Raft log, whatever the snapshot holds. A leader may send a snapshot the follower does not
    need (a stale "reset" reply makes it walk back after the follower caught up); clearing the
    log then drops entries the follower had acknowledged, and the leader, which counted them,
    commits entries that only it holds (the fault suite saw confirmed messages lost when such a
    leader was deposed). Raft installs a snapshot only when it brings something new (the Raft
    paper, section 7); anything else is dropped without a reply, and the leader goes on sending
    entries after the snapshot's index as usual.
    """

    def __init__(self, target: str, accept: Callable[[str], bool]) -> None:
        self._target = target
        self._staging = target + ".incoming"
        self._accept = accept
        self._file: Any = None
        self.completed = False  # the last chunk taken completed a snapshot to install
        with suppress(FileNotFoundError):
            os.unlink(self._staging)  # a transfer cut short by a stop

    def __call__(self, data: Any) -> bool:
        """pysyncobj's contract: True once a complete snapshot is in place for loading."""
        self.completed = self._take(data)
        return self.completed

    def _take(self, data: Any) -> bool:
        if data is None:
            return False
        chunk, is_first, is_last = data
        try:
            if is_first:
                self._close()
                self._file = open(self._staging, "wb")  # noqa: SIM115 (spans many calls)
            elif self._file is None:
                return False  # the start of this transfer was missed; the leader resends
            self._file.write(chunk)
            if not is_last:
                return False
            self._close()
            if not self._accept(self._staging):
                os.unlink(self._staging)
                return False
            os.replace(self._staging, self._target)  # fsynced by Storage.install_snapshot
            return True
        except OSError as error:
            logger.warning("cannot receive a snapshot from the leader: %s", error)
            self._close()
            return False

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class BackgroundSnapshot:
    """Writes this node's snapshots beside the tick thread: pysyncobj's `serializer` and
    `serializeChecker`.

    A snapshot copies the whole applied state, hashes it and fsyncs it: 1.9 s for an 850 MB
    state (a backlog of 600k messages of 1 KiB). On the tick thread that stopped Raft on the
    node meanwhile, so a leader missed its heartbeats and was deposed at every compaction.
    Now the tick thread only fixes the contents (an LMDB read transaction at the applied
    index, `Storage.snapshot_writer`) and a thread writes them to `<snapshot>.writing`, fsyncs
    it, renames it over the snapshot and fsyncs the directory. pysyncobj asks `progress` every
    tick and trims the log only after it reports SUCCESS, so the entries the snapshot covers
    stay in the journal until the snapshot that replaces them is durable.

    pysyncobj renames the path it passed to `start` over the snapshot when `start` returns;
    `start` makes sure no file is there, so that rename fails, which pysyncobj takes quietly
    (with a checker, only the checker's answer counts). While a write runs, pysyncobj sends no
    snapshot to lagging followers; a snapshot arriving from the leader waits for it
    (`wait`), so an older one of ours never lands over it. After a failure (a full disk: one
    error line) the next attempt waits `limits.SNAPSHOT_RETRY_S`, reported as SERIALIZING.
    """

    def __init__(self, storage: Storage, target: str, node_id: str) -> None:
        self._storage = storage
        self._target = target
        self._writing = target + ".writing"
        self._node_id = node_id
        self._thread: threading.Thread | None = None
        self._outcome: int | None = None  # SUCCESS or FAILED, until `progress` reports it
        self._failed_at: float | None = None  # monotonic time of the last failure
        self._paused_until: float | None = None  # no attempt before this, after a failure
        self._closed = False
        with suppress(FileNotFoundError):
            os.unlink(self._writing)  # a write cut short by a stop

    def start(self, path: str, raft_data: Any) -> None:
        """pysyncobj's serializer, on the tick thread. Never raises."""
        with suppress(OSError):  # left by a stop during a write before this class existed
            os.unlink(path)  # pysyncobj would rename it over the snapshot when this returns
        if (
            self._failed_at is not None
            and time.monotonic() < self._failed_at + limits.SNAPSHOT_RETRY_S
        ):
            # pysyncobj asks again right after a failure (a full disk): `progress` answers
            # SERIALIZING until the pause is over, so a lasting failure costs one attempt and
            # one log line per pause. Nothing runs meanwhile.
            self._paused_until = self._failed_at + limits.SNAPSHOT_RETRY_S
            return
        try:
            writer = self._storage.snapshot_writer(pickle.dumps(raft_data, protocol=4))
        except StorageError as error:
            self._failed(None, f"cannot start a snapshot: {error}")
            return
        self._thread = threading.Thread(
            target=self._write, args=(writer,), name="chasqui-snapshot", daemon=True
        )
        self._thread.start()

    def _write(self, writer: SnapshotWriter) -> None:
        started = time.monotonic()
        try:
            writer.write(self._writing)
            os.replace(self._writing, self._target)
            fsync_directory(Path(self._target).parent)
        except (OSError, StorageError) as error:
            self._failed(writer, f"cannot write a snapshot: {error}")
            return
        except Exception:
            logger.exception("node %s: writing a snapshot failed", self._node_id)
            self._failed(writer, "writing a snapshot failed (see above)")
            return
        self._failed_at = None
        logger.info(
            "wrote a snapshot at applied index %d: %.1f MB in %.3f s",
            writer.applied_index,
            os.path.getsize(self._target) / 1e6,
            time.monotonic() - started,
        )
        self._outcome = SERIALIZER_STATE.SUCCESS

    def _failed(self, writer: SnapshotWriter | None, reason: str) -> None:
        if writer is not None:
            writer.discard()
        with suppress(OSError):
            os.unlink(self._writing)
        logger.error(
            "node %s: %s; the log is kept, next attempt in %g s",
            self._node_id,
            reason,
            limits.SNAPSHOT_RETRY_S,
        )
        self._failed_at = time.monotonic()
        self._outcome = SERIALIZER_STATE.FAILED

    def progress(self) -> int:
        """pysyncobj's serializeChecker, on the tick thread: SUCCESS or FAILED once per
        snapshot, SERIALIZING while one is written, NOT_SERIALIZING otherwise."""
        outcome = self._outcome
        if outcome is not None:
            self._outcome = None
            self._thread = None
            return outcome
        if self._paused_until is not None:
            if time.monotonic() < self._paused_until and not self._closed:
                return int(SERIALIZER_STATE.SERIALIZING)
            self._paused_until = None
            return int(SERIALIZER_STATE.FAILED)  # pysyncobj asks again: the real attempt
        state: int = (
            SERIALIZER_STATE.SERIALIZING
            if self._thread is not None
            else SERIALIZER_STATE.NOT_SERIALIZING
        )
        return state

    def wait(self, timeout_s: float | None = None) -> None:
        """Until the snapshot being written (if any) is in place or has failed (a pause after
        a failure writes nothing and is not waited for)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def close(self, timeout_s: float) -> None:
        """Let a write in progress finish, within `timeout_s`; a pause after a failure ends."""
        self._closed = True
        self.wait(timeout_s)


class SnapshotInstaller:
    """Judges the snapshots a leader sends and installs them (tick thread).

    Raft installs a snapshot only when it brings something new (the Raft paper, section 7):
    `accept` declines one whose last entry is applied here already or held in this node's log
    (`SnapshotReceiver` then drops it). `load` is pysyncobj's deserializer, called at start-up
    and when a leader's snapshot is installed. A snapshot verified once (by
    `verified_snapshot_file` at start-up, or by `accept`) is handed to `load` with its file's
    identity, so the same file is not hashed twice; a different file at the path is verified
    in full. `on_installed` runs after the state is swapped in (the replicator re-reads the
    clock and the members); `on_fatal` stops the node.
    """

    def __init__(
        self,
        storage: Storage,
        snapshots: BackgroundSnapshot,
        raft_log: DurableRaftLog,
        node_id: str,
        on_fatal: Callable[[str], None],
        on_installed: Callable[[], None],
        verified: tuple[FileIdentity, VerifiedSnapshot] | None = None,
    ) -> None:
        self._storage = storage
        self._snapshots = snapshots
        self._raft_log = raft_log
        self._node_id = node_id
        self._on_fatal = on_fatal
        self._on_installed = on_installed
        self._verified_snapshot = verified

    def accept(self, path: str) -> bool:
        """Whether a snapshot received from the leader brings anything new (tick thread): not
        when its last entry is applied here already, or is in this node's log (then the
        entries up to it agree with the leader's, and the ones after it may be acknowledged)."""
        try:
            verified = read_snapshot_header(path)
            _command, last_index, last_term = pickle.loads(verified[1])[0]
        except (
            SnapshotCorrupt,
            pickle.UnpicklingError,
            ValueError,
            TypeError,
            IndexError,
        ) as error:
            logger.error(
                "node %s: declined a damaged snapshot from the leader: %s", self._node_id, error
            )
            return False
        self._snapshots.wait()  # our own snapshot, being written, must not land over this one
        applied = self._storage.applied_index
        if last_index <= applied or self._raft_log.holds(last_index, last_term):
            logger.info(
                "node %s: declined a snapshot at index %d (applied here: %d): nothing new",
                self._node_id,
                last_index,
                applied,
            )
            return False
        self._verified_snapshot = (file_identity(path), verified)  # a rename keeps it
        return True

    def load(self, path: str) -> Any:
        """pysyncobj's deserializer: swap the snapshot's state in and return its raft data.
        A corrupt snapshot must never be served or voted on: `on_fatal`, then SnapshotCorrupt."""
        handed, self._verified_snapshot = self._verified_snapshot, None
        verified = None
        with suppress(OSError):  # a missing file fails verification below
            if handed is not None and handed[0] == file_identity(path):
                verified = handed[1]
        try:
            raft_data = pickle.loads(self._storage.install_snapshot(path, verified))
        except SnapshotCorrupt as error:
            self._on_fatal(str(error))
            raise
        except (OSError, StorageError) as error:
            # A full or failing disk: the state stays as it was, and pysyncobj would go on as
            # if the snapshot were installed. Stop, as when an apply fails; the restart loads
            # the snapshot again.
            self._on_fatal(f"cannot install the snapshot {path}: {error}")
            raise
        self._on_installed()
        return raft_data


def verified_snapshot_file(path: Path) -> tuple[FileIdentity, VerifiedSnapshot] | None:
    """This node's own snapshot, verified before anything starts (None when there is none): a
    node must not serve or vote on top of a snapshot it cannot trust (raises SnapshotCorrupt,
    a StorageError)."""
    if not path.exists():
        return None
    verified = read_snapshot_header(str(path))
    return file_identity(str(path)), verified


def file_identity(path: str) -> FileIdentity:
    """Inode, size and modification time: the same after a rename, new for a new file."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns
