"""`RaftGroup`: this node's part in the Raft group, in Chasqui's terms. The replicator's only
handle on pysyncobj: it proposes encoded entries, asks who leads and how the group stands,
changes the membership, and stops Raft, without seeing a pysyncobj type or name.

It builds what pysyncobj needs: the durable Raft log over Chasqui's journal (log.py), the
snapshot hooks (snapshots.py), pysyncobj's configuration from `RaftTimings` and limits.py, and
the `_RaftNode` itself (node.py). Thread rules: `propose`, `is_leader`, `leader_address`,
`status` and `change_membership` may be called from any thread (pysyncobj queues calls for
its tick thread); `apply_encoded`, every callback and the snapshot hooks run on the tick thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pysyncobj import SyncObjConf

from chasqui_node import limits
from chasqui_node.clock import ClusterClock
from chasqui_node.commands import Result
from chasqui_node.journal import Journal
from chasqui_node.raft import patches
from chasqui_node.raft.log import DurableRaftLog
from chasqui_node.raft.node import _RaftNode
from chasqui_node.raft.snapshots import (
    BackgroundSnapshot,
    SnapshotInstaller,
    verified_snapshot_file,
)
from chasqui_node.storage import Storage

logger = logging.getLogger(__name__)

# Called on the tick thread once this node applied a proposed entry, or knows it never will:
# (the replicated method's results, a FAIL_REASON). It must never raise (pysyncobj would apply
# the entry again).
OnCommitted = Callable[[Any, int], None]
# Applies one committed entry, given its Raft index and encoded form; never raises.
ApplyEncoded = Callable[[int, str | bytes], list[Result] | None]


@dataclass(frozen=True)
class RaftTimings:
    """Raft timing knobs, tuned so a leader kill is followed by a commit in well under 1 s."""

    election_timeout_min_s: float = 0.3
    election_timeout_max_s: float = 0.6
    heartbeat_s: float = 0.05
    leader_fallback_s: float = 1.5  # a leader that hears from no majority this long steps down
    connection_retry_s: float = 0.5
    connection_timeout_s: float = 1.5
    tick_s: float = 0.02
    log_compaction_entries_min: int = 5000


class Role(Enum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    LEADER = "leader"


_ROLES = {0: Role.FOLLOWER, 1: Role.CANDIDATE, 2: Role.LEADER}  # pysyncobj's state numbers


@dataclass(frozen=True)
class PeerLinks:
    """What this node knows of its peers, by Raft address."""

    connected: Mapping[str, bool]  # every peer in this node's Raft configuration
    match_index: Mapping[str, int]  # on a leader: how far each peer's log matches its own
    aes_gcm: frozenset[str]  # peers this node's messages go to sealed with AES-GCM (cipher.py)


@dataclass(frozen=True)
class RaftStatus:
    role: Role
    term: int
    commit_index: int
    applied_index: int
    log_length: int
    has_quorum: bool
    peers: PeerLinks


class RaftGroup:
    """This node's Raft: pysyncobj's `SyncObj` with Chasqui's log, snapshots and overrides.

    Needs `chasqui_node.raft.install()` first (RuntimeError otherwise). Building it verifies
    this node's own snapshot (raises SnapshotCorrupt), opens the journal (raises
    JournalCorrupt), then starts pysyncobj, which loads the snapshot (`on_snapshot_installed`
    runs) and replays the journal through `apply_encoded` before this returns.
    """

    def __init__(
        self,
        node_id: str,
        self_address: str,
        other_addresses: Sequence[str],
        bind_address: str,
        data_dir: Path,
        storage: Storage,
        clock: ClusterClock,
        *,
        cluster_secret: str,
        timings: RaftTimings,
        log_compaction_entries: int,
        fsync: bool,
        apply_encoded: ApplyEncoded,
        on_snapshot_installed: Callable[[], None],
        on_fatal: Callable[[str], None],
        on_journal_sync: Callable[[float], None] | None = None,
    ) -> None:
        if not patches.applied():
            raise RuntimeError(
                "chasqui_node.raft.install() must run before a Raft node is built: without it "
                "pysyncobj runs without the Raft port's bounds and cipher (see raft/__init__.py)"
            )
        self.node_id = node_id
        data_dir.mkdir(parents=True, exist_ok=True)
        snapshot_path = data_dir / "raft.snapshot"
        self._snapshots = BackgroundSnapshot(storage, str(snapshot_path), node_id)
        verified = verified_snapshot_file(snapshot_path)
        self._log = DurableRaftLog(
            Journal(data_dir / "journal", fsync=fsync, on_sync=on_journal_sync),
            data_dir,
            on_fatal,
            applied_index=lambda: storage.applied_index,
        )
        installer = SnapshotInstaller(
            storage,
            self._snapshots,
            self._log,
            node_id,
            on_fatal,
            on_snapshot_installed,
            verified,
        )
        conf = SyncObjConf(
            password=cluster_secret,
            bindAddress=bind_address,
            fullDumpFile=str(snapshot_path),
            serializer=self._snapshots.start,
            serializeChecker=self._snapshots.progress,
            deserializer=installer.load,
            appendEntriesUseBatch=False,
            # pysyncobj's 64 KiB shrinks the kernel's socket buffers below one entry of a
            # batch, so each entry crossed in several poll rounds of both nodes.
            sendBufferSize=limits.RAFT_SOCKET_BUFFER_BYTES,
            recvBufferSize=limits.RAFT_SOCKET_BUFFER_BYTES,
            appendEntriesBatchSizeBytes=limits.RAFT_MESSAGE_BYTES_MAX,
            appendEntriesPeriod=timings.heartbeat_s,
            raftMinTimeout=timings.election_timeout_min_s,
            raftMaxTimeout=timings.election_timeout_max_s,
            leaderFallbackTimeout=timings.leader_fallback_s,
            connectionRetryTime=timings.connection_retry_s,
            connectionTimeout=timings.connection_timeout_s,
            autoTickPeriod=timings.tick_s,
            logCompactionMinEntries=log_compaction_entries,
            commandsWaitLeader=False,
            dynamicMembershipChange=True,
            onStateChanged=self._on_state_changed,
        )
        self._node = _RaftNode(
            self_address,
            list(other_addresses),
            conf,
            apply_encoded,
            self._log,
            installer.accept,
            clock,
        )

    def propose(self, data: str | bytes, on_committed: OnCommitted) -> None:
        """Queue an encoded entry: packed bytes through `apply_packed`, text through
        `apply_entry`. Raises when pysyncobj refuses to queue it (queue full, destroyed)."""
        if isinstance(data, bytes):
            self._node.apply_packed(data, callback=on_committed)
        else:
            self._node.apply_entry(data, callback=on_committed)

    def change_membership(self, raft_address: str, adding: bool, on_done: OnCommitted) -> None:
        """Leader only: add or remove one member (pysyncobj's dynamic membership); `on_done`
        gets REQUEST_DENIED while an earlier change is not committed yet."""
        change = self._node.addNodeToCluster if adding else self._node.removeNodeFromCluster
        change(raft_address, callback=on_done)

    def is_leader(self) -> bool:
        return bool(self._node._isLeader())

    def leader_address(self) -> str | None:
        """The Raft address of the last leader this node heard of (it may be stale)."""
        node = self._node._getLeader()
        if node is None:
            return None
        return str(getattr(node, "address", str(node)))

    def status(self) -> RaftStatus:
        raw = self._status_dict()
        connected_prefix, match_prefix = "partner_node_status_server_", "match_idx_server_"
        return RaftStatus(
            role=_ROLES.get(raw.get("state", 0), Role.FOLLOWER),
            term=int(raw.get("raft_term", 0)),
            commit_index=int(raw.get("commit_idx", 0)),
            applied_index=int(raw.get("last_applied", 0)),
            log_length=int(raw.get("log_len", 0)),
            has_quorum=bool(raw.get("has_quorum", False)),
            peers=PeerLinks(
                connected={
                    key.removeprefix(connected_prefix): value == 2
                    for key, value in raw.items()
                    if key.startswith(connected_prefix)
                },
                match_index={
                    key.removeprefix(match_prefix): int(value)
                    for key, value in raw.items()
                    if key.startswith(match_prefix)
                },
                aes_gcm=frozenset(self._node.peers_sealed_with_aes_gcm()),
            ),
        )

    def _status_dict(self) -> dict[str, Any]:
        # getStatus() iterates pysyncobj's dicts from this thread while the tick thread may
        # change them; a rare "changed size during iteration" is retried a few times.
        for _ in range(limits.RAFT_STATUS_READ_ATTEMPTS_MAX):
            try:
                status: dict[str, Any] = self._node.getStatus()
                return status
            except RuntimeError:
                time.sleep(0.001)
        return {}

    def _on_state_changed(self, old: int, new: int) -> None:
        names = {0: "follower", 1: "candidate", 2: "leader"}
        logger.info(
            "node %s: %s -> %s (term %d)",
            self.node_id,
            names.get(old, old),
            names.get(new, new),
            self._node.raftCurrentTerm,
        )

    def close(self) -> None:
        """Stop Raft, then let a snapshot being written finish (within SNAPSHOT_WRITE_WAIT_S)."""
        self._node.destroy_synchronous()
        self._snapshots.close(limits.SNAPSHOT_WRITE_WAIT_S)
