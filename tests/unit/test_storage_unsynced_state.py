"""The applied state is committed without fsync and discarded when a machine crash may have
torn it (see chasqui_node/storage.py).

A process crash is real here: a child process applies entries and exits without closing, the
way `kill -9` leaves a node. A machine crash is a restart under another boot id
(CHASQUI_BOOT_ID, the hook the power-loss fault test uses), with the state file damaged the way
unsynced pages could leave it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from chasqui_node.storage import BOOT_ID_ENV, UNSYNCED_MARKER, Storage

CHILD = """
import os, sys
from chasqui_node.storage import Storage
storage = Storage(sys.argv[1])
for index in range(1, 4):
    storage.apply(index, lambda store, i=index: store.put(b"k%d" % i, b"v"))
os._exit(0)  # no close: the process dies with the state unsynced
"""


def crash_after_applying_three(data_dir: Path, boot_id: str) -> None:
    environment = {**os.environ, BOOT_ID_ENV: boot_id}
    subprocess.run(
        [sys.executable, "-c", CHILD, str(data_dir)], env=environment, check=True, timeout=60
    )
    assert (data_dir / "state" / UNSYNCED_MARKER).read_text() == boot_id


@contextmanager
def opened_at_boot(
    data_dir: Path, boot_id: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Storage]:
    """The node's storage opened as it would be in boot `boot_id`, closed cleanly after."""
    monkeypatch.setenv(BOOT_ID_ENV, boot_id)
    storage = Storage(data_dir)
    try:
        yield storage
    finally:
        storage.close()


def test_a_process_crash_keeps_the_unsynced_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash_after_applying_three(tmp_path, "boot-1")
    with opened_at_boot(tmp_path, "boot-1", monkeypatch) as storage:
        assert storage.applied_index == 3
        assert storage.read(lambda store: store.get(b"k3")) == b"v"


def test_a_machine_crash_discards_the_state_even_when_torn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash_after_applying_three(tmp_path, "boot-1")
    with open(tmp_path / "state" / "data.mdb", "r+b") as data:
        data.write(os.urandom(8192))  # both meta pages torn: LMDB alone would refuse the file
    with opened_at_boot(tmp_path, "boot-2", monkeypatch) as storage:
        assert storage.applied_index == 0
        assert storage.dump_state() == []
        assert (tmp_path / "state" / UNSYNCED_MARKER).read_text() == "boot-2"


def test_a_clean_close_survives_a_reboot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with opened_at_boot(tmp_path, "boot-1", monkeypatch) as storage:
        storage.apply(1, lambda store: store.put(b"k", b"v"))
    assert not (tmp_path / "state" / UNSYNCED_MARKER).exists()
    with opened_at_boot(tmp_path, "boot-2", monkeypatch) as reopened:
        assert reopened.applied_index == 1
        assert reopened.read(lambda store: store.get(b"k")) == b"v"


def test_an_unreadable_marker_counts_as_another_boot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash_after_applying_three(tmp_path, "boot-1")
    (tmp_path / "state" / UNSYNCED_MARKER).write_text("")  # torn while being written
    with opened_at_boot(tmp_path, "boot-1", monkeypatch) as storage:
        assert storage.applied_index == 0
