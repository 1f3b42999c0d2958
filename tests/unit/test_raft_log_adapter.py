"""Unit tests of `DurableRaftLog`, the adapter from Chasqui's `Journal` to pysyncobj's journal.

They prove that:

1. it keeps pysyncobj's journal interface: `add`, `len`, `[int]` and `[slice]` (a lazy view
   whose `len`, iteration, indexing and sub-slicing agree with a list), `deleteEntriesFrom`,
   `deleteEntriesTo`, `clear`, term and vote, agreeing with a list-based model of Raft's log
   rule over random operation sequences (hypothesis);
2. Raft's rule where pysyncobj departs from it: a `deleteEntriesFrom` removes entries only from
   the first re-added entry that differs; re-added identical entries are kept without
   rewriting the file, and entries not re-added stay (they may be acknowledged);
3. what was added and synced, and the term and vote, survive a reopen;
4. a corrupt entry read through the adapter reports to `on_fatal` and raises `JournalCorrupt`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pysyncobj.journal import MemoryJournal

from chasqui_node.journal import Entry, Journal, JournalCorrupt
from chasqui_node.raft.log import MEMBERSHIP_COMMAND, DurableRaftLog, EntryView

HEADER = 24  # u32 length | u32 crc32 | u64 index | u64 term


def open_log(directory: Path) -> tuple[DurableRaftLog, list[str]]:
    fatal: list[str] = []
    return DurableRaftLog(Journal(directory / "j"), directory, on_fatal=fatal.append), fatal


def segment(directory: Path) -> Path:
    (path,) = sorted((directory / "j").glob("segment-*.log"))
    return path


def entries(count: int, first: int = 1, term: int = 1) -> list[Entry]:
    return [(f"cmd-{index:04d}".encode(), index, term) for index in range(first, first + count)]


def filled(directory: Path, count: int = 10) -> tuple[DurableRaftLog, list[str], list[Entry]]:
    log, fatal = open_log(directory)
    written = entries(count)
    for entry in written:
        log.add(*entry)
    log.sync()
    return log, fatal, written


def as_list(log: DurableRaftLog) -> list[Entry]:
    return [log[position] for position in range(len(log))]


def test_add_and_index_like_a_list(tmp_path: Path) -> None:
    log, _, written = filled(tmp_path, 5)
    assert len(log) == 5
    for position in range(-5, 5):
        assert log[position] == written[position]
    for position in [5, -6]:
        with pytest.raises(IndexError):
            log[position]
    log._destroy()


SLICES = [
    slice(None),
    slice(3, None),
    slice(None, 4),
    slice(-3, None),
    slice(2, -2),
    slice(6, 2),
    slice(10, None),
    slice(100, 200),
    slice(-100, 3),
]
SUB_SLICES = [
    slice(None),
    slice(1, None),
    slice(None, -1),
    slice(None, None, 2),
    slice(None, None, -1),
    slice(5, 1),
]


@pytest.mark.parametrize("outer", SLICES, ids=str)
def test_slice_is_a_view_that_agrees_with_a_list(tmp_path: Path, outer: slice) -> None:
    log, _, written = filled(tmp_path, 10)
    view = log[outer]
    model = written[outer]
    assert isinstance(view, EntryView)
    assert len(view) == len(model)
    assert list(view) == model
    for position in range(-len(model), len(model)):
        assert view[position] == model[position]
    for position in [len(model), -len(model) - 1]:
        with pytest.raises(IndexError):
            view[position]
    for inner in SUB_SLICES:
        sub = view[inner]
        assert type(sub) is list
        assert sub == model[inner]
    log._destroy()


def test_slice_reads_nothing_until_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log, _, written = filled(tmp_path, 10)
    reads: list[int] = []
    original = Journal.entry

    def counting(journal: Journal, position: int) -> Entry:
        reads.append(position)
        return original(journal, position)

    monkeypatch.setattr(Journal, "entry", counting)
    view = log[2:]
    assert (len(view), reads) == (8, [])
    assert view[0] == written[2]
    assert reads == [2]
    log._destroy()


def test_re_adding_the_same_entries_after_delete_does_not_rewrite(tmp_path: Path) -> None:
    log, _, written = filled(tmp_path, 10)
    path = segment(tmp_path)
    before, stat = path.read_bytes(), path.stat()

    log.deleteEntriesFrom(5)
    for entry in written[5:]:
        log.add(*entry)
    log.sync()

    after = path.stat()
    assert path.read_bytes() == before
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        stat.st_ino,
        stat.st_size,
        stat.st_mtime_ns,
    )
    assert len(log) == 10
    assert as_list(log) == written
    log._destroy()


def test_partial_re_add_keeps_the_matching_tail(tmp_path: Path) -> None:
    """A leader re-sending a shorter range (after a stale reject) must not take away entries
    the follower acknowledged: Raft removes entries only from a conflict."""
    log, _, written = filled(tmp_path, 10)
    path = segment(tmp_path)
    before = path.read_bytes()

    log.deleteEntriesFrom(5)
    log.add(*written[5])
    log.add(*written[6])
    assert len(log) == 10
    assert log[-1] == written[9]
    log.sync()
    assert path.read_bytes() == before
    log._destroy()

    reopened, _ = open_log(tmp_path)
    assert as_list(reopened) == written
    reopened._destroy()


def test_re_add_of_a_different_entry_truncates_from_there(tmp_path: Path) -> None:
    log, _, written = filled(tmp_path, 10)
    log.deleteEntriesFrom(5)
    log.add(*written[5])
    log.add(b"other", 7, 2)  # same index, newer term
    log.add(b"next", 8, 2)
    expected = [*written[:6], (b"other", 7, 2), (b"next", 8, 2)]
    assert len(log) == 8
    assert as_list(log) == expected
    log._destroy()
    reopened, _ = open_log(tmp_path)
    assert as_list(reopened) == expected
    reopened._destroy()


def test_re_add_with_same_index_and_term_but_other_command_truncates(tmp_path: Path) -> None:
    log, _, written = filled(tmp_path, 4)
    log.deleteEntriesFrom(2)
    log.add(b"different", 3, 1)
    assert as_list(log) == [*written[:2], (b"different", 3, 1)]
    log._destroy()


@pytest.mark.parametrize("look", ["len", "last", "slice", "sync", "destroy"])
def test_delete_with_nothing_re_added_keeps_the_tail(tmp_path: Path, look: str) -> None:
    log, _, written = filled(tmp_path, 10)
    log.deleteEntriesFrom(4)  # a heartbeat with an old prevLogIdx: nothing conflicts
    if look == "len":
        assert len(log) == 10
    elif look == "last":
        assert log[-1] == written[9]
    elif look == "slice":
        assert list(log[:]) == written
    elif look == "sync":
        log.sync()
    log._destroy()
    reopened, _ = open_log(tmp_path)
    assert as_list(reopened) == written
    reopened._destroy()


def test_delete_past_the_end_changes_nothing(tmp_path: Path) -> None:
    log, _, written = filled(tmp_path, 3)
    log.deleteEntriesFrom(3)
    log.add(b"next", 4, 1)
    assert as_list(log) == [*written, (b"next", 4, 1)]
    log._destroy()


def test_second_delete_settles_the_first(tmp_path: Path) -> None:
    log, _, written = filled(tmp_path, 10)
    log.deleteEntriesFrom(5)
    log.add(*written[5])
    log.add(*written[6])
    log.deleteEntriesFrom(6)
    log.add(b"other", 7, 2)  # conflicts with the second delete's position, not the first's
    assert as_list(log) == [*written[:6], (b"other", 7, 2)]
    log._destroy()


def test_delete_entries_to_drops_the_prefix_and_survives_reopen(tmp_path: Path) -> None:
    log, _, written = filled(tmp_path, 10)
    log.deleteEntriesTo(4)
    assert as_list(log) == written[4:]
    assert log[0][1] == 5
    log.add(b"more", 11, 1)
    log._destroy()
    reopened, _ = open_log(tmp_path)
    assert as_list(reopened) == [*written[4:], (b"more", 11, 1)]
    reopened._destroy()


def test_delete_entries_to_after_a_pending_delete_from(tmp_path: Path) -> None:
    log, _, written = filled(tmp_path, 10)
    log.deleteEntriesFrom(8)
    log.deleteEntriesTo(3)
    assert as_list(log) == written[3:]
    log._destroy()


def test_clear_discards_a_pending_delete_and_takes_a_fresh_index(tmp_path: Path) -> None:
    log, _, _ = filled(tmp_path, 10)
    log.deleteEntriesFrom(5)
    log.clear()
    assert len(log) == 0
    log.add(b"snapshot", 200, 4)
    log.add(b"after", 201, 4)
    log._destroy()
    reopened, _ = open_log(tmp_path)
    assert as_list(reopened) == [(b"snapshot", 200, 4), (b"after", 201, 4)]
    reopened._destroy()


@pytest.mark.parametrize("vote", ["10.0.0.2:7000", None])
def test_term_and_vote_survive_reopen(tmp_path: Path, vote: str | None) -> None:
    log, _ = open_log(tmp_path)
    assert (log.getCurrentTerm(), log.getVotedForNodeId()) == (0, None)
    log.setCurrentTerm(5, vote)
    assert (log.getCurrentTerm(), log.getVotedForNodeId()) == (5, vote)
    log._destroy()
    reopened, _ = open_log(tmp_path)
    assert (reopened.getCurrentTerm(), reopened.getVotedForNodeId()) == (5, vote)
    reopened._destroy()


def test_synced_adds_survive_reopen(tmp_path: Path) -> None:
    log, _ = open_log(tmp_path)
    written = entries(4, first=1)
    for entry in written:
        log.add(*entry)
    log.sync()
    reopened, _ = open_log(tmp_path)  # the first is never closed: as after a crash
    assert as_list(reopened) == written
    reopened._destroy()
    log._destroy()


def test_commit_index_is_kept_in_memory(tmp_path: Path) -> None:
    log, _ = open_log(tmp_path)
    assert log.getRaftCommitIndex() == 1
    log.setRaftCommitIndex(7)
    assert log.getRaftCommitIndex() == 7
    log._destroy()


def _corrupt_cold(tmp_path: Path) -> tuple[DurableRaftLog, list[str], list[Entry]]:
    """A reopened log (nothing cached) whose entry at position 2 is damaged on disk."""
    log, _, written = filled(tmp_path, 5)
    log._destroy()
    cold, fatal = open_log(tmp_path)
    path = segment(tmp_path)
    data = bytearray(path.read_bytes())
    data[2 * (HEADER + 8) + HEADER + 1] ^= 0xFF  # 8-byte commands: inside entry 3's command
    path.write_bytes(bytes(data))
    return cold, fatal, written


@pytest.mark.parametrize("how", ["int", "negative", "view", "iterate", "re_add"])
def test_corrupt_entry_read_through_adapter_is_fatal(tmp_path: Path, how: str) -> None:
    log, fatal, written = _corrupt_cold(tmp_path)
    assert log[1] == written[1]
    with pytest.raises(JournalCorrupt):
        if how == "int":
            log[2]
        elif how == "negative":
            log[-3]
        elif how == "view":
            log[1:][1]
        elif how == "iterate":
            list(log[:])
        else:
            log.deleteEntriesFrom(2)
            log.add(*written[2])
    assert len(fatal) == 1
    assert "3" in fatal[0]
    log._journal.close()


# -- property: the adapter against a model of Raft's log rule --------------------------------


class RaftLogModel:
    """pysyncobj's MemoryJournal with Raft's removal rule: a delete takes effect only at the
    first added entry that differs from the stored one at its position."""

    def __init__(self) -> None:
        self.journal = MemoryJournal()
        self.pending: int | None = None

    def add(self, command: bytes, index: int, term: int) -> None:
        if self.pending is not None and self.pending < len(self.journal):
            if self.journal[self.pending] == (command, index, term):
                self.pending += 1
                return
            self.journal.deleteEntriesFrom(self.pending)
        self.pending = None
        self.journal.add(command, index, term)

    def deleteEntriesFrom(self, position: int) -> None:
        self.pending = position

    def deleteEntriesTo(self, position: int) -> None:
        self.pending = None
        self.journal.deleteEntriesTo(position)

    def clear(self) -> None:
        self.pending = None
        self.journal.clear()

    def settle(self) -> None:
        self.pending = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.journal, name)

    def __len__(self) -> int:
        return len(self.journal)

    def __getitem__(self, item: Any) -> Any:
        return self.journal[item]


_operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 4), st.integers(0, 3)),
        st.tuples(st.just("replicate"), st.integers(0, 12), st.lists(st.booleans(), max_size=6)),
        st.tuples(st.just("deleteEntriesFrom"), st.integers(0, 12)),
        st.tuples(st.just("deleteEntriesTo"), st.integers(0, 12)),
        st.tuples(st.just("clear"), st.integers(1, 1000)),
        st.tuples(
            st.just("setCurrentTerm"), st.integers(0, 9), st.sampled_from([None, "a:1", "b:2"])
        ),
        st.tuples(st.just("sync")),
        st.tuples(st.just("reopen")),
    ),
    max_size=25,
)


@settings(max_examples=50, deadline=None)
@given(operations=_operations)
def test_random_operations_agree_with_pysyncobj_memory_journal(
    tmp_path_factory: pytest.TempPathFactory, operations: list[tuple[Any, ...]]
) -> None:
    directory = tmp_path_factory.mktemp("raftlog")
    log, fatal = open_log(directory)
    model = RaftLogModel()
    next_index = 1

    def both(name: str, *args: object) -> None:
        getattr(log, name)(*args)
        getattr(model, name)(*args)

    for operation in operations:
        kind = operation[0]
        if kind == "add":
            for _ in range(operation[1]):
                both("add", f"c{next_index}".encode(), next_index, operation[2])
                next_index += 1
        elif kind == "replicate":
            # A follower receiving entries from `position` on: pysyncobj deletes from there,
            # then adds the leader's entries, which match what is stored (True) or not.
            position, matches = operation[1], operation[2]
            if position > len(model):
                continue
            stored = list(model[position:])
            base = (
                model[position - 1][1] + 1
                if position
                else (model[0][1] if len(model) else next_index)
            )
            both("deleteEntriesFrom", position)
            for offset, match in enumerate(matches):
                index = base + offset
                if match and offset < len(stored):
                    both("add", *stored[offset])
                else:
                    both("add", f"new{index}".encode(), index, 9)
            next_index = base + len(matches)
            next_index = max(next_index, model[-1][1] + 1 if len(model) else next_index)
        elif kind == "deleteEntriesTo":
            # The adapter never compacts to an empty log (pysyncobj reads its first and last
            # entries everywhere): it keeps the last entry where pysyncobj's would drop all.
            both(kind, min(operation[1], max(len(model) - 1, 0)))
            if len(model):
                next_index = model[-1][1] + 1
        elif kind == "deleteEntriesFrom":
            both(kind, operation[1])
        elif kind == "clear":
            both("clear")
            next_index = operation[1]
        elif kind == "setCurrentTerm":
            both("setCurrentTerm", operation[1], operation[2])
        elif kind == "sync":
            log.sync()
        else:
            log._destroy()
            log, fatal = open_log(directory)
        model.settle()  # the reads below settle the adapter's deferred delete
        assert len(log) == len(model)
        assert list(log[:]) == list(model[:])
        if len(model):
            assert log[-1] == model[-1]
            assert log[0] == model[0]
        assert log.getCurrentTerm() == model.getCurrentTerm()
        assert log.getVotedForNodeId() == model.getVotedForNodeId()
    log._destroy()
    assert fatal == []


def _applied_log(directory: Path, applied: int) -> DurableRaftLog:
    log = DurableRaftLog(
        Journal(directory / "j"), directory, on_fatal=[].append, applied_index=lambda: applied
    )
    for index in range(1, 9):
        log.add(f"c{index}".encode(), index, 1)
    return log


def test_a_blanket_delete_keeps_every_entry(tmp_path: Path) -> None:
    """pysyncobj deletes everything after an old prevLogIdx even when nothing conflicts; the
    adapter keeps the entries until a conflicting one arrives."""
    log = _applied_log(tmp_path, applied=6)
    log.deleteEntriesFrom(2)  # a heartbeat with prevLogIdx 2: nothing re-added
    assert [entry[1] for entry in log[:]] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_blanket_delete_over_a_membership_change_drops_the_unapplied_tail(
    tmp_path: Path,
) -> None:
    """pysyncobj undid the membership change in the deleted range and redoes only what it
    re-adds: the log follows it, except applied (committed) entries."""
    log = _applied_log(tmp_path, applied=5)
    log.add(MEMBERSHIP_COMMAND + b"change", 9, 1)
    log.deleteEntriesFrom(2)
    assert [entry[1] for entry in log[:]] == [1, 2, 3, 4, 5]


def test_a_conflict_at_an_applied_index_still_replaces_it(tmp_path: Path) -> None:
    log = _applied_log(tmp_path, applied=6)
    log.deleteEntriesFrom(4)
    log.add(b"other", 5, 2)  # index 4 kept (matches nothing sent), index 5 conflicts
    assert [(entry[1], entry[2]) for entry in log[:]] == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 2)]


def test_compaction_never_empties_the_log(tmp_path: Path) -> None:
    log = _applied_log(tmp_path, applied=8)
    log.deleteEntriesTo(len(log) + 3)  # pysyncobj asks past the end after a truncation
    assert [entry[1] for entry in log[:]] == [8]
