"""LMDB storage: the applied state, its applied Raft index, and snapshots.

The only module that imports lmdb. The data directory holds:

    state/data.mdb    the state machine's key-value store (named database "state") and, in the
                      same environment, the index of the last applied Raft entry ("meta").
    state/unsynced-boot   present while commits are not fsynced; holds the kernel's boot id.

The applied state is not fsynced per entry: the fsynced Raft journal and the fsynced snapshot
are the durable record, and the state is rebuilt from them when it may be damaged. LMDB commits
without fsync survive a process crash (they are in the page cache) but not a machine crash,
which may leave a torn file. So while it runs, Storage keeps a marker with the boot id; a clean
close fsyncs the state and removes the marker. A marker from another boot means the machine
went down in between: the state is discarded, pysyncobj loads the last snapshot and replays the
journal after it. That saves one fsync per entry on every node's commit path.

Applying an entry writes the state changes and the new applied index in ONE write transaction,
so replaying the Raft journal after a crash is idempotent: an entry at or below the stored index
is skipped (pysyncobj replays everything after its last snapshot on restart).

A snapshot is one self-contained file that pysyncobj ships to lagging followers:

    magic "CHQSNAP1" | u32 header length | header JSON {format_version, applied_index,
    raft_data_bytes} | raft data | LMDB compact copy | u64 copy length | SHA-256 of all before

It is read back and verified before anything is replaced.

LMDB reads through a read-only shared memory map of data.mdb. Every page fault there maps the
faulting page and, by the kernel's fault-around, up to 15 neighbours already in the page cache,
so a node that writes a large backlog ends up mapping most of the file (RSS of 80% of data.mdb
after 1M publishes). Those pages are clean and file-backed, yet counted as the node's resident
memory and reclaimed late because they are mapped. So Storage drops its mapping of them (the
data stays in the page cache and on disk; the next read faults it back in) at most once a
second after a commit and after each snapshot copy: see `_MapRelease`.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import lmdb

from chasqui_node import limits
from chasqui_node.journal import fsync_directory

logger = logging.getLogger(__name__)

T = TypeVar("T")

SNAPSHOT_MAGIC = b"CHQSNAP1"
SNAPSHOT_FORMAT_VERSION = 1
_APPLIED_INDEX_KEY = b"applied_index"
UNSYNCED_MARKER = "unsynced-boot"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
BOOT_ID_ENV = "CHASQUI_BOOT_ID"  # test hook: stands in for the boot id (the power-loss test)
_MADV_DONTNEED = 4  # Linux <sys/mman.h>


def current_boot_id() -> str | None:
    """What identifies this boot of the machine, or None where the kernel does not say."""
    override = os.environ.get(BOOT_ID_ENV)
    if override:
        return override
    try:
        return BOOT_ID_PATH.read_text().strip() or None
    except OSError:
        return None


class StorageError(Exception):
    """The data directory cannot be used as it is; the node must stop rather than serve."""


class SnapshotCorrupt(StorageError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"snapshot {path} is corrupt: {reason}; refusing to install it")
        self.path = path
        self.reason = reason


class LmdbStore:
    """The state machine's `Store` protocol over one LMDB transaction.

    Every operation goes through one cursor on the state database, repositioned by each call:
    py-lmdb's cursor methods cost about half of the transaction's `get`/`put`/`delete` with a
    `db=` argument, and `apply_entry` makes several of them per message. Not thread-safe, like
    the transaction it wraps."""

    def __init__(self, txn: Any, db: Any) -> None:
        self._txn = txn
        self._db = db
        self._cursor = txn.cursor(db=db)

    def get(self, key: bytes) -> bytes | None:
        value = self._cursor.get(key)
        return None if value is None else bytes(value)

    def put(self, key: bytes, value: bytes) -> None:
        self._cursor.put(key, value)

    def delete(self, key: bytes) -> bool:
        cursor = self._cursor
        return bool(cursor.set_key(key) and cursor.delete())

    def scan(
        self, prefix: bytes, start: bytes = b"", limit: int = 1000
    ) -> list[tuple[bytes, bytes]]:
        found: list[tuple[bytes, bytes]] = []
        if limit <= 0:
            return found
        cursor = self._cursor
        if not cursor.set_range(max(prefix, start)):
            return found
        for key, value in cursor:
            if not key.startswith(prefix):
                break
            found.append((bytes(key), bytes(value)))
            if len(found) >= limit:
                break
        return found

    def floor(self, prefix: bytes, key: bytes) -> tuple[bytes, bytes] | None:
        cursor = self._cursor
        if cursor.set_range(key):
            if cursor.key() != key and not cursor.prev():
                return None
        elif not cursor.last():
            return None
        found = bytes(cursor.key())
        return (found, bytes(cursor.value())) if found.startswith(prefix) else None


class _ReadWriteLock:
    """Many readers or one exclusive holder; the exclusive side is only the snapshot swap and
    close. A shared hold may be released by another thread than the one that took it."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._exclusive = False

    def acquire_shared(self) -> None:
        with self._condition:
            while self._exclusive:
                self._condition.wait()
            self._readers += 1

    def release_shared(self) -> None:
        with self._condition:
            self._readers -= 1
            self._condition.notify_all()

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._condition:
            while self._exclusive:
                self._condition.wait()
            self._exclusive = True
            while self._readers:
                self._condition.wait()
        try:
            yield
        finally:
            with self._condition:
                self._exclusive = False
                self._condition.notify_all()


class _MapRelease:
    """Drops this process's mapping of the resident pages of one file that LMDB maps read-only.

    madvise(MADV_DONTNEED) on a shared file mapping only unmaps: the page cache and the file
    keep the data, and a read that touches a dropped page faults it back in (readers in other
    threads are safe). Linux only; elsewhere, or if the map is not found, it does nothing.
    """

    def __init__(self, path: Path) -> None:
        self._ranges = _mapped_ranges(path)
        self._released_at = time.monotonic()
        self._madvise: Any = None
        if self._ranges:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                self._madvise = libc.madvise
            except (OSError, AttributeError):
                logger.debug("no madvise here: LMDB's map is not released")

    def forget(self) -> None:
        """The map is about to be unmapped: never touch its addresses again (they may be reused)."""
        self._madvise = None

    def release(self, *, now: bool = False) -> None:
        """Drop the mapped pages, unless done less than `limits.STORAGE_MAP_RELEASE_INTERVAL_S`
        ago. Call it only while the environment is open (under the storage lock)."""
        if self._madvise is None:
            return
        moment = time.monotonic()
        if not now and moment - self._released_at < limits.STORAGE_MAP_RELEASE_INTERVAL_S:
            return
        self._released_at = moment
        for start, length in self._ranges:
            if self._madvise(start, length, _MADV_DONTNEED) != 0:
                error = ctypes.get_errno()
                logger.warning(
                    "madvise of LMDB's map failed (%s): no longer released", os.strerror(error)
                )
                self._madvise = None
                return


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """(start, length) of each mapping of `path` in this process, from /proc/self/maps."""
    target = str(path.resolve())
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            ranges.append((start, end - start))
    return ranges


class Storage:
    """The node's applied state in LMDB.

    Writes (`apply`, `install_snapshot`) come only from the replication thread; reads (`read`)
    may come from any thread and see the last committed transaction.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        fsync: bool = True,
        map_size_bytes: int = limits.STORAGE_MAP_SIZE_BYTES_DEFAULT,
    ) -> None:
        self._data_dir = Path(data_dir)
        self._state_dir = self._data_dir / "state"
        self._fsync = fsync
        self._map_size_bytes = map_size_bytes
        self._lock = _ReadWriteLock()
        # Without a boot id a machine crash cannot be told from a process crash: fsync then.
        self._boot_id = current_boot_id()
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._recover_interrupted_swap()
        self._discard_state_of_a_crashed_boot()
        self._open()

    # -- lifecycle ---------------------------------------------------------------------------

    def _open(self) -> None:
        self._state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._env = lmdb.open(
                str(self._state_dir),
                map_size=self._map_size_bytes,
                max_dbs=4,
                max_readers=limits.STORAGE_READERS_MAX,
                # See the module docstring: fsynced per commit only without a boot id.
                sync=self._fsync and self._boot_id is None,
                metasync=False,
                readahead=False,
            )
        except lmdb.Error as error:
            raise StorageError(f"cannot open LMDB state in {self._state_dir}: {error}") from error
        if self._boot_id is not None:
            # Before the first commit that is not fsynced.
            marker = self._state_dir / UNSYNCED_MARKER
            with open(marker, "w") as out:
                out.write(self._boot_id)
                out.flush()
                os.fsync(out.fileno())
            fsync_directory(self._state_dir)
        self._map_release = _MapRelease(self._state_dir / "data.mdb")
        self._state_db = self._env.open_db(b"state")
        self._meta_db = self._env.open_db(b"meta")
        with self._env.begin() as txn:
            raw = txn.get(_APPLIED_INDEX_KEY, db=self._meta_db)
        self._applied_index = 0 if raw is None else struct.unpack(">Q", raw)[0]

    def close(self) -> None:
        """fsync the state and close it: the next start keeps it whatever happens in between."""
        with self._lock.exclusive():
            self._env.sync(True)
            self._map_release.forget()
            self._env.close()
            with suppress(FileNotFoundError):
                (self._state_dir / UNSYNCED_MARKER).unlink()
                fsync_directory(self._state_dir)

    def _discard_state_of_a_crashed_boot(self) -> None:
        """Remove state whose commits were not fsynced before the machine went down."""
        marker = self._state_dir / UNSYNCED_MARKER
        try:
            written_at = marker.read_text().strip()
        except FileNotFoundError:
            return
        if self._boot_id is not None and written_at == self._boot_id:
            return  # only the process stopped: the page cache kept every commit
        logger.warning(
            "the machine stopped while the state in %s was not fsynced (boot %s, now %s): "
            "discarding it; it is rebuilt from the snapshot and the Raft journal",
            self._state_dir,
            written_at or "unknown",
            self._boot_id or "unknown",
        )
        shutil.rmtree(self._state_dir)
        fsync_directory(self._data_dir)

    def _recover_interrupted_swap(self) -> None:
        """Finish or undo a snapshot install that a crash interrupted (see `install_snapshot`)."""
        incoming = self._data_dir / "state.incoming"
        retired = self._data_dir / "state.retired"
        if not self._state_dir.exists() and incoming.exists():
            incoming.rename(self._state_dir)
            fsync_directory(self._data_dir)
        for leftover in (incoming, retired):
            if leftover.exists():
                shutil.rmtree(leftover)

    # -- state -------------------------------------------------------------------------------

    @property
    def applied_index(self) -> int:
        """Index of the last Raft entry whose effects are stored (0 when none)."""
        return self._applied_index

    def apply(self, raft_index: int, change: Callable[[LmdbStore], T]) -> T | None:
        """Run `change` and record `raft_index` as applied, in one write transaction.

        Returns None without running `change` when the entry is already applied (journal replay
        after a restart). If `change` raises, nothing it wrote is kept and the index does not
        move; the exception propagates. Called only from the replication thread.
        """
        if raft_index <= self._applied_index:
            return None
        try:
            with self._lock.shared():
                with self._env.begin(write=True) as txn:
                    result = change(LmdbStore(txn, self._state_db))
                    txn.put(_APPLIED_INDEX_KEY, struct.pack(">Q", raft_index), db=self._meta_db)
                self._map_release.release()
        except lmdb.Error as error:
            # Disk full, I/O error, map full: local trouble, not a verdict on the entry.
            raise StorageError(f"cannot apply entry {raft_index}: {error}") from error
        self._applied_index = raft_index
        return result

    def read(self, query: Callable[[LmdbStore], T]) -> T:
        """Run `query` on a consistent read-only view. Any thread."""
        with self._lock.shared(), self._env.begin(write=False) as txn:
            return query(LmdbStore(txn, self._state_db))

    def dump_state(self) -> list[tuple[bytes, bytes]]:
        """Every key and value, sorted: for tests that compare replicas."""
        with self._lock.shared(), self._env.begin(write=False) as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self._state_db)]

    # -- snapshots ---------------------------------------------------------------------------

    def write_snapshot(self, path: str, raft_data: bytes) -> None:
        """Write a self-contained snapshot of the applied state plus `raft_data` to `path`,
        fsynced, on this thread (see `snapshot_writer`)."""
        self.snapshot_writer(raft_data).write(path)

    def snapshot_writer(self, raft_data: bytes) -> SnapshotWriter:
        """Fix a snapshot's contents now: the applied state as of this moment (a read
        transaction, so the copy matches `applied_index` exactly) and `raft_data`. Call it from
        the replication thread; the writer's `write` may run on any thread while entries go
        on applying. Until it has run, `install_snapshot` and `close` wait for it."""
        self._lock.acquire_shared()
        try:
            transaction = self._env.begin(write=False)
        except lmdb.Error as error:
            self._lock.release_shared()
            raise StorageError(f"cannot read the state for a snapshot: {error}") from error
        except BaseException:
            self._lock.release_shared()
            raise
        return SnapshotWriter(self, transaction, self._applied_index, raft_data)

    def _copy_state(self, transaction: lmdb.Transaction, out: BinaryIO) -> None:
        """Append a compact copy of `transaction`'s view to `out` (under the shared hold that
        `snapshot_writer` took)."""
        try:
            self._env.copyfd(out.fileno(), compact=True, txn=transaction)
        except lmdb.Error as error:
            raise StorageError(f"cannot copy the state into a snapshot: {error}") from error
        self._map_release.release(now=True)  # the copy read every page through the map

    def install_snapshot(self, path: str, verified: VerifiedSnapshot | None = None) -> bytes:
        """Verify the snapshot at `path`, make its state ours, and return its raft data.
        `verified`: what `read_snapshot_header` returned for this very file, when the caller
        has just checked it (hashing a large snapshot twice costs seconds on the tick thread).

        The local state is kept when it is already at or past the snapshot's index (a restart
        loading our own older snapshot): applied entries are committed, so it is the same
        history, further along. Raises `SnapshotCorrupt` when the file fails verification;
        nothing local is touched then. Runs on the replication thread.
        """
        header, raft_data, copy_offset, copy_bytes = verified or read_snapshot_header(path)
        # A snapshot received from the leader was written and renamed by pysyncobj without
        # fsync; the Raft log is cleared after this returns, so make the file durable first.
        with open(path, "rb") as received:
            os.fsync(received.fileno())
        fsync_directory(Path(path).parent)
        if header["applied_index"] <= self._applied_index:
            return raft_data
        incoming = self._data_dir / "state.incoming"
        retired = self._data_dir / "state.retired"
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.mkdir()
        with open(path, "rb") as source, open(incoming / "data.mdb", "wb") as target:
            source.seek(copy_offset)
            remaining = copy_bytes
            while remaining:
                chunk = source.read(min(limits.SNAPSHOT_COPY_CHUNK_BYTES, remaining))
                if not chunk:
                    raise SnapshotCorrupt(path, "state copy ends early")
                target.write(chunk)
                remaining -= len(chunk)
            target.flush()
            os.fsync(target.fileno())
        fsync_directory(incoming)
        with self._lock.exclusive():
            self._map_release.forget()
            self._env.close()
            self._state_dir.rename(retired)
            incoming.rename(self._state_dir)
            fsync_directory(self._data_dir)
            shutil.rmtree(retired)
            self._open()
        logger.info("installed a snapshot at applied index %d", self._applied_index)
        return raft_data


class SnapshotWriter:
    """One snapshot whose contents are fixed (see `Storage.snapshot_writer`): `write` it once,
    or `discard` it. Until then it holds a read transaction (LMDB keeps the pages it sees)."""

    def __init__(
        self,
        storage: Storage,
        transaction: lmdb.Transaction,
        applied_index: int,
        raft_data: bytes,
    ) -> None:
        self.applied_index = applied_index
        self._storage = storage
        self._transaction: lmdb.Transaction | None = transaction
        self._raft_data = raft_data

    def write(self, path: str) -> None:
        """Write the snapshot to `path` and fsync it (not its directory)."""
        transaction = self._transaction
        assert transaction is not None, "a snapshot is written once"
        header = json.dumps(
            {
                "format_version": SNAPSHOT_FORMAT_VERSION,
                "applied_index": self.applied_index,
                "raft_data_bytes": len(self._raft_data),
            },
            sort_keys=True,
        ).encode()
        try:
            with open(path, "wb") as out:
                out.write(SNAPSHOT_MAGIC + struct.pack(">I", len(header)) + header)
                out.write(self._raft_data)
                out.flush()
                copy_start = out.tell()
                self._storage._copy_state(transaction, out)
                self.discard()  # the copy is taken: let LMDB reuse the pages it pinned
                out.seek(0, os.SEEK_END)
                out.write(struct.pack(">Q", out.tell() - copy_start))
                out.flush()
        finally:
            self.discard()
        digest = _sha256_of_file(path, os.path.getsize(path))
        with open(path, "ab") as out:
            out.write(digest)
            out.flush()
            os.fsync(out.fileno())

    def discard(self) -> None:
        """End the read transaction and the hold on the storage (once; later calls do
        nothing)."""
        transaction, self._transaction = self._transaction, None
        if transaction is not None:
            transaction.abort()
            self._storage._lock.release_shared()


# (header, raft data, state offset, state length) of a snapshot file that passed verification.
VerifiedSnapshot = tuple[dict[str, Any], bytes, int, int]


def read_snapshot_header(path: str) -> VerifiedSnapshot:
    """Verify a snapshot file and return (header, raft data, state offset, state length).

    Raises `SnapshotCorrupt` for a wrong magic, version, length or checksum.
    """
    try:
        size = os.path.getsize(path)
        trailer_bytes = 8 + 32
        if size < len(SNAPSHOT_MAGIC) + 4 + trailer_bytes:
            raise SnapshotCorrupt(path, f"only {size} bytes")
        with open(path, "rb") as source:
            if source.read(len(SNAPSHOT_MAGIC)) != SNAPSHOT_MAGIC:
                raise SnapshotCorrupt(path, "not a Chasqui snapshot (bad magic)")
            (header_bytes,) = struct.unpack(">I", source.read(4))
            if header_bytes > size:
                raise SnapshotCorrupt(path, f"header length {header_bytes} exceeds file size")
            header = json.loads(source.read(header_bytes))
            if header.get("format_version") != SNAPSHOT_FORMAT_VERSION:
                raise SnapshotCorrupt(path, f"format version {header.get('format_version')}")
            raft_data = source.read(int(header["raft_data_bytes"]))
            copy_offset = source.tell()
            source.seek(size - trailer_bytes)
            (copy_bytes,) = struct.unpack(">Q", source.read(8))
            stored_digest = source.read(32)
        if copy_offset + copy_bytes != size - trailer_bytes:
            raise SnapshotCorrupt(path, "section lengths do not add up to the file size")
        if _sha256_of_file(path, size - 32) != stored_digest:
            raise SnapshotCorrupt(path, "checksum mismatch")
        return header, raft_data, copy_offset, copy_bytes
    except (OSError, ValueError, KeyError, struct.error) as error:
        raise SnapshotCorrupt(path, str(error)) from error


def _sha256_of_file(path: str, length: int) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        remaining = length
        while remaining:
            chunk = source.read(min(limits.SNAPSHOT_COPY_CHUNK_BYTES, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.digest()
