"""The key-value interface the state machine runs on, a dict-backed one for tests, and the two
read helpers every domain shares (counters, paged scans of a metadata prefix)."""

from __future__ import annotations

import bisect
from typing import Protocol

from chasqui_node.state.keys import read_u64

SCAN_PAGE = 1000  # rows per scan when reading a whole prefix


class Store(Protocol):
    """The key-value state the machine reads and writes; one transaction per entry."""

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> bool:
        """Remove `key`; True if it existed."""
        ...

    def scan(
        self, prefix: bytes, start: bytes = b"", limit: int = 1000
    ) -> list[tuple[bytes, bytes]]:
        """Pairs whose key starts with `prefix`, ascending byte order, beginning at
        max(prefix, start); at most `limit`."""
        ...

    def floor(self, prefix: bytes, key: bytes) -> tuple[bytes, bytes] | None:
        """The pair with the greatest key <= `key`, if that key starts with `prefix`."""
        ...


class MemoryStore:
    """A `Store` in a dict plus a sorted key list; for tests and property checks."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        if key not in self._data:
            bisect.insort(self._keys, key)
        self._data[key] = bytes(value)

    def delete(self, key: bytes) -> bool:
        if key not in self._data:
            return False
        del self._data[key]
        del self._keys[bisect.bisect_left(self._keys, key)]
        return True

    def scan(
        self, prefix: bytes, start: bytes = b"", limit: int = 1000
    ) -> list[tuple[bytes, bytes]]:
        index = bisect.bisect_left(self._keys, max(prefix, start))
        pairs: list[tuple[bytes, bytes]] = []
        while index < len(self._keys) and len(pairs) < limit:
            key = self._keys[index]
            if not key.startswith(prefix):
                break
            pairs.append((key, self._data[key]))
            index += 1
        return pairs

    def floor(self, prefix: bytes, key: bytes) -> tuple[bytes, bytes] | None:
        index = bisect.bisect_right(self._keys, key) - 1
        if index < 0 or not self._keys[index].startswith(prefix):
            return None
        found = self._keys[index]
        return found, self._data[found]

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every pair in key order, for comparing replicas."""
        return [(key, self._data[key]) for key in self._keys]

    def copy(self) -> MemoryStore:
        """An independent snapshot (keys and values are immutable bytes)."""
        clone = MemoryStore()
        clone._data = dict(self._data)
        clone._keys = list(self._keys)
        return clone


def get_counter(store: Store, key: bytes) -> int:
    """A stored <u64> counter, 0 when absent."""
    value = store.get(key)
    return 0 if value is None else read_u64(value)


def scan_all(store: Store, prefix: bytes) -> list[tuple[str, bytes]]:
    """All (name, value) under a metadata prefix, paging so no single scan is unbounded; the
    number of names is itself bounded by TOPICS_MAX / QUEUES_MAX."""
    found: list[tuple[str, bytes]] = []
    start = prefix
    while True:
        page = store.scan(prefix, start, limit=SCAN_PAGE)
        for key, value in page:
            found.append((key[len(prefix) :].decode("utf-8", "surrogatepass"), value))
        if len(page) < SCAN_PAGE:
            return found
        start = page[-1][0] + b"\x00"
