"""Storage drops its mapping of LMDB's pages so that a large state does not stay resident in the
node (see `_MapRelease` in chasqui_node/storage.py), without changing what reads return.

Resident pages are read from this process's /proc/self/smaps: Linux only, like the release.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from chasqui_node import limits
from chasqui_node.storage import LmdbStore, Storage

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux madvise")

VALUE_BYTES = 1024
KEYS_PER_ENTRY = 500
ENTRIES = 80  # 40,000 values, ~60 MB of data.mdb


def mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path`."""
    target, resident, inside = str(path.resolve()), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            inside = len(fields) == 6 and fields[5] == target
        elif inside and fields[0] == "Rss:":
            resident += int(fields[1])
    return resident


def value_of(key: int) -> bytes:
    return key.to_bytes(4, "big") * (VALUE_BYTES // 4)


def fill(storage: Storage, start_index: int = 1) -> None:
    for entry in range(ENTRIES):

        def write(store: LmdbStore, entry: int = entry) -> None:
            for key in range(entry * KEYS_PER_ENTRY, (entry + 1) * KEYS_PER_ENTRY):
                store.put(b"m%08d" % key, value_of(key))

        storage.apply(start_index + entry, write)


def read_all(store: LmdbStore) -> int:
    count = 0
    for key, value in store.scan(b"m", limit=ENTRIES * KEYS_PER_ENTRY):
        assert value == value_of(int(key[1:])), key
        count += 1
    return count


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    opened = Storage(tmp_path, fsync=False)
    yield opened
    opened.close()


def test_reads_leave_the_map_resident_until_the_next_commit_releases_it(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_file = tmp_path / "state" / "data.mdb"
    fill(storage)
    file_kib = os.path.getsize(data_file) // 1024
    assert storage.read(read_all) == ENTRIES * KEYS_PER_ENTRY
    # Reading every value maps (nearly) the whole file: the release below is not vacuous.
    assert mapped_kib(data_file) > file_kib // 2

    monkeypatch.setattr(limits, "STORAGE_MAP_RELEASE_INTERVAL_S", 0.0)
    storage.apply(ENTRIES + 1, lambda store: store.put(b"n", b"after"))
    assert mapped_kib(data_file) < file_kib // 10
    # Nothing was lost: the pages come back from the page cache.
    assert storage.read(read_all) == ENTRIES * KEYS_PER_ENTRY
    assert storage.read(lambda store: store.get(b"n")) == b"after"


def test_a_large_fill_does_not_stay_mapped(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "STORAGE_MAP_RELEASE_INTERVAL_S", 0.0)
    data_file = tmp_path / "state" / "data.mdb"
    fill(storage)
    # Without the release, fault-around keeps most of a freshly written file mapped.
    assert mapped_kib(data_file) < os.path.getsize(data_file) // 1024 // 10


def test_readers_in_other_threads_see_every_value_while_the_map_is_released(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(storage)
    monkeypatch.setattr(limits, "STORAGE_MAP_RELEASE_INTERVAL_S", 0.0)
    failures: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        try:
            while not done.is_set():
                assert storage.read(read_all) == ENTRIES * KEYS_PER_ENTRY
        except BaseException as error:  # reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for index in range(ENTRIES + 1, ENTRIES + 201):
            storage.apply(index, partial(LmdbStore.put, key=b"n%d" % index, value=b"v"))
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not failures, failures[0]
    assert not any(thread.is_alive() for thread in threads)


def test_a_snapshot_install_releases_only_the_new_map(tmp_path: Path) -> None:
    source = Storage(tmp_path / "source", fsync=False)
    target = Storage(tmp_path / "target", fsync=False)
    try:
        fill(source)
        snapshot = str(tmp_path / "snapshot")
        source.write_snapshot(snapshot, b"raft")
        # The copy read every page through the map, and was released right after.
        source_file = tmp_path / "source" / "state" / "data.mdb"
        assert mapped_kib(source_file) < os.path.getsize(source_file) // 1024 // 10
        assert target.install_snapshot(snapshot) == b"raft"
        target._map_release.release(now=True)  # the old map is gone: only the new one is touched
        assert target.read(read_all) == ENTRIES * KEYS_PER_ENTRY
    finally:
        source.close()
        target.close()
