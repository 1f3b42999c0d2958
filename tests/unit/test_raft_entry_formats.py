"""The two entry formats through a real one-node Replicator (pysyncobj, journal, LMDB): the
leader logs packed entries through `apply_packed` and falls back to text through `apply_entry`
only for what the packed form cannot hold; both apply alike. The method numbers pysyncobj
writes into every journal are pinned, and pysyncobj pickles bytes verbatim once the Raft
layer is installed (`raft.install()`, as a node does at start-up)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pysyncobj.pickle
import pytest
from pysyncobj.syncobj import _COMMAND_TYPE

from chasqui_node import raft
from chasqui_node.commands import (
    CreateQueue,
    CreateUser,
    Kind,
    PublishBatch,
    Receipts,
)
from chasqui_node.entries import (
    decode_entry,
)
from chasqui_node.errors import InvalidArgument
from chasqui_node.replication import Member, Replicator
from chasqui_node.state import StateMachine
from chasqui_node.storage import Storage
from tests.harness import free_port_block

KEY_HASH = "k" * 64
REGULAR = _COMMAND_TYPE.REGULAR


@pytest.fixture
def replicator(tmp_path: Path) -> Iterator[Replicator]:
    raft.install()
    port = free_port_block(2)
    member = Member("n1", f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}")
    storage = Storage(tmp_path / "state", fsync=False)
    node = Replicator(
        "n1", [member], tmp_path, storage, StateMachine(), cluster_secret="test", fsync=False
    )
    try:
        deadline = time.monotonic() + 30
        while not node.is_leader():
            assert time.monotonic() < deadline, "a one-node cluster never elected itself"
            time.sleep(0.02)
        yield node
    finally:
        node.close()
        storage.close()


def test_journals_name_the_methods_by_fixed_numbers(replicator: Replicator) -> None:
    assert replicator._raft._node._methodToID == {"apply_entry_v0": 0, "apply_packed_v0": 1}


def test_pysyncobj_pickles_bytes_verbatim() -> None:
    raft.install()
    body = os.urandom(1000)
    assert len(pysyncobj.pickle.dumps((1, (body,)))) < 1100  # protocol 2: about 1500
    assert pysyncobj.pickle.loads(pysyncobj.pickle.dumps((1, (body,)))) == (1, (body,))


def test_packed_and_text_entries_are_logged_and_applied(replicator: Replicator) -> None:
    bodies = tuple(os.urandom(200) for _ in range(50))
    replicator.propose_many([CreateUser(KEY_HASH)], 10)
    replicator.propose_many([CreateQueue(KEY_HASH, "jobs")], 10)
    batch = PublishBatch(KEY_HASH, Kind.QUEUE, "jobs", "p", bodies, tuple(range(50)), (0,) * 50)
    [receipts] = replicator.propose_many([batch], 10)
    assert isinstance(receipts, Receipts)
    assert [receipt.sequence for receipt in receipts.receipts] == list(range(50))
    # A sequence beyond int64 does not fit the packed form: logged as text, refused alike.
    huge = PublishBatch(KEY_HASH, Kind.QUEUE, "jobs", "p", (b"x",), (2**64 - 1,), (0,))
    [refused] = replicator.propose_many([huge], 10)
    assert isinstance(refused, InvalidArgument)

    logged = []
    raft_log = replicator._raft._log
    for position in range(len(raft_log)):
        command = raft_log[position][0]  # a type byte, then the pickled call
        if command[:1] == bytes([REGULAR]):  # not a no-op or membership change
            method, (data,) = pysyncobj.pickle.loads(command[1:])
            logged.append((method, type(data), decode_entry(data).commands))
    assert logged[-2:] == [(1, bytes, (batch,)), (0, str, (huge,))]
    assert all(method == 1 for method, _, _ in logged[:-1])
