"""The one door to pysyncobj: everything that touches pysyncobj, and every departure from it.

Nothing here changes pysyncobj when imported. The node calls `install()` at start-up, before
it builds a Raft node (server.py's `NodeServer`; tests that build a replicator call it too):
it checks that the installed pysyncobj is exactly `PYSYNCOBJ_VERSION`, the release every
override below was written against, and that each overridden name-mangled method exists, then
makes the module-level changes of patches.py. Idempotent: later calls check again and change
nothing. `RaftGroup` refuses to be built before it. The replicator (replication.py) sees only
the names in `__all__`.

Modules: group.py (`RaftGroup`: what the replicator calls, pysyncobj's configuration),
node.py (`_RaftNode`, pysyncobj's `SyncObj` and its overrides), log.py (the durable Raft
log), snapshots.py, transport.py (the Raft port), cipher.py (AES-GCM), patches.py.

Departures from pysyncobj 0.3.17, each with the Raft rule it restores or the trap it avoids,
where it lives, and the test that pins it:

Safety (Raft's rules; the fault suite lost confirmed messages without each of the first four)
1. A follower deletes log entries only from the first one that conflicts with the leader's
   (Raft section 5.3); pysyncobj deleted everything after `prevLogIdx` even when it matched,
   dropping entries it had acknowledged. log.py `DurableRaftLog._settle`.
   tests/unit/test_raft_log_adapter.py.
2. A follower's commit index is min(leaderCommit, index of the message's last new entry)
   (Figure 2, AppendEntries rule 5); pysyncobj used the end of its log, and moved it on every
   snapshot chunk, so a deposed leader applied and confirmed entries no majority held. node.py
   `_SyncObj__onMessageReceived`, `_follower_commit`. tests/unit/test_snapshot_receiver.py
   (`test_the_commit_index_stays_within_what_the_leader_verified`), tests/faults/test_faults.py.
3. A follower installs a leader's snapshot only when it brings something new: its last entry
   neither applied nor held in the log (section 7); pysyncobj wrote any snapshot over its own
   and cleared the log. snapshots.py `SnapshotReceiver`, `SnapshotInstaller.accept`.
   tests/unit/test_snapshot_receiver.py.
4. A follower's reply carries the term it answers, and a leader takes only replies of its own
   term (section 5.1: stale terms are ignored); pysyncobj's replies carried none, so a late one
   could set a match index in a later term. Replies without a term (an older Chasqui) count as
   before. node.py `_SyncObj__sendNextNodeIdx`, `_SyncObj__onMessageReceived`.
   tests/faults/test_faults.py (no unit test of its own).
5. Entries, the term and the vote are on stable storage before any reply leaves the node
   (Figure 2, "persistent state"); pysyncobj's journal is an mmap that is never fsynced (issue
   #84). A leader fsyncs its new entries while followers write theirs and counts itself
   towards a commit only after that (Raft thesis 10.2.1). log.py `DurableRaftLog` (handed to
   pysyncobj by swapping `createJournal` for the constructor only), node.py `__init__`
   (`send_after_sync`, tick callbacks) and `_onTick`. tests/unit/test_raft_log_adapter.py,
   tests/unit/test_journal.py, tests/faults/test_power_loss.py.
6. Snapshots are verified (checksum) before they are loaded, served or voted on; a damaged
   one, or a disk that fails while installing, stops the node. snapshots.py
   `SnapshotInstaller.load`, `verified_snapshot_file`. tests/unit/test_snapshot_receiver.py,
   tests/faults/test_corruption.py.
7. The log is trimmed only after the snapshot covering it is durable, and never to nothing
   (pysyncobj reads its first and last entries everywhere). snapshots.py `BackgroundSnapshot`,
   log.py `deleteEntriesTo`. tests/unit/test_background_snapshot.py,
   tests/unit/test_raft_log_adapter.py (`test_compaction_never_empties_the_log`).

Traps of pysyncobj avoided (ARCHITECTURE section 3)
8. A replicated method that raises wedges the node and a callback that raises applies an
   entry twice: the replicator's apply and callbacks catch everything (replication.py
   `_apply_encoded`, `on_committed`). The entry's Raft index is `raftLastApplied + 1`, and the
   method numbers written into every journal are fixed (`apply_entry` 0, `apply_packed` 1).
   tests/unit/test_raft_entry_formats.py.
9. A snapshot written on the tick thread stops Raft meanwhile (a leader was deposed at every
   compaction): `BackgroundSnapshot` fixes the contents on the tick thread and writes them
   beside it. tests/unit/test_background_snapshot.py.
10. pysyncobj's chunked path for entries of `appendEntriesBatchSizeBytes` or more is broken:
    the batch size is set above the largest entry (limits.RAFT_MESSAGE_BYTES_MAX), and the
    proposer keeps entries near RAFT_ENTRY_BYTES_TARGET. group.py.
    tests/cluster/test_cluster.py (`test_large_messages_and_batches_replicate_whole`).
11. A leader without a majority stays leader for 30 s by default: `leaderFallbackTimeout` is
    1.5 s (`RaftTimings`). tests/cluster/test_cluster.py
    (`test_a_leader_without_its_majority_stops_accepting_writes`).
12. Without a password the Raft port unpickles anything, and an unset bindAddress binds
    0.0.0.0: a cluster secret is required and the listed address is bound (replication.py,
    group.py). tests/cluster/test_security_cluster.py.
13. pysyncobj logs CRITICAL "truncating already-applied log entries" whenever a leader re-sends
    what a follower holds; with (1) nothing is lost, so patches.py filters that alarm and log.py
    logs its own when entries really go. tests/harness.py checks every node's log for it.

The Raft port (transport.py, cipher.py; bounds in limits.py)
14. A frame's length is checked before its body is buffered (a handshake bound before
    authentication, a message bound after); received bytes go into one bytearray read by
    offset; a read event ends once a frame is whole; an unauthenticated connection is dropped
    after RAFT_HANDSHAKE_S_MAX and only so many are held; the listener has a real backlog,
    accepts several per round and survives running out of descriptors. pysyncobj let one
    stranger cost a leader its term and hundreds of MB. tests/unit/test_raft_transport_bounds.py,
    tests/cluster/test_raft_port_abuse.py.
15. A connection is authenticated only by a message carrying the random key this side picked
    (a replayed handshake does not pass), and pysyncobj's `assert`-based checks are real
    checks (gone under python -O otherwise). tests/unit/test_raft_transport_bounds.py.
16. AES-GCM between Chasqui nodes, agreed through pysyncobj's random keys, Fernet to older nodes
    and pysyncobj's admin tool. tests/unit/test_raft_cipher.py, tests/cluster/test_raft_cipher.py.

Speed (no rule changes)
17. Append-entries sent within a tick go as one message per follower, and a send that would
    carry only a newer commit index waits for the next entry or heartbeat. node.py
    `_SyncObj__sendAppendEntries`, `_only_commit_news`. No test of its own; every cluster test
    runs with it.
18. What a socket could not take at once goes out when it is writable, not a heartbeat later.
    transport.py `send_rest_when_writable`. No test of its own.
19. A Raft message is deflated only when it halves (patches.py `AdaptiveZlib`).
    tests/unit/test_raft_transport_zlib.py.
20. pysyncobj pickles with protocol 4, not 2, so bytes travel verbatim (patches.py).
    tests/unit/test_raft_entry_formats.py (`test_pysyncobj_pickles_bytes_verbatim`).
21. Larger socket buffers (limits.RAFT_SOCKET_BUFFER_BYTES), and the leader's cluster time rides
    on every append-entries (node.py `CLUSTER_TIME_KEY`; clock.py).
    tests/faults/test_clock_skew.py.
"""

from __future__ import annotations

import importlib.metadata
import types

import pysyncobj.pickle
import pysyncobj.syncobj
import pysyncobj.tcp_connection
import pysyncobj.tcp_server
import pysyncobj.transport
from pysyncobj import FAIL_REASON

from chasqui_node.raft import node, patches, transport
from chasqui_node.raft.group import (
    OnCommitted,
    PeerLinks,
    RaftGroup,
    RaftStatus,
    RaftTimings,
    Role,
)

__all__ = [
    "FAIL_REASON",
    "PYSYNCOBJ_VERSION",
    "OnCommitted",
    "PeerLinks",
    "PysyncobjMismatch",
    "RaftGroup",
    "RaftStatus",
    "RaftTimings",
    "Role",
    "check_version",
    "install",
    "installed_pysyncobj_version",
]

# The pysyncobj release every override in this package was written against (and setup.cfg
# pins). Another release may rename or reorder what they replace: refuse it rather than guess.
PYSYNCOBJ_VERSION = "0.3.17"

# Module globals patches.py assigns: they must exist, or the assignment would change nothing.
_PATCHED_GLOBALS: dict[types.ModuleType, tuple[str, ...]] = {
    pysyncobj.tcp_connection: ("zlib",),
    pysyncobj.pickle: ("__protocol",),
    pysyncobj.transport: ("TcpConnection", "TcpServer"),
    pysyncobj.tcp_server: ("TcpConnection",),
    pysyncobj.syncobj: ("createJournal",),
}


class PysyncobjMismatch(RuntimeError):
    """The installed pysyncobj is not the one this Raft layer was written against. The node
    must not start: its overrides could silently miss what they were meant to replace."""


def installed_pysyncobj_version() -> str | None:
    """The version of the pysyncobj distribution Python finds first, None if none."""
    try:
        return importlib.metadata.version("pysyncobj")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_version(installed: str | None) -> None:
    """Raise PysyncobjMismatch unless `installed` is exactly PYSYNCOBJ_VERSION."""
    if installed == PYSYNCOBJ_VERSION:
        return
    found = "no pysyncobj is" if installed is None else f"pysyncobj {installed} is"
    raise PysyncobjMismatch(
        f"{found} installed; this node's Raft layer is written against "
        f"pysyncobj {PYSYNCOBJ_VERSION}"
    )


def _check_internals() -> None:
    """Raise PysyncobjMismatch when a method this package overrides, or a global it assigns,
    is missing (a modified pysyncobj under the pinned version number)."""
    overridden = {**transport.OVERRIDDEN, **node.OVERRIDDEN}
    owners: list[tuple[object, str, tuple[str, ...]]] = [
        (owner, owner.__name__, names) for owner, names in overridden.items()
    ]
    owners += [(module, module.__name__, names) for module, names in _PATCHED_GLOBALS.items()]
    for owner, name, names in owners:
        missing = [attribute for attribute in names if not hasattr(owner, attribute)]
        if missing:
            raise PysyncobjMismatch(
                f"pysyncobj's {name} lacks {', '.join(missing)}; this node's Raft layer is "
                f"written against pysyncobj {PYSYNCOBJ_VERSION} as released"
            )


def install() -> None:
    """Check the installed pysyncobj, then change it as patches.py lists. Call it once at
    start-up, before a `RaftGroup` is built; later calls check again and change nothing.
    Thread-safe. Raises PysyncobjMismatch (and changes nothing) against another pysyncobj."""
    check_version(installed_pysyncobj_version())
    _check_internals()
    patches.apply()
