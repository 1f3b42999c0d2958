"""`_RaftNode`: pysyncobj's `SyncObj` with the overrides that restore Raft's rules and make it
durable and fast. Every override names pysyncobj's name-mangled method it replaces; the door
(`chasqui_node.raft.install`) checks the pysyncobj version these were written against and that
each of `OVERRIDDEN` exists. What each one restores, and the test that pins it, is listed in
the door's docstring; the reasons are in each method's own.

Built only by `RaftGroup` (group.py), after `install()`. Everything here runs on pysyncobj's
tick thread unless a docstring says otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pysyncobj.syncobj
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.monotonic import monotonic as monotonicTime

from chasqui_node.clock import ClusterClock
from chasqui_node.commands import Result
from chasqui_node.raft.cipher import ClusterCipher
from chasqui_node.raft.log import DurableRaftLog
from chasqui_node.raft.snapshots import SnapshotReceiver
from chasqui_node.raft.transport import RaftConnection, RaftTransport, send_rest_when_writable

# The key of an append-entries message that carries the leader's cluster time (clock.py).
CLUSTER_TIME_KEY = "chasqui_cluster_time_ms"

# pysyncobj's name-mangled methods and hooks `_RaftNode` overrides or calls: `install()` checks
# they exist (with transport.py's) before a node is built on them.
OVERRIDDEN: dict[type, tuple[str, ...]] = {
    SyncObj: (
        "_SyncObj__onMessageReceived",
        "_SyncObj__sendNextNodeIdx",
        "_SyncObj__sendAppendEntries",
        "_SyncObj__getCurrentLogIndex",
        "_onTick",
        "_isLeader",
        "_getLeader",
        "addOnTickCallback",
        "getStatus",
    ),
}

_JOURNAL_FACTORY_LOCK = threading.Lock()


def _follower_commit(
    before: int, after: int, message: dict[str, Any], snapshot_installed: bool
) -> int:
    """The commit index Raft allows a follower that moved it from `before` to `after` while
    taking an append-entries `message` (see `_RaftNode._SyncObj__onMessageReceived`)."""
    if "prevLogIdx" not in message:  # a snapshot chunk
        return after if snapshot_installed else before
    transmission = message.get("transmission")  # one large entry, sent in pieces
    added = 1 if transmission == "finish" else len(message.get("entries") or ())
    return max(before, min(after, int(message["prevLogIdx"]) + added))


class _RaftNode(SyncObj):  # type: ignore[misc]
    """pysyncobj's view of the node: a replicated method per entry format, and the overrides
    listed in the door's docstring (chasqui_node/raft/__init__.py)."""

    _SyncObj__raftCommitIndex: int  # pysyncobj's commit index (see _SyncObj__onMessageReceived)

    def __init__(
        self,
        self_address: str,
        other_addresses: list[str],
        conf: SyncObjConf,
        apply_encoded: Callable[[int, str | bytes], list[Result] | None],
        raft_log: DurableRaftLog,
        accept_snapshot: Callable[[str], bool],
        clock: ClusterClock,
    ) -> None:
        # Assigned before SyncObj.__init__ so pysyncobj's default serializer would skip it; we
        # use our own serializer anyway, and the state lives in LMDB.
        self._apply_encoded = apply_encoded
        self._raft_log = raft_log
        self._clock = clock
        self._cluster_cipher: ClusterCipher | None = None  # see `encryptor`
        self._deferring_append_entries = False  # see _SyncObj__sendAppendEntries
        self._append_entries_deferred = False
        # pysyncobj builds its journal with the module-level createJournal() inside __init__;
        # hand it ours instead (its documented replacement point) for the constructor only.
        with _JOURNAL_FACTORY_LOCK:
            original = pysyncobj.syncobj.createJournal
            pysyncobj.syncobj.createJournal = lambda _path: raft_log
            try:
                super().__init__(self_address, other_addresses, conf, transportClass=RaftTransport)
            finally:
                pysyncobj.syncobj.createJournal = original
        # Durability points. A reply (an append-entries acknowledgement, a vote) leaves only
        # after what this node wrote is fsynced. A leader's own new entries need not be
        # durable before they go out: it fsyncs them while the followers write theirs (Raft
        # thesis 10.2.1), and counts itself towards a commit only after that fsync, because
        # its commit check runs at the start of a tick (`_onTick`) and every tick syncs
        # first. Replies are read only in the poll that ends a tick, after the callback
        # below has synced that tick's entries.
        transport = self._SyncObj__transport
        send = transport.send

        def send_after_sync(node: Any, message: Any) -> Any:
            if message.get("type") != "append_entries":
                raft_log.sync()
            elif (now_ms := clock.now_ms()) > 0:
                # Cluster time rides on every append-entries, heartbeats included, so a
                # follower's estimate is the leader's even while no entry is stamped: a node
                # that catches up on old entries, then leads, resumes from the present, not
                # from its last entry's stamp. Nodes of older releases ignore the key.
                message[CLUSTER_TIME_KEY] = now_ms
            sent = send(node, message)
            connection = transport._connections.get(node)
            if connection is not None:
                send_rest_when_writable(connection)
            return sent

        transport.send = send_after_sync
        self.addOnTickCallback(self._send_deferred_append_entries)
        self.addOnTickCallback(raft_log.sync)
        self._snapshot_receiver = SnapshotReceiver(conf.fullDumpFile, accept_snapshot)
        self._SyncObj__serializer.setTransmissionData = self._snapshot_receiver

    @property
    def encryptor(self) -> ClusterCipher | None:
        """What pysyncobj hands each new connection: the cluster secret as Fernet and as the
        key AES-GCM keys are derived from (`RaftConnection` makes its own cipher of it)."""
        fernet = self._SyncObj__encryptor
        if fernet is None:
            return None
        if self._cluster_cipher is None:
            self._cluster_cipher = ClusterCipher(self.conf.password, fernet)
        return self._cluster_cipher

    def peers_sealed_with_aes_gcm(self) -> set[str]:
        """Raft addresses of the peers this node's messages go to with AES-GCM."""
        connections = dict(self._SyncObj__transport._connections)  # copied atomically
        return {
            node.address
            for node, connection in connections.items()
            if isinstance(connection, RaftConnection) and connection.seals_with_aes_gcm()
        }

    def _onTick(self, timeToWait: float = 0.0) -> None:
        # The leader's commit check comes first in a tick: it counts this node's own log,
        # which must be on disk by then (see the durability points in __init__).
        self._raft_log.sync()
        self._deferring_append_entries = True
        try:
            super()._onTick(timeToWait)
        finally:  # a tick that ended early (transport not ready, an error) sends now
            if self._deferring_append_entries:
                self._send_deferred_append_entries()

    def _SyncObj__sendAppendEntries(self) -> None:
        """pysyncobj sends append-entries to every follower after each entry it adds and after
        each apply, so a tick that adds 5 entries sends 6 messages to each follower, and each
        follower fsyncs and replies 6 times. Within a tick they are deferred to one send at its
        end (`_send_deferred_append_entries`, the first tick callback), which carries every
        new entry and the latest commit index. Outside a tick (a message handler) it sends at
        once."""
        if self._deferring_append_entries:
            self._append_entries_deferred = True
            return
        super()._SyncObj__sendAppendEntries()

    def _send_deferred_append_entries(self) -> None:
        self._deferring_append_entries = False
        if self._append_entries_deferred:
            self._append_entries_deferred = False
            if not self._only_commit_news():
                super()._SyncObj__sendAppendEntries()

    def _only_commit_news(self) -> bool:
        """Whether a send now would tell the followers nothing but a newer commit index.

        pysyncobj sends one after every apply, so every entry cost each follower two messages,
        two replies and their encryption (half its CPU under one-at-a-time publishing). The
        commit index reaches the followers with the next entry or heartbeat instead (within
        appendEntriesPeriod): clients are answered by the leader, which has applied already,
        and a new leader commits what its predecessor did with its first entry, as in Raft."""
        if monotonicTime() > self._SyncObj__newAppendEntriesTime:
            return False  # a heartbeat is due
        last_index = self._SyncObj__getCurrentLogIndex()
        next_index = self._SyncObj__raftNextIndex
        return all(
            next_index.get(node, 0) > last_index
            for node in self._SyncObj__otherNodes | self._SyncObj__readonlyNodes
        )

    def _SyncObj__onMessageReceived(self, node: Any, message: dict[str, Any]) -> None:
        """pysyncobj's message handler, with two of Raft's rules it leaves out.

        - A leader takes a follower's reply only when it answers this leader's term. pysyncobj's
          replies carry no term, so one sent to this node in an earlier term (delayed by a
          pause, or still queued) would set the follower's match index in the new term to
          entries it may not hold there, and the leader would count them towards a commit.
          Replies now carry the term (see `_SyncObj__sendNextNodeIdx`); one without a term
          (a node still running an older Chasqui) is taken as before.
        - A follower's commit index is min(leaderCommit, index of the message's last new entry).
          pysyncobj uses the end of the log instead, right only while the log ends there; the
          Raft log adapter keeps matching entries after it (see `DurableRaftLog._settle`),
          not yet verified against this leader. Worse, pysyncobj does so on every chunk of a
          snapshot the leader sends, before the snapshot is installed: a deposed leader that
          still holds entries of its own term then applied them, and confirmed them to its
          clients, though no majority held them (the fault suite lost messages so). A chunk
          moves the commit index only when it completes an installed snapshot (the log then
          ends at the snapshot's last entry).
        """
        kind = message.get("type")
        if kind == "next_node_idx" and message.get("term", self.raftCurrentTerm) != (
            self.raftCurrentTerm
        ):
            return
        if kind == "append_entries" and type(message.get(CLUSTER_TIME_KEY)) is int:
            self._clock.observe(message[CLUSTER_TIME_KEY])
        before = self._SyncObj__raftCommitIndex
        self._snapshot_receiver.completed = False
        super()._SyncObj__onMessageReceived(node, message)
        after = self._SyncObj__raftCommitIndex
        if after <= before or kind != "append_entries":
            return
        verified = _follower_commit(before, after, message, self._snapshot_receiver.completed)
        if verified != after:
            self._SyncObj__raftCommitIndex = verified
            self._SyncObj__raftLog.setRaftCommitIndex(verified)

    def _SyncObj__sendNextNodeIdx(
        self,
        node: Any,
        reset: bool = False,
        nextNodeIdx: int | None = None,  # pysyncobj passes it by this name
        success: bool = False,
    ) -> None:
        """pysyncobj's reply to the leader, with the term it answers (see above)."""
        if nextNodeIdx is None:
            nextNodeIdx = self._SyncObj__getCurrentLogIndex() + 1
        self._SyncObj__transport.send(
            node,
            {
                "type": "next_node_idx",
                "next_node_idx": nextNodeIdx,
                "reset": reset,
                "success": success,
                "term": self.raftCurrentTerm,
            },
        )

    # pysyncobj numbers replicated methods by name (with a "_v0" suffix) and logs the number:
    # apply_entry is 0 and apply_packed 1 in every journal. A new one must sort after both.
    # pysyncobj applies entries in order on its tick thread and advances raftLastApplied
    # after each returns, so the entry's index is the next one.

    @replicated  # type: ignore[untyped-decorator]
    def apply_entry(self, text: str) -> list[Result] | None:
        """An entry in the text format (written before the packed one, or its fallback)."""
        return self._apply_encoded(self.raftLastApplied + 1, text)

    @replicated  # type: ignore[untyped-decorator]
    def apply_packed(self, data: bytes) -> list[Result] | None:
        """An entry in the packed format. A node older than this format does not know the
        method: it stops applying rather than skip the entry (see "Upgrading" in the README)."""
        return self._apply_encoded(self.raftLastApplied + 1, data)
