"""Replication: the one module that imports pysyncobj.

A `Replicator` owns a pysyncobj `SyncObj` whose replicated methods each take one encoded
`Entry`: `apply_packed` the packed bytes, `apply_entry` the older text (see commands.py; the
leader proposes text only for what the packed form cannot hold). Callers `propose()`
commands from any thread; a proposer thread gathers whatever is waiting into one entry (group
commit: one Raft round and one LMDB transaction for many commands), stamps cluster time (clock.py),
and hands it to pysyncobj with a callback. The callback runs on pysyncobj's tick thread when
this node applies the entry and resolves each waiting caller with its own result.

pysyncobj traps handled here (ARCHITECTURE section 3):
- a replicated method that raises wedges the node, and a callback that raises applies an entry
  twice: both catch everything;
- a snapshot's contents are fixed on the tick thread, between applies (an LMDB read
  transaction), and written beside it (`_BackgroundSnapshot`): Raft goes on meanwhile;
- Raft is bound to the listed address and always encrypted with a cluster secret: AES-GCM
  between Chasqui nodes, Fernet to older ones (raft_transport.py, raft_cipher.py);
- a stranger on the Raft port is held to a small frame, a few seconds and a few dozen
  connections before it authenticates, so it cannot depose a leader or fill its memory
  (raft_transport.py);
- a leader without a majority steps down after `leaderFallbackTimeout`, tuned to 1.5 s;
- where pysyncobj departs from Raft's safety rules, `_RaftNode` and `_DurableRaftLog` restore
  them: a follower commits only entries the leader verified (not on a snapshot chunk), keeps
  entries it acknowledged unless they conflict, installs only a snapshot that brings something
  new, and its replies carry their term.

Speed, without patching pysyncobj: a leader fsyncs its entries while its followers write theirs;
append-entries sent within a tick go as one message per follower; a Raft message is deflated
only when it halves, and the rest of a partly sent one goes out when the socket is writable
(`_AdaptiveZlib`, `_send_rest_when_writable`); waiting consumers ride in the next publish's
entry (`Rider`).

Membership: the members a node knows are its static `--cluster` list overlaid with the
replicated member registry (AddMember / RemoveMember commands), re-read whenever such a command
or a snapshot is applied, so every node maps a new leader's Raft address to its client address.
The Raft configuration itself is pysyncobj's dynamic membership, changed by the leader with
`add_member` / `remove_member` one node at a time.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import pysyncobj.pickle
import pysyncobj.syncobj
import pysyncobj.tcp_connection
import pysyncobj.tcp_server
import pysyncobj.transport
from pysyncobj import FAIL_REASON, SERIALIZER_STATE, SyncObj, SyncObjConf, replicated
from pysyncobj.journal import Journal as PysyncobjJournal
from pysyncobj.monotonic import monotonic as monotonicTime
from pysyncobj.poller import POLL_EVENT_TYPE

from chasqui_node import limits
from chasqui_node.clock import ClusterClock
from chasqui_node.commands import (
    AddMember,
    Command,
    Entry,
    Kind,
    MalformedEntry,
    RemoveMember,
    Result,
    UnsupportedEntry,
    decode_entry,
    encode_for_raft,
    readies,
)
from chasqui_node.commands import encoded_size as command_encoded_size
from chasqui_node.errors import (
    ChasquiError,
    FailedPrecondition,
    NoLeader,
    NotLeader,
    OutcomeUnknown,
    Unavailable,
)
from chasqui_node.journal import Entry as JournalEntry
from chasqui_node.journal import Journal, JournalCorrupt, fsync_directory
from chasqui_node.raft_cipher import ClusterCipher
from chasqui_node.raft_transport import RaftConnection, RaftServer, RaftTransport
from chasqui_node.state_machine import StateMachine, Store
from chasqui_node.storage import (
    SnapshotCorrupt,
    SnapshotWriter,
    Storage,
    StorageError,
    VerifiedSnapshot,
    read_snapshot_header,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

ENTRIES_IN_FLIGHT_MAX = (
    16  # Raft entries proposed and not yet applied; more waiting = bigger batches
)
ENTRY_FORGOTTEN_S = 10.0  # an in-flight entry with no callback after this stops counting
SNAPSHOT_WRITE_WAIT_S = 60.0  # a stopping node lets the snapshot being written finish
SNAPSHOT_RETRY_S = 5.0  # after a failed snapshot write (a full disk), before the next one


class _AdaptiveZlib:
    """The zlib pysyncobj's TCP connections use: deflate only messages that shrink by half.

    pysyncobj deflates every Raft message at level 3 on the sending tick thread: 6.3 ms for
    an entry of 500 random 256-byte bodies (base64 in JSON: it shrinks only to 76%), 27 ms
    for 680 KB, once per follower, on the commit path. Bodies that compress well (repeated
    text) shrink to 1% in 1.5 ms and then cross the connection, the encryption and the
    journal of the follower far cheaper. So a 4 KiB sample from the middle of a message of
    8 KiB or more is deflated at level 1 (57 us); if it halves, the message is deflated at
    level 1, otherwise stored at level 0 (1.2 ms for 680 KB). Every form is the zlib format
    any pysyncobj node inflates, so nodes with and without this agree.
    """

    SAMPLE_BYTES = 4096

    @staticmethod
    def compress(data: bytes, level: int = -1) -> bytes:
        sample_bytes = _AdaptiveZlib.SAMPLE_BYTES
        if len(data) >= 2 * sample_bytes:
            middle = len(data) // 2
            sample = data[middle : middle + sample_bytes]
            if 2 * len(zlib.compress(sample, 1)) <= len(sample):
                return zlib.compress(data, 1)
        return zlib.compress(data, 0)

    decompress = staticmethod(zlib.decompress)


pysyncobj.tcp_connection.zlib = _AdaptiveZlib

# pysyncobj pickles commands and messages with protocol 2, which has no bytes opcode: bytes
# travel as a latin-1 str re-encoded as UTF-8 (1.5x for random bodies, slowly, and once more
# when the pickled command is pickled into an append-entries message). Protocol 4 keeps them
# verbatim. Unpickling reads any protocol, so nodes with and without this understand each
# other; the packed entry format (commands.py) relies on it.
RAFT_PICKLE_PROTOCOL = 4
setattr(pysyncobj.pickle, "__protocol", RAFT_PICKLE_PROTOCOL)  # the module's global


# pysyncobj's transport and server build connections, and the transport its server, by
# these names in their modules; the node passes `RaftTransport` to pysyncobj itself.
pysyncobj.transport.TcpConnection = RaftConnection
pysyncobj.tcp_server.TcpConnection = RaftConnection
pysyncobj.transport.TcpServer = RaftServer


def _send_rest_when_writable(connection: Any) -> None:
    """Have the poller finish sending what a pysyncobj connection could not send at once.

    A message larger than the socket's free buffer (an entry of 500 messages is 240 KB on the
    wire) is sent in part; pysyncobj keeps the rest but asks the poller for write readiness
    only after a write event, not after a send, so the rest went out with the connection's
    next message: a heartbeat period later when nothing else was sent. The tick thread owns
    the poller and every send, so this runs there."""
    if connection._TcpConnection__writeBuffer and connection.fileno() is not None:
        connection._TcpConnection__poller.subscribe(
            connection.fileno(),
            connection._TcpConnection__processConnection,
            POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE | POLL_EVENT_TYPE.ERROR,
        )


# The key of an append-entries message that carries the leader's cluster time (clock.py).
CLUSTER_TIME_KEY = "chasqui_cluster_time_ms"

# The first byte of pysyncobj's own membership-change entries (ours are ASCII text).
_MEMBERSHIP_COMMAND = bytes([pysyncobj.syncobj._COMMAND_TYPE.MEMBERSHIP])


@dataclass(frozen=True)
class Member:
    node_id: str
    client_address: str  # host:port where the node serves gRPC
    raft_address: str  # host:port where the node speaks Raft


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


def staggered_compaction_entries(entries_min: int, node_id: str, member_ids: Sequence[str]) -> int:
    """How long this node's Raft log grows before it snapshots and trims it: `entries_min`
    for the first member by id, up to half as much again for the last.

    A snapshot stops the node's tick thread while it is written (0.06-0.08 s for a 25 MB
    state). At one shared threshold every node wrote its snapshot at the same index, at the
    same moment, and commits stopped on all of them at once; staggered, a follower's pause no
    longer holds up the majority, and the nodes' cadences differ from then on."""
    ids = sorted(set(member_ids) | {node_id})
    return entries_min + entries_min * ids.index(node_id) // (2 * len(ids))


class Role(Enum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True)
class PeerStatus:
    member: Member
    connected: bool
    match_index: int
    aes_gcm: bool = False  # Raft messages to it are sealed with AES-GCM (raft_cipher.py)


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


class _EntryView(Sequence[JournalEntry]):
    """A slice of the journal that reads entries only when asked: pysyncobj slices the log
    from a follower's next index to the end and then stops at a byte budget."""

    def __init__(self, log: _DurableRaftLog, start: int, stop: int) -> None:
        self._log = log
        self._start = start
        self._stop = max(start, stop)

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, slice):
            return [self[i] for i in range(*item.indices(len(self)))]
        if item < 0:
            item += len(self)
        if not 0 <= item < len(self):
            raise IndexError(item)
        return self._log[self._start + item]

    def __iter__(self) -> Any:
        for position in range(self._start, self._stop):
            yield self._log[position]


class _DurableRaftLog(PysyncobjJournal):  # type: ignore[misc]
    """pysyncobj's `Journal` interface over Chasqui's fsynced `Journal`.

    Two departures from pysyncobj's own journal, both for durability:
    - Entries become durable in `sync()`, which the replicator calls before any reply leaves
      the node and at both ends of every tick (group commit; see `_RaftNode.__init__`).
    - pysyncobj's follower deletes every entry after the leader's `prevLogIdx` even when they
      match (not only on a term conflict, as Raft requires), then appends the same entries
      again. Here the delete is deferred and carried out only from the first conflicting
      entry added (see `_settle`): an acknowledged entry never leaves the disk.
    """

    def __init__(
        self,
        journal: Journal,
        snapshot_directory: Path,
        on_fatal: Callable[[str], None],
        applied_index: Callable[[], int] = lambda: 0,
    ) -> None:
        self._journal = journal
        self._on_fatal = on_fatal
        self._applied_index = applied_index
        self._snapshot_directory = snapshot_directory
        self._pending_cut: int | None = None  # position of a deferred deleteEntriesFrom
        self._commit_index = 1

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """A journal write that fails (disk full, I/O error) stops the node: it must not
        acknowledge or vote on what it could not persist. A restart cuts a torn tail back and
        catches up from the leader."""
        try:
            yield
        except OSError as error:
            self._on_fatal(f"cannot {what} in the Raft journal: {error}")
            raise

    def _settle(self, conflict: bool = False) -> None:
        """Carry out a deferred deleteEntriesFrom.

        pysyncobj's follower deletes every entry after the leader's prevLogIdx and adds the
        message's entries again, even when the ones it deletes match. Raft removes entries only
        from the first conflict: a follower that drops matching entries it has acknowledged
        (a leader re-sends a shorter range after a stale reject) lets the leader count them
        towards a commit the follower no longer holds, and a later leader may lack them. So a
        delete removes entries only when a conflicting entry is added (`conflict`); otherwise
        the entries after the message's last one stay. They are not yet known to match the
        leader, so `_RaftNode` keeps the commit index within what a message verified, as Raft
        does. One exception: pysyncobj has already undone any membership change in the deleted
        range and redoes only those it re-adds, so a tail holding one goes as pysyncobj
        expects, except applied entries (committed: they match every leader's log).
        A conflict at an applied index, which no correct run produces, is logged.
        """
        if self._pending_cut is None:
            return
        cut, self._pending_cut = self._pending_cut, None
        if cut >= len(self._journal):
            return
        if not conflict and not self._holds_membership_change(cut):
            return
        applied_end = self._applied_index() - self._journal.index_at(0) + 1
        if cut < applied_end:
            if not conflict:
                cut = applied_end
                if cut >= len(self._journal):
                    return
            else:
                logger.critical(
                    "dropping log entries from index %d although entries up to %d are "
                    "applied: this replica may diverge",
                    self._journal.index_at(cut),
                    self._applied_index(),
                )
        with self._writing("truncate entries"):
            self._journal.truncate_from(cut)

    def _holds_membership_change(self, start: int) -> bool:
        return any(
            self._entry(position)[0][:1] == _MEMBERSHIP_COMMAND
            for position in range(start, len(self._journal))
        )

    def holds(self, index: int, term: int) -> bool:
        """True when the log has an entry at `index` from `term`: by Raft's log matching it
        then agrees with any leader's log up to `index`."""
        self._settle()
        if len(self._journal) == 0:
            return False
        position = index - self._journal.index_at(0)
        return 0 <= position < len(self._journal) and self._entry(position)[2] == term

    def sync(self) -> None:
        self._settle()
        with self._writing("sync entries"):
            self._journal.sync()

    def add(self, command: bytes, idx: int, term: int) -> None:
        if self._pending_cut is not None:
            position = self._pending_cut
            if position < len(self._journal):
                stored_command, stored_index, stored_term = self._entry(position)
                if (stored_index, stored_term, stored_command) == (idx, term, bytes(command)):
                    self._pending_cut = position + 1
                    if self._pending_cut >= len(self._journal):
                        self._pending_cut = None
                    return
            self._settle(conflict=True)
        with self._writing("append an entry"):
            self._journal.append(bytes(command), idx, term)

    def clear(self) -> None:
        self._pending_cut = None
        with self._writing("clear entries"):
            self._journal.clear()

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        self._settle()
        if entryFrom < len(self._journal):
            self._pending_cut = entryFrom

    def deleteEntriesTo(self, entryTo: int) -> None:
        # The snapshot covering these entries is in place (`_BackgroundSnapshot` fsyncs the
        # directory after its rename; a snapshot installed from the leader was renamed
        # without): make that rename durable before the entries disappear.
        self._settle()
        # pysyncobj reads the first and last entries everywhere: never compact to nothing (it
        # asks for that when its log ended before the snapshot's index; see `_settle`).
        entry_to = min(entryTo, len(self._journal) - 1)
        with self._writing("compact entries"):
            fsync_directory(self._snapshot_directory)
            self._journal.drop_before(entry_to)

    def __getitem__(self, item: Any) -> Any:
        self._settle()
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self._journal))
            assert step == 1, "pysyncobj slices the log contiguously"
            return _EntryView(self, start, stop)
        return self._entry(item)

    def _entry(self, position: int) -> JournalEntry:
        try:
            return self._journal.entry(position)
        except JournalCorrupt as error:
            # Serving or voting with a damaged entry could lose confirmed messages: stop.
            self._on_fatal(str(error))
            raise

    def __len__(self) -> int:
        self._settle()
        return len(self._journal)

    def _destroy(self) -> None:
        self.sync()
        self._journal.close()

    def flush(self) -> None:
        self.sync()

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        # Not persisted: after a restart the leader tells followers the commit index again,
        # and applied entries are tracked by the state's own applied index.
        self._commit_index = raftCommitIndex

    def getRaftCommitIndex(self) -> int:
        return self._commit_index

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        with self._writing("record the term and vote"):
            self._journal.set_term(term, None if votedForNodeId is None else str(votedForNodeId))

    def getCurrentTerm(self) -> int:
        return self._journal.term

    def getVotedForNodeId(self) -> Any:
        return self._journal.voted_for

    def onOneSecondTimer(self) -> None:
        pass


class _SnapshotReceiver:
    """Takes a leader's snapshot chunks (pysyncobj's serializer.setTransmissionData) into a
    staging file, and hands it to pysyncobj for installing only when `accept` says so.

    pysyncobj writes the chunks straight over the node's own snapshot file and then clears the
    Raft log, whatever the snapshot holds. A leader may send a snapshot the follower does not
    need (a stale "reset" reply makes it walk back after the follower caught up); clearing the
    log then drops entries the follower had acknowledged, and the leader, which counted them,
    commits entries that only it holds (the fault suite saw confirmed messages lost when such a
    leader was deposed). Raft installs a snapshot only when it brings something new (the Raft
    paper, section 7); anything else is dropped without a reply, and the leader goes on sending
    entries after the snapshot's index as usual.
    """

    def __init__(self, target: str, accept: Callable[[str], bool]) -> None:
        self._target = target
        self._staging = target + ".incoming"
        self._accept = accept
        self._file: Any = None
        self.completed = False  # the last chunk taken completed a snapshot to install
        with suppress(FileNotFoundError):
            os.unlink(self._staging)  # a transfer cut short by a stop

    def __call__(self, data: Any) -> bool:
        """pysyncobj's contract: True once a complete snapshot is in place for loading."""
        self.completed = self._take(data)
        return self.completed

    def _take(self, data: Any) -> bool:
        if data is None:
            return False
        chunk, is_first, is_last = data
        try:
            if is_first:
                self._close()
                self._file = open(self._staging, "wb")  # noqa: SIM115 (spans many calls)
            elif self._file is None:
                return False  # the start of this transfer was missed; the leader resends
            self._file.write(chunk)
            if not is_last:
                return False
            self._close()
            if not self._accept(self._staging):
                os.unlink(self._staging)
                return False
            os.replace(self._staging, self._target)  # fsynced by Storage.install_snapshot
            return True
        except OSError as error:
            logger.warning("cannot receive a snapshot from the leader: %s", error)
            self._close()
            return False

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _BackgroundSnapshot:
    """Writes this node's snapshots beside the tick thread: pysyncobj's `serializer` and
    `serializeChecker`.

    A snapshot copies the whole applied state, hashes it and fsyncs it: 1.9 s for an 850 MB
    state (a backlog of 600k messages of 1 KiB). On the tick thread that stopped Raft on the
    node meanwhile, so a leader missed its heartbeats and was deposed at every compaction.
    Now the tick thread only fixes the contents (an LMDB read transaction at the applied
    index, `Storage.snapshot_writer`) and a thread writes them to `<snapshot>.writing`, fsyncs
    it, renames it over the snapshot and fsyncs the directory. pysyncobj asks `progress` every
    tick and trims the log only after it reports SUCCESS, so the entries the snapshot covers
    stay in the journal until the snapshot that replaces them is durable.

    pysyncobj renames the path it passed to `start` over the snapshot when `start` returns;
    `start` makes sure no file is there, so that rename fails, which pysyncobj takes quietly
    (with a checker, only the checker's answer counts). While a write runs, pysyncobj sends no
    snapshot to lagging followers; a snapshot arriving from the leader waits for it
    (`wait`), so an older one of ours never lands over it. After a failure (a full disk: one
    error line) the next attempt waits `SNAPSHOT_RETRY_S`, reported as SERIALIZING.
    """

    def __init__(self, storage: Storage, target: str, node_id: str) -> None:
        self._storage = storage
        self._target = target
        self._writing = target + ".writing"
        self._node_id = node_id
        self._thread: threading.Thread | None = None
        self._outcome: int | None = None  # SUCCESS or FAILED, until `progress` reports it
        self._failed_at: float | None = None  # monotonic time of the last failure
        self._paused_until: float | None = None  # no attempt before this, after a failure
        self._closed = False
        with suppress(FileNotFoundError):
            os.unlink(self._writing)  # a write cut short by a stop

    def start(self, path: str, raft_data: Any) -> None:
        """pysyncobj's serializer, on the tick thread. Never raises."""
        with suppress(OSError):  # left by a stop during a write before this class existed
            os.unlink(path)  # pysyncobj would rename it over the snapshot when this returns
        if self._failed_at is not None and time.monotonic() < self._failed_at + SNAPSHOT_RETRY_S:
            # pysyncobj asks again right after a failure (a full disk): `progress` answers
            # SERIALIZING until the pause is over, so a lasting failure costs one attempt and
            # one log line per pause. Nothing runs meanwhile.
            self._paused_until = self._failed_at + SNAPSHOT_RETRY_S
            return
        try:
            writer = self._storage.snapshot_writer(pickle.dumps(raft_data, protocol=4))
        except StorageError as error:
            self._failed(None, f"cannot start a snapshot: {error}")
            return
        self._thread = threading.Thread(
            target=self._write, args=(writer,), name="chasqui-snapshot", daemon=True
        )
        self._thread.start()

    def _write(self, writer: SnapshotWriter) -> None:
        started = time.monotonic()
        try:
            writer.write(self._writing)
            os.replace(self._writing, self._target)
            fsync_directory(Path(self._target).parent)
        except (OSError, StorageError) as error:
            self._failed(writer, f"cannot write a snapshot: {error}")
            return
        except Exception:
            logger.exception("node %s: writing a snapshot failed", self._node_id)
            self._failed(writer, "writing a snapshot failed (see above)")
            return
        self._failed_at = None
        logger.info(
            "wrote a snapshot at applied index %d: %.1f MB in %.3f s",
            writer.applied_index,
            os.path.getsize(self._target) / 1e6,
            time.monotonic() - started,
        )
        self._outcome = SERIALIZER_STATE.SUCCESS

    def _failed(self, writer: SnapshotWriter | None, reason: str) -> None:
        if writer is not None:
            writer.discard()
        with suppress(OSError):
            os.unlink(self._writing)
        logger.error(
            "node %s: %s; the log is kept, next attempt in %g s",
            self._node_id,
            reason,
            SNAPSHOT_RETRY_S,
        )
        self._failed_at = time.monotonic()
        self._outcome = SERIALIZER_STATE.FAILED

    def progress(self) -> int:
        """pysyncobj's serializeChecker, on the tick thread: SUCCESS or FAILED once per
        snapshot, SERIALIZING while one is written, NOT_SERIALIZING otherwise."""
        outcome = self._outcome
        if outcome is not None:
            self._outcome = None
            self._thread = None
            return outcome
        if self._paused_until is not None:
            if time.monotonic() < self._paused_until and not self._closed:
                return int(SERIALIZER_STATE.SERIALIZING)
            self._paused_until = None
            return int(SERIALIZER_STATE.FAILED)  # pysyncobj asks again: the real attempt
        state: int = (
            SERIALIZER_STATE.SERIALIZING
            if self._thread is not None
            else SERIALIZER_STATE.NOT_SERIALIZING
        )
        return state

    def wait(self, timeout_s: float | None = None) -> None:
        """Until the snapshot being written (if any) is in place or has failed (a pause after
        a failure writes nothing and is not waited for)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def close(self, timeout_s: float) -> None:
        """Let a write in progress finish, within `timeout_s`; a pause after a failure ends."""
        self._closed = True
        self.wait(timeout_s)


_JOURNAL_FACTORY_LOCK = threading.Lock()


class _BenignTruncationFilter(logging.Filter):
    """pysyncobj logs CRITICAL "truncating already-applied log entries" whenever a leader
    re-sends entries a follower already holds, before it deletes and re-adds them. The
    adapter keeps matching entries, so nothing applied is lost; it logs its own CRITICAL
    ("dropping log entries ... applied") when entries really go. Drop pysyncobj's alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("truncating already-applied log entries")


logging.getLogger("pysyncobj.syncobj").addFilter(_BenignTruncationFilter())


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
    """pysyncobj's view of the node: one replicated method."""

    _SyncObj__raftCommitIndex: int  # pysyncobj's commit index (see _SyncObj__onMessageReceived)

    def __init__(
        self,
        self_address: str,
        other_addresses: list[str],
        conf: SyncObjConf,
        apply_encoded: Callable[[int, str | bytes], list[Result] | None],
        raft_log: _DurableRaftLog,
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
                _send_rest_when_writable(connection)
            return sent

        transport.send = send_after_sync
        self.addOnTickCallback(self._send_deferred_append_entries)
        self.addOnTickCallback(raft_log.sync)
        self._snapshot_receiver = _SnapshotReceiver(conf.fullDumpFile, accept_snapshot)
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
          Raft log adapter keeps matching entries after it (see `_DurableRaftLog._settle`),
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
        timings: RaftTimings = RaftTimings(),
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
        # Entries handed to pysyncobj and not yet called back, by token, with submit time.
        # Bounding them makes concurrent proposals pile up into bigger entries under load.
        self._in_flight: dict[int, float] = {}
        self._in_flight_changed = threading.Condition()
        self._next_token = 0
        self._closed = threading.Event()
        self._riders = RiderBoard()
        self.clock = ClusterClock(storage.read(state_machine.clock_ms))

        data_dir.mkdir(parents=True, exist_ok=True)
        snapshot_path = data_dir / "raft.snapshot"
        # A snapshot verified here or by `_accept_snapshot`, with its file's identity, handed to
        # the `_read_snapshot` pysyncobj calls next, so the same file is not hashed twice.
        self._verified_snapshot: tuple[tuple[int, int, int], VerifiedSnapshot] | None = None
        self._snapshots = _BackgroundSnapshot(storage, str(snapshot_path), node_id)
        if snapshot_path.exists():
            # Verify before anything starts: a node must not serve or vote on top of a
            # snapshot it cannot trust (raises SnapshotCorrupt, a StorageError).
            verified = read_snapshot_header(str(snapshot_path))
            self._verified_snapshot = (_file_identity(str(snapshot_path)), verified)
        self._raft_log = _DurableRaftLog(
            Journal(data_dir / "journal", fsync=fsync, on_sync=on_journal_sync),
            data_dir,
            self._on_fatal,
            applied_index=lambda: storage.applied_index,
        )
        raft_port = self._self.raft_address.rsplit(":", 1)[1]
        conf = SyncObjConf(
            password=cluster_secret,
            bindAddress=f"{bind_host or self._self.raft_address.rsplit(':', 1)[0]}:{raft_port}",
            fullDumpFile=str(snapshot_path),
            serializer=self._snapshots.start,
            serializeChecker=self._snapshots.progress,
            deserializer=self._read_snapshot,
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
            logCompactionMinEntries=staggered_compaction_entries(
                timings.log_compaction_entries_min, node_id, [m.node_id for m in members]
            ),
            commandsWaitLeader=False,
            dynamicMembershipChange=True,
            onStateChanged=self._on_state_changed,
        )
        others = [m.raft_address for m in members if m.node_id != node_id]
        self._raft = _RaftNode(
            self._self.raft_address,
            others,
            conf,
            self._apply_encoded,
            self._raft_log,
            self._accept_snapshot,
            self.clock,
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
        if self._raft._isLeader():
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
            token = self._reserve_in_flight()
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

    def _reserve_in_flight(self) -> int:
        """Wait for room among in-flight entries and return a token for the next one.

        pysyncobj calls back every entry it accepted, but a lost callback must not stall
        proposing for good: entries older than ENTRY_FORGOTTEN_S stop counting.
        """
        with self._in_flight_changed:
            while len(self._in_flight) >= ENTRIES_IN_FLIGHT_MAX:
                oldest_allowed = time.monotonic() - ENTRY_FORGOTTEN_S
                for token, submitted in list(self._in_flight.items()):
                    if submitted < oldest_allowed:
                        del self._in_flight[token]
                self._in_flight_changed.wait(timeout=0.5)
            self._next_token += 1
            self._in_flight[self._next_token] = time.monotonic()
            return self._next_token

    def _release_in_flight(self, token: int) -> None:
        with self._in_flight_changed:
            self._in_flight.pop(token, None)
            self._in_flight_changed.notify()

    def _submit(self, token: int, batch: list[_Proposal], commands: list[Command]) -> None:
        entry = Entry(now_ms=self.clock.stamp_ms(), commands=tuple(commands))
        data = encode_for_raft(entry)

        def on_committed(results: list[Result] | None, error: int) -> None:
            # Runs on the tick thread. Must never raise (pysyncobj would apply again).
            try:
                self._release_in_flight(token)
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
            if isinstance(data, bytes):
                self._raft.apply_packed(data, callback=on_committed)
            else:
                self._raft.apply_entry(data, callback=on_committed)
        except Exception as error:  # pysyncobj refused to queue it (queue full, destroyed)
            self._release_in_flight(token)
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

    def _accept_snapshot(self, path: str) -> bool:
        """Whether a snapshot received from the leader brings anything new (tick thread): not
        when its last entry is applied here already, or is in this node's log (then the
        entries up to it agree with the leader's, and the ones after it may be acknowledged)."""
        try:
            verified = read_snapshot_header(path)
            _command, last_index, last_term = pickle.loads(verified[1])[0]
        except (
            SnapshotCorrupt,
            pickle.UnpicklingError,
            ValueError,
            TypeError,
            IndexError,
        ) as error:
            logger.error(
                "node %s: declined a damaged snapshot from the leader: %s", self.node_id, error
            )
            return False
        self._snapshots.wait()  # our own snapshot, being written, must not land over this one
        applied = self._storage.applied_index
        if last_index <= applied or self._raft_log.holds(last_index, last_term):
            logger.info(
                "node %s: declined a snapshot at index %d (applied here: %d): nothing new",
                self.node_id,
                last_index,
                applied,
            )
            return False
        self._verified_snapshot = (_file_identity(path), verified)  # a rename keeps it
        return True

    def _read_snapshot(self, path: str) -> Any:
        # Called by pysyncobj on the tick thread at start-up and when a leader installs a
        # snapshot on this follower. A corrupt snapshot must never be served or voted on.
        handed, self._verified_snapshot = self._verified_snapshot, None
        verified = None
        with suppress(OSError):  # a missing file fails verification below
            if handed is not None and handed[0] == _file_identity(path):
                verified = handed[1]
        try:
            raft_data = pickle.loads(self._storage.install_snapshot(path, verified))
        except SnapshotCorrupt as error:
            self._on_fatal(str(error))
            raise
        except (OSError, StorageError) as error:
            # A full or failing disk: the state stays as it was, and pysyncobj would go on as
            # if the snapshot were installed. Stop, as when an apply fails; the restart loads
            # the snapshot again.
            self._on_fatal(f"cannot install the snapshot {path}: {error}")
            raise
        self.clock.observe(self._storage.read(self._state_machine.clock_ms))
        self._refresh_members()
        return raft_data

    def _on_state_changed(self, old: int, new: int) -> None:
        names = {0: "follower", 1: "candidate", 2: "leader"}
        logger.info(
            "node %s: %s -> %s (term %d)",
            self.node_id,
            names.get(old, old),
            names.get(new, new),
            self._raft.raftCurrentTerm,
        )

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
        present = f"partner_node_status_server_{raft_address}" in self._status_dict()
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

        change = self._raft.addNodeToCluster if adding else self._raft.removeNodeFromCluster
        change(raft_address, callback=on_committed)
        try:
            future.result(timeout=timeout_s)
        except FutureTimeout:
            raise OutcomeUnknown(
                f"the membership change was not seen committed within {timeout_s:.1f} s; retry"
            ) from None
        logger.info("node %s: %s %s", self.node_id, "added" if adding else "removed", raft_address)

    # -- status ------------------------------------------------------------------------------

    def is_leader(self) -> bool:
        return bool(self._raft._isLeader())

    def leader(self) -> Member | None:
        node = self._raft._getLeader()
        if node is None:
            return None
        return self._by_raft_address.get(getattr(node, "address", str(node)))

    def status(self) -> ReplicationStatus:
        raw = self._status_dict()
        roles = {0: Role.FOLLOWER, 1: Role.CANDIDATE, 2: Role.LEADER}
        aes_gcm = self._raft.peers_sealed_with_aes_gcm()
        peers = []
        for member in self.members:
            if member.node_id == self.node_id:
                continue
            key = member.raft_address
            peers.append(
                PeerStatus(
                    member=member,
                    connected=raw.get(f"partner_node_status_server_{key}", 0) == 2,
                    match_index=int(raw.get(f"match_idx_server_{key}", 0)),
                    aes_gcm=key in aes_gcm,
                )
            )
        return ReplicationStatus(
            node_id=self.node_id,
            role=roles.get(raw.get("state", 0), Role.FOLLOWER),
            term=int(raw.get("raft_term", 0)),
            leader=self.leader(),
            commit_index=int(raw.get("commit_idx", 0)),
            applied_index=int(raw.get("last_applied", 0)),
            log_length=int(raw.get("log_len", 0)),
            has_quorum=bool(raw.get("has_quorum", False)),
            peers=tuple(peers),
            cluster_time_ms=self.clock.now_ms(),
            clock_skew_s=self.clock.skew_s(),
        )

    def _status_dict(self) -> dict[str, Any]:
        # getStatus() iterates pysyncobj's dicts from this thread while the tick thread may
        # change them; a rare "changed size during iteration" is retried a few times.
        for _ in range(5):
            try:
                status: dict[str, Any] = self._raft.getStatus()
                return status
            except RuntimeError:
                time.sleep(0.001)
        return {}

    # -- shutdown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop proposing, fail waiting callers with UNAVAILABLE, stop Raft. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._pending.put(None)
        self._proposer.join(timeout=5)
        self._raft.destroy_synchronous()
        self._snapshots.close(SNAPSHOT_WRITE_WAIT_S)


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


def _file_identity(path: str) -> tuple[int, int, int]:
    """Inode, size and modification time: the same after a rename, new for a new file."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _exit_process(reason: str) -> None:
    logger.critical("stopping the node: %s", reason)
    logging.shutdown()
    os._exit(70)
