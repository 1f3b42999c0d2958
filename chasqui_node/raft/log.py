"""The durable Raft log: pysyncobj's `Journal` interface over Chasqui's fsynced `Journal`.

pysyncobj's own journal writes into an mmap and never fsyncs (ARCHITECTURE section 3), and its
follower deletes entries that match the leader's. `DurableRaftLog` is handed to pysyncobj in
place of its journal (node.py swaps `createJournal` for the constructor only); the two
departures it makes are in its docstring. pysyncobj's tick thread owns it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pysyncobj.syncobj
from pysyncobj.journal import Journal as PysyncobjJournal

from chasqui_node.journal import Entry as JournalEntry
from chasqui_node.journal import Journal, JournalCorrupt, fsync_directory

logger = logging.getLogger(__name__)

# The first byte of pysyncobj's own membership-change entries (ours are ASCII text).
MEMBERSHIP_COMMAND = bytes([pysyncobj.syncobj._COMMAND_TYPE.MEMBERSHIP])


class EntryView(Sequence[JournalEntry]):
    """A slice of the journal that reads entries only when asked: pysyncobj slices the log
    from a follower's next index to the end and then stops at a byte budget."""

    def __init__(self, log: DurableRaftLog, start: int, stop: int) -> None:
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


class DurableRaftLog(PysyncobjJournal):  # type: ignore[misc]
    """pysyncobj's `Journal` interface over Chasqui's fsynced `Journal`.

    Two departures from pysyncobj's own journal, both for durability:
    - Entries become durable in `sync()`, which the node calls before any reply leaves it
      and at both ends of every tick (group commit; see `_RaftNode.__init__` in node.py).
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
        leader, so `_RaftNode` (node.py) keeps the commit index within what a message verified,
        as Raft does. One exception: pysyncobj has already undone any membership change in the
        deleted range and redoes only those it re-adds, so a tail holding one goes as pysyncobj
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
            self._entry(position)[0][:1] == MEMBERSHIP_COMMAND
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
        # The snapshot covering these entries is in place (`BackgroundSnapshot` fsyncs the
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
            return EntryView(self, start, stop)
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
