"""`Store.floor` (the dedup runs' lookup) answers alike over LMDB and over the test store:
the greatest key at or below the one asked, only within the prefix, including at both ends
of the database and between other prefixes' keys."""

from __future__ import annotations

import itertools
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chasqui_node.state import MemoryStore
from chasqui_node.storage import LmdbStore, Storage

KEYS = st.lists(st.binary(min_size=1, max_size=4), max_size=30, unique=True)
EXAMPLES = itertools.count()  # one fresh database per example (tmp_path is per test)
PROBES = st.lists(st.tuples(st.binary(max_size=2), st.binary(max_size=5)), max_size=20)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(KEYS, PROBES)
def test_lmdb_floor_matches_the_test_store(
    tmp_path: Path, keys: list[bytes], probes: list[tuple[bytes, bytes]]
) -> None:
    memory = MemoryStore()
    for key in keys:
        memory.put(key, b"v" + key)
    expected = [memory.floor(prefix, probe) for prefix, probe in probes]
    for (prefix, probe), found in zip(probes, expected, strict=True):
        if found is not None:
            assert found[0] <= probe and found[0].startswith(prefix)
    storage = Storage(tmp_path / f"state-{next(EXAMPLES)}", fsync=False)
    try:

        def check(store: LmdbStore) -> list[tuple[bytes, bytes] | None]:
            for key in keys:
                store.put(key, b"v" + key)
            return [store.floor(prefix, probe) for prefix, probe in probes]

        assert storage.apply(1, check) == expected
    finally:
        storage.close()
