"""Replication: proposing commands to the Raft group and applying what it commits.

A `Replicator` owns this node's `RaftGroup` (chasqui_node/raft/, the one door to pysyncobj,
which `raft.install()` must have prepared), whose replicated methods each take one encoded
`Entry`: `apply_packed` the packed bytes, `apply_entry` the older text (see entries.py; the
leader proposes text only for what the packed form cannot hold). Callers `propose()`
commands from any thread; a proposer thread gathers whatever is waiting into one entry (group
commit: one Raft round and one LMDB transaction for many commands), stamps cluster time (clock.py),
and hands it to the group with a callback. The callback runs on pysyncobj's tick thread when
this node applies the entry and resolves each waiting caller with its own result.

pysyncobj traps handled here (the full list of departures is in chasqui_node/raft/__init__.py):
- a replicated method that raises wedges the node, and a callback that raises applies an entry
  twice: `_apply_encoded` and every callback catch everything;
- Raft is always encrypted with a cluster secret and bound to the listed address: the
  constructor refuses an empty secret.

Waiting consumers ride in the next publish's entry (`Rider`), so a consumer with nothing to
take receives a message in the Raft round that commits it.

Membership: the members a node knows are its static `--cluster` list overlaid with the
replicated member registry (AddMember / RemoveMember commands), re-read whenever such a command
or a snapshot is applied, so every node maps a new leader's Raft address to its client address.
The Raft configuration itself is pysyncobj's dynamic membership, changed by the leader with
`add_member` / `remove_member` one node at a time.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from chasqui_node import limits
from chasqui_node.clock import ClusterClock
from chasqui_node.commands import (
    AddMember,
    Command,
    Entry,
    Kind,
    RemoveMember,
    Result,
    readies,
)
from chasqui_node.entries import (
    MalformedEntry,
    UnsupportedEntry,
    decode_entry,
    encode_for_raft,
)
from chasqui_node.entries import encoded_size as command_encoded_size
from chasqui_node.errors import (
    ChasquiError,
    FailedPrecondition,
    NoLeader,
    NotLeader,
    OutcomeUnknown,
    Unavailable,
)
from chasqui_node.raft import FAIL_REASON, RaftGroup
from chasqui_node.raft import RaftTimings as RaftTimings  # part of the Replicator's interface
from chasqui_node.raft import Role as Role  # part of ReplicationStatus
from chasqui_node.state import StateMachine, Store
from chasqui_node.storage import Storage, StorageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DEFAULT_TIMINGS = RaftTimings()


@dataclass(frozen=True)
class Member:
    node_id: str
    client_address: str  # host:port where the node serves gRPC
    raft_address: str  # host:port where the node speaks Raft


def staggered_compaction_entries(entries_min: int, node_id: str, member_ids: Sequence[str]) -> int:
    """How long this node's Raft log grows before it snapshots and trims it: `entries_min`
    for the first member by id, up to half as much again for the last.

    A snapshot stops the node's tick thread while it is written (0.06-0.08 s for a 25 MB
    state). At one shared threshold every node wrote its snapshot at the same index, at the
    same moment, and commits stopped on all of them at once; staggered, a follower's pause no
    longer holds up the majority, and the nodes' cadences differ from then on."""
    ids = sorted(set(member_ids) | {node_id})
    return entries_min + entries_min * ids.index(node_id) // (2 * len(ids))


@dataclass(frozen=True)
class PeerStatus:
    member: Member
    connected: bool
    match_index: int
    aes_gcm: bool = False  # Raft messages to it are sealed with AES-GCM (raft/cipher.py)


@dataclass(frozen=True)
class ReplicationStatus:
    node_id: str
    role: Role
    term: int
    leader: Member | None
    commit_index: int
    applied_index: int
    log_length: int
    has_quorum: bool
    peers: tuple[PeerStatus, ...]
    cluster_time_ms: int = 0  # this node's estimate of cluster time (clock.py)
    clock_skew_s: float = 0.0  # this node's wall clock minus cluster time


class InternalError(ChasquiError):
    """An entry failed because of a bug; every replica returns the same refusal."""


# Called on the applying thread right after the entry holding a proposal's commands applied
# on this node, before its results are handed over and before the next entry applies.
AtCommit = Callable[[], None]


@dataclass
class _Proposal:
    commands: Sequence[Command]
    future: Future[list[Result]]
    at_commit: AtCommit | None = None


class Rider:
    """Commands waiting to join the next entry that may make a message ready on `key` (a queue
    or topic: see `commands.readies`), after that entry's own commands.

    A consumer with nothing to take rides along with the next publish instead of proposing
    again once that publish is applied: it receives the message in the same Raft round that
    commits it. Made by `Replicator.ride`; `withdraw` it when done waiting.
    """

    def __init__(
        self, key: tuple[Kind, str], commands: Sequence[Command], at_commit: AtCommit | None
    ) -> None:
        self.key = key
        self.commands = commands
        self.at_commit = at_commit
        self.future: Future[list[Result]] = Future()


def await_results(future: Future[list[Result]], timeout_s: float) -> list[Result]:
    """The results of a proposal (or a rider), or OutcomeUnknown when no commit comes in time."""
    try:
        return future.result(timeout=timeout_s)
    except FutureTimeout:
        raise OutcomeUnknown(
            f"no commit within {timeout_s:.1f} s (leader change or lost majority); "
            "retry with the same producer id and sequence"
        ) from None


class RiderBoard:
    """The riders waiting for an entry, by key. Any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[tuple[Kind, str], list[Rider]] = {}

    def ride(
        self, key: tuple[Kind, str], commands: Sequence[Command], at_commit: AtCommit | None = None
    ) -> Rider:
        rider = Rider(key, commands, at_commit)
        with self._lock:
            self._waiting.setdefault(key, []).append(rider)
        return rider

    def withdraw(self, rider: Rider) -> bool:
        """Remove `rider`; False when `take` has handed it to an entry already."""
        with self._lock:
            waiting = self._waiting.get(rider.key, [])
            if rider not in waiting:
                return False
            waiting.remove(rider)
            if not waiting:
                del self._waiting[rider.key]
            return True

    def take(self, commands: Sequence[Command]) -> list[Rider]:
        """Remove and return the riders an entry holding `commands` carries along."""
        if not self._waiting:  # unlocked peek: a rider missed here catches the next entry
            return []
        keys = {key for command in commands if (key := readies(command)) is not None}
        taken: list[Rider] = []
        with self._lock:
            for key in keys:
                taken.extend(self._waiting.pop(key, ()))
        return taken

    def fail_all(self, error: ChasquiError) -> None:
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for riders in waiting.values():
            for rider in riders:
                _fail_future(rider.future, error)


def _fail_future(future: Future[list[Result]], error: ChasquiError) -> None:
    if not future.done():
        future.set_exception(error)


class _EntriesInFlight:
    """Entries handed to pysyncobj and not yet called back, by token, with submit time.
    Bounding them makes concurrent proposals pile up into bigger entries under load. Any
    thread: the proposer reserves, pysyncobj's callbacks release."""

    def __init__(self) -> None:
        self._submitted: dict[int, float] = {}
        self._changed = threading.Condition()
        self._next_token = 0

    def reserve(self) -> int:
        """Wait for room among in-flight entries and return a token for the next one.

        pysyncobj calls back every entry it accepted, but a lost callback must not stall
        proposing for good: entries older than limits.ENTRY_FORGOTTEN_S stop counting.
        """
        with self._changed:
            while len(self._submitted) >= limits.ENTRIES_IN_FLIGHT_MAX:
                oldest_allowed = time.monotonic() - limits.ENTRY_FORGOTTEN_S
                for token, submitted in list(self._submitted.items()):
                    if submitted < oldest_allowed:
                        del self._submitted[token]
                self._changed.wait(timeout=0.5)
            self._next_token += 1
            self._submitted[self._next_token] = time.monotonic()
            return self._next_token

    def release(self, token: int) -> None:
        with self._changed:
            self._submitted.pop(token, None)
            self._changed.notify()


class Replicator:
    """Proposes commands to the Raft group and applies committed entries to storage.

    Thread rules: `propose`, `status`, `is_leader` and `leader` may be called from any thread.
    Applies, callbacks and snapshots run on pysyncobj's tick thread, one at a time.
    """

    def __init__(
        self,
        node_id: str,
        members: Sequence[Member],
        data_dir: Path,
        storage: Storage,
        state_machine: StateMachine,
        *,
        cluster_secret: str,
        bind_host: str | None = None,
        timings: RaftTimings = _DEFAULT_TIMINGS,
        fsync: bool = True,
        on_applied: Callable[[Entry, list[Result]], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
        on_journal_sync: Callable[[float], None] | None = None,
    ) -> None:
        by_id = {member.node_id: member for member in members}
        if node_id not in by_id:
            raise ValueError(f"node id {node_id!r} is not in the cluster {sorted(by_id)}")
        if not cluster_secret:
            raise ValueError("a cluster secret is required: the Raft port must never be open")
        self.node_id = node_id
        self._static_members = tuple(members)
        self._self = by_id[node_id]
        self._storage = storage
        self._state_machine = state_machine
        # Replaced whole (never mutated) on the tick thread; other threads read a reference.
        self.members: tuple[Member, ...] = self._static_members
        self._by_raft_address = {member.raft_address: member for member in members}
        self._refresh_members()
        self._on_applied = on_applied
        self._on_fatal = on_fatal or _exit_process
        self._pending: queue.SimpleQueue[_Proposal | None] = queue.SimpleQueue()
        self._in_flight = _EntriesInFlight()
        self._closed = threading.Event()
        self._riders = RiderBoard()
        self.clock = ClusterClock(storage.read(state_machine.clock_ms))

        raft_host, raft_port = self._self.raft_address.rsplit(":", 1)
        self._raft = RaftGroup(
            node_id,
            self._self.raft_address,
            [m.raft_address for m in members if m.node_id != node_id],
            f"{bind_host or raft_host}:{raft_port}",
            data_dir,
            storage,
            self.clock,
            cluster_secret=cluster_secret,
            timings=timings,
            log_compaction_entries=staggered_compaction_entries(
                timings.log_compaction_entries_min, node_id, [m.node_id for m in members]
            ),
            fsync=fsync,
            apply_encoded=self._apply_encoded,
            on_snapshot_installed=self._on_snapshot_installed,
            on_fatal=self._on_fatal,
            on_journal_sync=on_journal_sync,
        )
        self._proposer = threading.Thread(
            target=self._propose_loop, name=f"chasqui-proposer-{node_id}", daemon=True
        )
        self._proposer.start()

    # -- proposing ---------------------------------------------------------------------------

    def propose(self, command: Command, timeout_s: float) -> Result:
        """Replicate one command and return its result.

        Raises NotLeader/NoLeader when this node cannot lead the write (nothing was proposed),
        and OutcomeUnknown when it was proposed but not seen committed within `timeout_s` (it
        may still commit: the client retries with the same idempotency key).
        """
        return self.propose_many([command], timeout_s)[0]

    def propose_many(
        self, commands: Sequence[Command], timeout_s: float, at_commit: AtCommit | None = None
    ) -> list[Result]:
        """Replicate commands together (one entry when they fit) and return their results.

        With no commands this is a read barrier: it returns once an entry proposed now has
        been committed and applied here, so a following local read sees every earlier write.
        `at_commit` (see `AtCommit`) lets the caller note what else held right after the
        entry applied, such as how far the change board had moved.
        """
        self._check_open()
        self.check_leader()
        future: Future[list[Result]] = Future()
        self._pending.put(_Proposal(commands, future, at_commit))
        return await_results(future, timeout_s)

    def ride(
        self, key: tuple[Kind, str], commands: Sequence[Command], at_commit: AtCommit | None = None
    ) -> Rider:
        """Have `commands` proposed in the next entry that may make a message ready on `key`
        (see `Rider`); its results arrive in `rider.future`, `at_commit` as for `propose_many`.
        Nothing is proposed until such an entry forms; `withdraw` cancels that."""
        self._check_open()
        return self._riders.ride(key, commands, at_commit)

    def withdraw(self, rider: Rider) -> bool:
        """Stop `rider` from joining an entry. False when it has joined one already: its
        results then arrive in `rider.future` as for any proposal."""
        return self._riders.withdraw(rider)

    def _shutting_down(self) -> Unavailable:
        return Unavailable(f"node {self.node_id} is shutting down")

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise self._shutting_down()

    def cluster_time_ms(self) -> int:
        """This node's estimate of cluster time, the clock of leases, delays and TTLs."""
        return self.clock.now_ms()

    def check_leader(self) -> None:
        """Raise NotLeader (with a hint when known) unless this node is the leader."""
        if self._raft.is_leader():
            return
        leader = self.leader()
        if leader is None:
            raise NoLeader()
        raise NotLeader(self.node_id, leader.node_id, leader.client_address)

    def _propose_loop(self) -> None:
        """Gather waiting proposals into entries while earlier entries are in flight."""
        carried: _Proposal | None = None
        while not self._closed.is_set():
            first = carried or self._pending.get()
            carried = None
            if first is None:
                break
            token = self._in_flight.reserve()
            batch = [first]
            commands = list(first.commands)
            size = sum(command_encoded_size(c) for c in commands)
            while len(commands) < limits.RAFT_ENTRY_COMMANDS_MAX:
                try:
                    following = self._pending.get_nowait()
                except queue.Empty:
                    break
                if following is None:
                    self._closed.set()
                    break
                extra = sum(command_encoded_size(c) for c in following.commands)
                if size + extra > limits.RAFT_ENTRY_BYTES_TARGET:
                    carried = following
                    break
                batch.append(following)
                commands.extend(following.commands)
                size += extra
            for rider in self._riders.take(commands):
                batch.append(_Proposal(rider.commands, rider.future, rider.at_commit))
                commands.extend(rider.commands)
            self._submit(token, batch, commands)
        shutting_down = self._shutting_down()
        for proposal in _drain(self._pending, carried):
            _fail_future(proposal.future, shutting_down)
        self._riders.fail_all(shutting_down)

    def _submit(self, token: int, batch: list[_Proposal], commands: list[Command]) -> None:
        entry = Entry(now_ms=self.clock.stamp_ms(), commands=tuple(commands))
        data = encode_for_raft(entry)

        def on_committed(results: list[Result] | None, error: int) -> None:
            # Runs on the tick thread. Must never raise (pysyncobj would apply again).
            try:
                self._in_flight.release(token)
                if error != FAIL_REASON.SUCCESS or results is None:
                    failure = self._failure(error)
                    for proposal in batch:
                        _fail_future(proposal.future, failure)
                    return
                position = 0
                for proposal in batch:
                    count = len(proposal.commands)
                    if proposal.at_commit is not None:
                        proposal.at_commit()
                    if not proposal.future.done():
                        proposal.future.set_result(results[position : position + count])
                    position += count
            except Exception:
                logger.exception("commit callback failed")

        try:
            self._raft.propose(data, on_committed)
        except Exception as error:  # pysyncobj refused to queue it (queue full, destroyed)
            self._in_flight.release(token)
            for proposal in batch:
                _fail_future(proposal.future, Unavailable(f"cannot propose: {error}"))

    def _failure(self, error: int) -> ChasquiError:
        if error in (FAIL_REASON.UNKNOWN_OUTCOME,):
            return OutcomeUnknown("the outcome of this write is unknown; retry with the same id")
        if error == FAIL_REASON.SUCCESS:  # success without results: an already-applied replay
            return OutcomeUnknown("the write was applied before; retry with the same id")
        # QUEUE_FULL, MISSING_LEADER, DISCARDED, NOT_LEADER, LEADER_CHANGED, REQUEST_DENIED:
        # the entry was not committed (DISCARDED: overwritten by a new leader's log).
        leader = self.leader()
        if leader is None or leader.node_id == self.node_id:
            return NoLeader()
        return NotLeader(self.node_id, leader.node_id, leader.client_address)

    # -- applying (tick thread) --------------------------------------------------------------

    def _apply_encoded(self, raft_index: int, data: str | bytes) -> list[Result] | None:
        """Apply one committed entry. Never raises: pysyncobj would wedge the node."""
        try:
            try:
                entry = decode_entry(data)
            except UnsupportedEntry as error:
                # Written by a newer leader: skipping it would diverge from the nodes that
                # apply it. Stop; once upgraded, this node replays the journal from here.
                self._on_fatal(f"cannot apply entry {raft_index}: {error}; upgrade this node")
                return None
            except MalformedEntry as error:
                # Only a bug or a foreign writer produces this; every replica refuses alike.
                logger.error("entry %d is malformed and skipped: %s", raft_index, error)
                self._storage.apply(raft_index, lambda store: None)
                return None
            try:
                results = self._storage.apply(
                    raft_index, lambda store: self._state_machine.apply_entry(store, entry)
                )
            except StorageError:
                raise
            except Exception:
                reference = uuid.uuid4().hex[:8]
                logger.exception("applying entry %d failed (ref %s)", raft_index, reference)
                failure = InternalError(f"internal error (see node log, ref {reference})")
                self._storage.apply(raft_index, lambda store: None)
                results = [failure for _ in entry.commands]
            self.clock.observe(entry.now_ms)
            if results is not None and any(
                isinstance(command, AddMember | RemoveMember) for command in entry.commands
            ):
                self._refresh_members()
            if results is not None and self._on_applied is not None:
                self._on_applied(entry, results)
            return results
        except StorageError as error:
            # The disk failed under us: this replica cannot keep up with the others, and
            # continuing would diverge. Stop; a restart replays the journal.
            self._on_fatal(f"storage failed while applying entry {raft_index}: {error}")
            return None
        except Exception:
            logger.exception("unexpected failure applying entry %d", raft_index)
            return None

    def _on_snapshot_installed(self) -> None:
        """A snapshot replaced the applied state (tick thread): its clock and members now rule."""
        self.clock.observe(self._storage.read(self._state_machine.clock_ms))
        self._refresh_members()

    def read(self, query: Callable[[Store], T]) -> T:
        """Run `query` on this node's applied state (local; see `propose_many` for a barrier)."""
        return self._storage.read(query)

    # -- membership --------------------------------------------------------------------------

    def _refresh_members(self) -> None:
        """Overlay the applied member registry on the static members (tick thread, or the
        constructor). A tombstone hides a static member; this node always knows itself."""
        by_id = {member.node_id: member for member in self._static_members}
        for record in self._storage.read(self._state_machine.members):
            if record.removed:
                if record.node_id != self.node_id:
                    by_id.pop(record.node_id, None)
            else:
                by_id[record.node_id] = Member(
                    record.node_id, record.client_address, record.raft_address
                )
        members = tuple(by_id.values())
        self._by_raft_address = {member.raft_address: member for member in members}
        self.members = members

    def member(self, node_id: str) -> Member | None:
        return next((m for m in self.members if m.node_id == node_id), None)

    def add_member(self, member: Member, timeout_s: float) -> None:
        """Leader only: add `member` to the Raft configuration and wait for the change to
        commit. Already a member: returns at once, so a retry after a timeout is safe."""
        self._change_membership(member.raft_address, adding=True, timeout_s=timeout_s)

    def remove_member(self, member: Member, timeout_s: float) -> None:
        """Leader only: remove `member` from the Raft configuration and wait for the commit.
        Not a member: returns at once. The leader cannot remove itself (FailedPrecondition)."""
        if member.raft_address == self._self.raft_address:
            raise FailedPrecondition(
                f"node {self.node_id} is the leader and cannot remove itself; stop it, wait for "
                "a new leader, then remove it there"
            )
        self._change_membership(member.raft_address, adding=False, timeout_s=timeout_s)

    def _change_membership(self, raft_address: str, adding: bool, timeout_s: float) -> None:
        """Raises NotLeader/NoLeader; FailedPrecondition when pysyncobj refuses because an
        earlier change (or this leader's first no-op) is not committed yet; OutcomeUnknown
        when no commit was seen in time (the change may still commit: retry)."""
        self.check_leader()
        present = raft_address in self._raft.status().peers.connected
        if present == adding:
            return
        future: Future[None] = Future()

        def on_committed(_result: Any, error: int) -> None:
            # Runs on the tick thread. Must never raise (pysyncobj would apply again).
            try:
                if error == FAIL_REASON.SUCCESS:
                    future.set_result(None)
                elif error == FAIL_REASON.REQUEST_DENIED:
                    future.set_exception(
                        FailedPrecondition(
                            "another membership change is in progress (or the leader has not "
                            "committed its first entry yet); retry"
                        )
                    )
                else:
                    future.set_exception(self._failure(error))
            except Exception:
                logger.exception("membership callback failed")

        self._raft.change_membership(raft_address, adding, on_committed)
        try:
            future.result(timeout=timeout_s)
        except FutureTimeout:
            raise OutcomeUnknown(
                f"the membership change was not seen committed within {timeout_s:.1f} s; retry"
            ) from None
        logger.info("node %s: %s %s", self.node_id, "added" if adding else "removed", raft_address)

    # -- status ------------------------------------------------------------------------------

    def is_leader(self) -> bool:
        return self._raft.is_leader()

    def leader(self) -> Member | None:
        address = self._raft.leader_address()
        return None if address is None else self._by_raft_address.get(address)

    def status(self) -> ReplicationStatus:
        raft = self._raft.status()
        links = raft.peers
        peers = [
            PeerStatus(
                member=member,
                connected=links.connected.get(member.raft_address, False),
                match_index=links.match_index.get(member.raft_address, 0),
                aes_gcm=member.raft_address in links.aes_gcm,
            )
            for member in self.members
            if member.node_id != self.node_id
        ]
        return ReplicationStatus(
            node_id=self.node_id,
            role=raft.role,
            term=raft.term,
            leader=self.leader(),
            commit_index=raft.commit_index,
            applied_index=raft.applied_index,
            log_length=raft.log_length,
            has_quorum=raft.has_quorum,
            peers=tuple(peers),
            cluster_time_ms=self.clock.now_ms(),
            clock_skew_s=self.clock.skew_s(),
        )

    # -- shutdown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop proposing, fail waiting callers with UNAVAILABLE, stop Raft. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._pending.put(None)
        self._proposer.join(timeout=5)
        self._raft.close()


def _drain(
    pending: queue.SimpleQueue[_Proposal | None], carried: _Proposal | None
) -> list[_Proposal]:
    proposals = [carried] if carried is not None else []
    while True:
        try:
            item = pending.get_nowait()
        except queue.Empty:
            return proposals
        if item is not None:
            proposals.append(item)


def _exit_process(reason: str) -> None:
    logger.critical("stopping the node: %s", reason)
    logging.shutdown()
    os._exit(70)
