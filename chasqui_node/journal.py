"""The Raft journal: an append-only, checksummed, fsynced log of entries, plus term and vote.

pysyncobj's own journal writes into an mmap and never fsyncs, so a power cut of a majority can
lose confirmed writes (ARCHITECTURE section 3). This one makes every entry durable before the
node acknowledges it: `append` only writes, and `sync` makes everything written so far durable
with one fsync (group commit). The replication adapter calls `sync` before any Raft message
leaves the node, so a follower's "I have it" and a leader's replication of its own entry always
follow the fsync.

Layout of `DIR/`:

    segment-<first index, 20 digits>.log   records, in index order, across segments
    meta.json                              current term, vote, first live index (atomic replace)

A record is `u32 length | u32 crc32 | u64 index | u64 term | command`, where `length` counts
the index, term and command, and the CRC covers them. On open, every segment is read back and
checked: a record cut short at the very end of the last segment (a crash in mid-append) is cut
off; anything else that fails its check (a bad CRC with valid data after it, a gap in the
indexes) raises `JournalCorrupt`, and the node must stop rather than serve or vote with it.

Memory stays bounded: only each record's location is kept in RAM, entries are read back from
the file on demand, with a small cache of the newest ones (the ones Raft reads most), bounded
in count and in bytes.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chasqui_node import limits

logger = logging.getLogger(__name__)

_HEADER = struct.Struct(">IIQQ")  # length, crc32, index, term
_CRC_PART = struct.Struct(">QQ")

Entry = tuple[bytes, int, int]  # (command, index, term), the shape pysyncobj uses


SYNC_TRACE_ENV = "CHASQUI_SYNC_TRACE"  # test hook: file that records each synced segment length


def _trace_synced(path: Callable[[], Path], size: int) -> None:
    """For the power-loss test only: record that `path()` is durable up to `size` bytes, so the
    test can discard exactly what was never fsynced after killing every node. (`path` is only
    built when tracing: this runs on every group commit.)"""
    trace = os.environ.get(SYNC_TRACE_ENV)
    if trace:
        with open(trace, "a") as out:
            out.write(f"{path().name} {size}\n")


def _valid_record_after(data: bytes, start: int, expected: int) -> bool:
    """Whether a whole, checksummed record for index `expected` or `expected + 1` begins in
    `data` from `start` on (the bad record's own index, or the one after it).

    Only looks where the bytes spell one of those indexes, so the scan is a few `find` calls.
    """
    for wanted in (expected, expected + 1):
        for position in _find_all(data, struct.pack(">Q", wanted), start + 8):
            header_at = position - 8
            if header_at + _HEADER.size > len(data):
                continue
            length, crc, _index, _term = _HEADER.unpack_from(data, header_at)
            end = header_at + 8 + length
            fits = _CRC_PART.size <= length <= limits.JOURNAL_RECORD_BYTES_MAX and end <= len(data)
            if fits and zlib.crc32(data[header_at + 8 : end]) == crc:
                return True
    return False


def _find_all(data: bytes, needle: bytes, start: int) -> Iterator[int]:
    position = data.find(needle, start)
    while position != -1:
        yield position
        position = data.find(needle, position + 1)


class JournalCorrupt(Exception):
    """The journal fails its checks somewhere other than a torn tail: stop the node."""


@dataclass(frozen=True)
class _Location:
    segment: int  # first index of the segment file
    offset: int  # where the record starts
    length: int  # whole record, header included
    index: int
    term: int


def fsync_directory(path: Path) -> None:
    """Make renames, creations and deletions inside `path` durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Journal:
    """Positions are 0-based within the live log; each entry also carries its Raft index,
    consecutive from `first_index`. Not thread-safe: pysyncobj's tick thread owns it.

    `on_sync`, when set (at construction or later, as the attribute), is called with the
    seconds each group-commit fsync took, on the thread that synced, right after it. It is for
    timing only (the node's fsync latency histogram), so it must be quick and must not raise:
    an exception there would count as a failed journal write and stop the node.
    """

    def __init__(
        self,
        directory: Path,
        *,
        fsync: bool = True,
        on_sync: Callable[[float], None] | None = None,
    ) -> None:
        self._directory = Path(directory)
        self._fsync = fsync
        self.on_sync = on_sync
        self._directory.mkdir(parents=True, exist_ok=True)
        self._meta_path = self._directory / "meta.json"
        self._meta: dict[str, Any] = self._read_meta()
        self._locations: list[_Location] = []
        self._cache: OrderedDict[int, bytes] = OrderedDict()  # raft index -> command
        self._cache_bytes = 0
        self._segments: list[int] = []  # first index of each segment file, ascending
        self._tail_file: int | None = None  # descriptor of the last segment, for appends
        self._tail_size = 0
        self._dirty = False  # written since the last sync
        self._read_files: dict[int, int] = {}  # segment -> read descriptor
        self._load()

    # -- metadata (term, vote, first live index) ---------------------------------------------

    def _read_meta(self) -> dict[str, Any]:
        if not self._meta_path.exists():
            return {}
        try:
            text = self._meta_path.read_text()
            record = json.loads(text)
            body = json.dumps(record["meta"], sort_keys=True)
            if zlib.crc32(body.encode()) != record["crc32"]:
                raise ValueError("checksum mismatch")
            meta: dict[str, Any] = record["meta"]
            return meta
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise JournalCorrupt(f"{self._meta_path} is unreadable: {error}") from error

    def _write_meta(self) -> None:
        body = json.dumps(self._meta, sort_keys=True)
        temporary = self._meta_path.with_suffix(".tmp")
        with open(temporary, "w") as out:
            out.write(json.dumps({"meta": self._meta, "crc32": zlib.crc32(body.encode())}))
            out.flush()
            if self._fsync:
                os.fsync(out.fileno())
        os.replace(temporary, self._meta_path)
        if self._fsync:
            fsync_directory(self._directory)

    @property
    def term(self) -> int:
        return int(self._meta.get("term", 0))

    @property
    def voted_for(self) -> str | None:
        vote = self._meta.get("voted_for")
        return None if vote is None else str(vote)

    def set_term(self, term: int, voted_for: str | None) -> None:
        """Durable before returning: Raft must never vote twice in a term after a restart."""
        self._meta["term"] = term
        self._meta["voted_for"] = voted_for
        self._write_meta()

    # -- opening -----------------------------------------------------------------------------

    def _segment_path(self, first_index: int) -> Path:
        return self._directory / f"segment-{first_index:020d}.log"

    def _load(self) -> None:
        self._segments = sorted(
            int(path.name[len("segment-") : -len(".log")])
            for path in self._directory.glob("segment-*.log")
        )
        first_live = int(self._meta.get("first_index", 0))
        expected: int | None = None
        for number, segment in enumerate(self._segments):
            last_segment = number == len(self._segments) - 1
            expected = self._scan_segment(segment, last_segment, expected, first_live)
        if self._segments:
            self._open_tail(self._segments[-1])

    def _scan_segment(
        self, segment: int, last_segment: bool, expected: int | None, first_live: int
    ) -> int | None:
        path = self._segment_path(segment)
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            problem = None
            if offset + _HEADER.size > len(data):
                problem = "a record header is cut short"
            else:
                length, crc, index, term = _HEADER.unpack_from(data, offset)
                end = offset + 8 + length
                if length < _CRC_PART.size or length > limits.JOURNAL_RECORD_BYTES_MAX:
                    problem = f"record length {length} is impossible"
                elif end > len(data):
                    problem = "a record is cut short"
                elif zlib.crc32(data[offset + 8 : end]) != crc:
                    problem = "a record fails its CRC"
                elif expected is not None and index != expected:
                    raise JournalCorrupt(
                        f"{path}: record at offset {offset} has index {index}, expected {expected}"
                    )
            if problem is not None:
                # A crash in mid-append leaves garbage only at the end: nothing valid follows.
                # A valid record after the bad one means the damage hit synced data.
                # The first record of a segment carries the index the file is named after.
                hint = expected if expected is not None else segment
                torn = not _valid_record_after(data, offset + 1, hint)
                if torn and last_segment:
                    logger.warning(
                        "journal %s: %s at offset %d (crash during a write); cutting the tail "
                        "back to the last valid record",
                        path,
                        problem,
                        offset,
                    )
                    with open(path, "r+b") as segment_file:
                        segment_file.truncate(offset)
                        segment_file.flush()
                        os.fsync(segment_file.fileno())
                    return expected
                raise JournalCorrupt(f"{path}: {problem} at offset {offset}; refusing to use it")
            if index >= first_live:
                self._locations.append(_Location(segment, offset, end - offset, index, term))
            expected = index + 1
            offset = end
        return expected

    def _open_tail(self, segment: int) -> None:
        if self._tail_file is not None:
            os.close(self._tail_file)
        path = self._segment_path(segment)
        self._tail_file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._tail_size = os.fstat(self._tail_file).st_size

    # -- reading -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._locations)

    def index_at(self, position: int) -> int:
        """The Raft index at `position`, which may be one past the end."""
        return self._locations[0].index + position

    def entry(self, position: int) -> Entry:
        """The entry at `position` (negative counts from the end), read from disk if needed."""
        if position < 0:
            position += len(self._locations)
        if not 0 <= position < len(self._locations):
            raise IndexError(f"journal position {position} of {len(self._locations)}")
        location = self._locations[position]
        command = self._cache.get(location.index)
        if command is None:
            raw = self._read(location)
            if zlib.crc32(raw[8:]) != _HEADER.unpack_from(raw)[1]:
                raise JournalCorrupt(f"entry {location.index} fails its CRC when read back")
            command = raw[_HEADER.size :]
            self._remember(location.index, command)
        return command, location.index, location.term

    def entries(self, start: int, stop: int) -> Iterator[Entry]:
        for position in range(start, stop):
            yield self.entry(position)

    def _read(self, location: _Location) -> bytes:
        descriptor = self._read_files.get(location.segment)
        if descriptor is None:
            descriptor = os.open(self._segment_path(location.segment), os.O_RDONLY)
            self._read_files[location.segment] = descriptor
        raw = os.pread(descriptor, location.length, location.offset)
        if len(raw) != location.length:
            raise JournalCorrupt(f"segment {location.segment} is shorter than its index says")
        return raw

    def _remember(self, index: int, command: bytes) -> None:
        self._forget(index)
        self._cache[index] = command
        self._cache_bytes += len(command)
        while len(self._cache) > limits.JOURNAL_CACHE_ENTRIES_MAX or (
            self._cache_bytes > limits.JOURNAL_CACHE_BYTES_MAX and len(self._cache) > 1
        ):
            _oldest, dropped = self._cache.popitem(last=False)
            self._cache_bytes -= len(dropped)

    def _forget(self, index: int) -> None:
        dropped = self._cache.pop(index, None)
        if dropped is not None:
            self._cache_bytes -= len(dropped)

    # -- writing -----------------------------------------------------------------------------

    def append(self, command: bytes, index: int, term: int) -> None:
        """Write one entry after the last; durable only after the next `sync`."""
        if self._locations:
            expected = self.index_at(len(self._locations))
            if index != expected:
                raise ValueError(f"append of index {index}, expected {expected}")
        if self._tail_file is None or self._tail_size >= limits.JOURNAL_SEGMENT_BYTES_MAX:
            self._start_segment(index)
        assert self._tail_file is not None
        body = _CRC_PART.pack(index, term) + command
        record = struct.pack(">II", len(body), zlib.crc32(body)) + body
        os.write(self._tail_file, record)
        self._locations.append(
            _Location(self._segments[-1], self._tail_size, len(record), index, term)
        )
        self._tail_size += len(record)
        self._remember(index, command)
        self._dirty = True

    def _start_segment(self, first_index: int) -> None:
        self.sync()
        self._segments.append(first_index)
        self._open_tail(first_index)
        if self._fsync:
            fsync_directory(self._directory)

    def sync(self) -> None:
        """Make every append so far durable with one fsync (group commit)."""
        if not self._dirty:
            return
        if self._fsync and self._tail_file is not None:
            started = time.perf_counter()
            os.fdatasync(self._tail_file)
            if self.on_sync is not None:
                self.on_sync(time.perf_counter() - started)
            _trace_synced(lambda: self._segment_path(self._segments[-1]), self._tail_size)
        self._dirty = False

    def truncate_from(self, position: int) -> None:
        """Drop the entries at `position` and after (a new leader's log overrides them)."""
        if position >= len(self._locations):
            return
        cut = self._locations[position]
        del self._locations[position:]
        for index in [index for index in self._cache if index >= cut.index]:
            self._forget(index)
        for segment in [s for s in self._segments if s > cut.segment]:
            self._delete_segment(segment)
        self._open_tail(cut.segment)
        os.ftruncate(self._tail_file, cut.offset)  # type: ignore[arg-type]
        self._tail_size = cut.offset
        if self._fsync:
            os.fsync(self._tail_file)  # type: ignore[arg-type]
            fsync_directory(self._directory)
            _trace_synced(lambda: self._segment_path(cut.segment), cut.offset)
        self._dirty = False

    def drop_before(self, position: int) -> None:
        """Forget entries before `position` (they are in a durable snapshot now).

        The new first index goes to the metadata first; whole segments below it are deleted
        after, so a crash in between leaves extra entries, never a gap.
        """
        if position <= 0:
            return
        if position >= len(self._locations):
            self.clear()
            return
        new_first = self.index_at(position)
        self._meta["first_index"] = new_first
        self._write_meta()
        keep_from = self._locations[position].segment
        del self._locations[:position]
        for segment in [s for s in self._segments if s < keep_from]:
            self._delete_segment(segment)
        if self._fsync:
            fsync_directory(self._directory)

    def clear(self) -> None:
        """Forget every entry (a snapshot from the leader replaces the whole log)."""
        for segment in list(self._segments):
            self._delete_segment(segment)
        self._locations.clear()
        self._cache.clear()
        self._cache_bytes = 0
        self._meta["first_index"] = 0
        self._write_meta()
        if self._fsync:
            fsync_directory(self._directory)

    def _delete_segment(self, segment: int) -> None:
        descriptor = self._read_files.pop(segment, None)
        if descriptor is not None:
            os.close(descriptor)
        if self._tail_file is not None and self._segments and segment == self._segments[-1]:
            os.close(self._tail_file)
            self._tail_file = None
            self._tail_size = 0
        self._segments.remove(segment)
        self._segment_path(segment).unlink(missing_ok=True)

    def close(self) -> None:
        self.sync()
        for descriptor in self._read_files.values():
            os.close(descriptor)
        self._read_files.clear()
        if self._tail_file is not None:
            os.close(self._tail_file)
            self._tail_file = None
