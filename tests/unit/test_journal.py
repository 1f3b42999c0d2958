"""Unit tests of the durable Raft journal (`chasqui_node.journal.Journal`), on real files.

They prove that:

1. what is appended reads back identically (command bytes, index, term) after a reopen, for
   empty, small and 1 MiB commands, with `len`, negative positions and `IndexError` behaving
   like a list, and that indexes must stay consecutive;
2. term and vote are durable across a reopen, and a damaged `meta.json` stops the node;
3. a torn tail (a record cut mid-header or mid-body, trailing zeroes, a bad CRC in the very
   last record) is cut back to the last whole record on open, after which appends work and
   survive another reopen; damage anywhere else raises `JournalCorrupt` and leaves the file
   untouched;
4. `truncate_from`, `drop_before` and `clear` give the right entries and indexes, also across
   segment boundaries, where whole old segment files are deleted;
5. entries read back from disk are CRC-checked, and neither the cache size nor `fsync=False`
   changes any result;
6. random sequences of append / truncate_from / drop_before / clear / reopen agree with a plain
   Python list (hypothesis).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chasqui_node import limits
from chasqui_node.journal import Entry, Journal, JournalCorrupt

HEADER = 24  # u32 length | u32 crc32 | u64 index | u64 term


def entries_of(journal: Journal) -> list[Entry]:
    return [journal.entry(position) for position in range(len(journal))]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.log"))


def only_segment(directory: Path) -> Path:
    (segment,) = segment_files(directory)
    return segment


def fill(journal: Journal, first: int, count: int, term: int = 1, size: int = 10) -> list[Entry]:
    """Append `count` entries with distinct `size`-byte commands; return them."""
    written = []
    for index in range(first, first + count):
        command = f"{index:0{size}d}".encode()[-size:] if size else b""
        journal.append(command, index, term)
        written.append((command, index, term))
    journal.sync()
    return written


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Roll segments after three 10-byte-command records (34 bytes each)."""
    monkeypatch.setattr(limits, "JOURNAL_SEGMENT_BYTES_MAX", 100)
    yield 3


# -- append and read back ---------------------------------------------------------------------


def test_appended_entries_read_back_identically_after_reopen(tmp_path: Path) -> None:
    commands = [b"", b"a", bytes(range(256)), b"\x00" * 17, bytes(1024 * 1024), b"\xff" * 3]
    written = [(command, 7 + n, 1 + n // 2) for n, command in enumerate(commands)]
    journal = Journal(tmp_path)
    for entry in written:
        journal.append(*entry)
    assert entries_of(journal) == written
    journal.close()

    reopened = Journal(tmp_path)
    assert entries_of(reopened) == written
    assert all(type(command) is bytes for command, _, _ in entries_of(reopened))
    reopened.close()


def test_len_and_negative_positions_behave_like_a_list(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    assert len(journal) == 0
    written = fill(journal, 5, 4)
    assert len(journal) == 4
    for position in range(-4, 4):
        assert journal.entry(position) == written[position]
    assert list(journal.entries(1, 3)) == written[1:3]
    assert journal.index_at(0) == 5
    assert journal.index_at(4) == 9  # one past the end
    journal.close()


@pytest.mark.parametrize("position", [4, 5, 100, -5, -100])
def test_position_out_of_range_raises_index_error(tmp_path: Path, position: int) -> None:
    journal = Journal(tmp_path)
    fill(journal, 1, 4)
    with pytest.raises(IndexError):
        journal.entry(position)
    journal.close()


@pytest.mark.parametrize("position", [0, -1])
def test_empty_journal_has_no_entries(tmp_path: Path, position: int) -> None:
    journal = Journal(tmp_path)
    with pytest.raises(IndexError):
        journal.entry(position)
    journal.close()


@pytest.mark.parametrize("index", [10, 12, 1, 9, 0])
def test_append_of_non_consecutive_index_is_rejected(tmp_path: Path, index: int) -> None:
    journal = Journal(tmp_path)
    written = fill(journal, 7, 4)  # next index is 11
    with pytest.raises(ValueError):
        journal.append(b"x", index, 1)
    assert entries_of(journal) == written
    journal.append(b"next", 11, 1)
    journal.close()
    assert entries_of(Journal(tmp_path)) == [*written, (b"next", 11, 1)]


def test_first_append_may_start_at_any_index(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append(b"first", 1000, 3)
    journal.close()
    assert entries_of(Journal(tmp_path)) == [(b"first", 1000, 3)]


# -- term and vote ----------------------------------------------------------------------------


def test_fresh_journal_has_term_zero_and_no_vote(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    assert (journal.term, journal.voted_for) == (0, None)
    journal.close()


@pytest.mark.parametrize("vote", ["10.0.0.1:4321", None])
def test_term_and_vote_survive_reopen(tmp_path: Path, vote: str | None) -> None:
    journal = Journal(tmp_path)
    journal.set_term(3, "other:1")
    journal.set_term(4, vote)
    journal.close()
    reopened = Journal(tmp_path)
    assert (reopened.term, reopened.voted_for) == (4, vote)
    reopened.close()


def test_term_survives_clear_and_drop_before(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.set_term(9, "me:1")
    fill(journal, 1, 5)
    journal.drop_before(2)
    journal.clear()
    journal.close()
    reopened = Journal(tmp_path)
    assert (reopened.term, reopened.voted_for, len(reopened)) == (9, "me:1", 0)
    reopened.close()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{not json",
        '{"meta": {"term": 4, "voted_for": null}, "crc32": 1}',  # wrong checksum
        '{"meta": {"term": 4}}',  # no checksum
        '{"crc32": 0}',  # no body
        "[]",
        "null",
    ],
)
def test_corrupt_meta_raises_journal_corrupt(tmp_path: Path, text: str) -> None:
    journal = Journal(tmp_path)
    journal.set_term(4, None)
    journal.close()
    (tmp_path / "meta.json").write_text(text)
    with pytest.raises(JournalCorrupt):
        Journal(tmp_path)


def test_meta_with_flipped_term_fails_its_checksum(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.set_term(4, "a:1")
    journal.close()
    record = json.loads((tmp_path / "meta.json").read_text())
    record["meta"]["term"] = 5
    (tmp_path / "meta.json").write_text(json.dumps(record))
    with pytest.raises(JournalCorrupt):
        Journal(tmp_path)


# -- torn tails and corruption ----------------------------------------------------------------


def _three_records(tmp_path: Path) -> tuple[list[Entry], Path, int]:
    """Three records with 10-byte commands; return them, the segment and the last's offset."""
    journal = Journal(tmp_path)
    written = fill(journal, 1, 3)
    journal.close()
    return written, only_segment(tmp_path), 2 * (HEADER + 10)


@pytest.mark.parametrize(
    "keep",
    [0, 1, 7, HEADER - 1, HEADER, HEADER + 1, HEADER + 9],
    ids=lambda keep: f"keep{keep}",
)
def test_torn_last_record_is_cut_back_and_appends_continue(tmp_path: Path, keep: int) -> None:
    written, segment, last = _three_records(tmp_path)
    with open(segment, "r+b") as out:
        out.truncate(last + keep)

    journal = Journal(tmp_path)
    assert entries_of(journal) == written[:2]
    assert segment.stat().st_size == last
    journal.append(b"after", 3, 2)
    journal.append(b"again", 4, 2)
    journal.close()

    expected = [*written[:2], (b"after", 3, 2), (b"again", 4, 2)]
    reopened = Journal(tmp_path)
    assert entries_of(reopened) == expected
    reopened.close()


@pytest.mark.parametrize("zeroes", [1, HEADER - 1, HEADER, 4096])
def test_trailing_zeroes_are_cut_as_a_torn_tail(tmp_path: Path, zeroes: int) -> None:
    written, segment, _ = _three_records(tmp_path)
    whole = segment.read_bytes()
    with open(segment, "ab") as out:
        out.write(bytes(zeroes))

    journal = Journal(tmp_path)
    assert entries_of(journal) == written
    assert segment.read_bytes() == whole
    journal.append(b"after", 4, 1)
    journal.close()
    assert entries_of(Journal(tmp_path)) == [*written, (b"after", 4, 1)]


@pytest.mark.parametrize(
    "offset", [4, 8, 16, HEADER, HEADER + 9], ids=["crc", "index", "term", "cmd0", "cmd9"]
)
def test_flipped_byte_in_last_record_is_treated_as_torn_tail(tmp_path: Path, offset: int) -> None:
    written, segment, last = _three_records(tmp_path)
    flip_byte(segment, last + offset)

    journal = Journal(tmp_path)
    assert entries_of(journal) == written[:2]
    journal.append(b"after", 3, 2)
    journal.close()
    assert entries_of(Journal(tmp_path)) == [*written[:2], (b"after", 3, 2)]


@pytest.mark.parametrize("record", [0, 1])
@pytest.mark.parametrize(
    "offset",
    [0, 4, 8, 16, HEADER, HEADER + 9],
    ids=["length-high", "crc", "index", "term", "cmd0", "cmd9"],
)
def test_flipped_byte_in_middle_record_raises_and_leaves_file_untouched(
    tmp_path: Path, record: int, offset: int
) -> None:
    _, segment, _ = _three_records(tmp_path)
    flip_byte(segment, record * (HEADER + 10) + offset)
    damaged = segment.read_bytes()
    with pytest.raises(JournalCorrupt):
        Journal(tmp_path)
    assert segment.read_bytes() == damaged


def test_middle_record_length_pointing_past_end_of_file_raises(tmp_path: Path) -> None:
    _, segment, _ = _three_records(tmp_path)
    data = bytearray(segment.read_bytes())
    data[HEADER + 10 + 2] ^= 0x01  # record 2's length grows by 256: past the end of the file
    segment.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt):
        Journal(tmp_path)
    assert segment.read_bytes() == bytes(data)


def test_bad_last_record_followed_by_zero_padding_is_a_torn_tail(tmp_path: Path) -> None:
    written, segment, last = _three_records(tmp_path)
    data = bytearray(segment.read_bytes())
    data[last + HEADER :] = bytes(10)  # the body of the last record never reached the disk
    data += bytes(4096)
    segment.write_bytes(bytes(data))
    journal = Journal(tmp_path)
    assert entries_of(journal) == written[:2]
    journal.close()


def test_flipped_byte_at_end_of_a_non_last_segment_raises(
    tmp_path: Path, small_segments: int
) -> None:
    journal = Journal(tmp_path)
    fill(journal, 1, 2 * small_segments + 1)
    journal.close()
    first = segment_files(tmp_path)[0]
    flip_byte(first, first.stat().st_size - 1)
    damaged = first.read_bytes()
    with pytest.raises(JournalCorrupt):
        Journal(tmp_path)
    assert first.read_bytes() == damaged


def test_torn_record_in_a_non_last_segment_raises(tmp_path: Path, small_segments: int) -> None:
    journal = Journal(tmp_path)
    fill(journal, 1, 2 * small_segments + 1)
    journal.close()
    first = segment_files(tmp_path)[0]
    with open(first, "r+b") as out:
        out.truncate(first.stat().st_size - 3)
    with pytest.raises(JournalCorrupt):
        Journal(tmp_path)


def test_missing_middle_segment_is_a_gap_and_raises(tmp_path: Path, small_segments: int) -> None:
    journal = Journal(tmp_path)
    fill(journal, 1, 3 * small_segments)
    journal.close()
    segments = segment_files(tmp_path)
    assert len(segments) == 3
    segments[1].unlink()
    with pytest.raises(JournalCorrupt):
        Journal(tmp_path)


def test_entry_read_from_disk_is_crc_checked(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    written = fill(journal, 1, 3)
    journal.close()
    cold = Journal(tmp_path)  # nothing cached yet
    flip_byte(only_segment(tmp_path), HEADER + 10 + HEADER + 4)  # command of entry 2
    assert cold.entry(0) == written[0]
    assert cold.entry(2) == written[2]
    with pytest.raises(JournalCorrupt):
        cold.entry(1)
    cold.close()


def test_entry_shorter_on_disk_than_indexed_raises(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    fill(journal, 1, 3)
    journal.close()
    cold = Journal(tmp_path)
    with open(only_segment(tmp_path), "r+b") as out:
        out.truncate(2 * (HEADER + 10) + 5)
    with pytest.raises(JournalCorrupt):
        cold.entry(2)
    cold.close()


# -- truncate_from, drop_before, clear --------------------------------------------------------


@pytest.mark.parametrize("position", [0, 1, 4, 5])
def test_truncate_from_survives_reopen(tmp_path: Path, position: int) -> None:
    journal = Journal(tmp_path)
    written = fill(journal, 1, 6)
    journal.truncate_from(position)
    assert entries_of(journal) == written[:position]
    journal.close()
    assert entries_of(Journal(tmp_path)) == written[:position]


@pytest.mark.parametrize("position", [6, 7, 100])
def test_truncate_from_at_or_past_end_changes_nothing(tmp_path: Path, position: int) -> None:
    journal = Journal(tmp_path)
    written = fill(journal, 1, 6)
    journal.truncate_from(position)
    journal.close()
    assert entries_of(Journal(tmp_path)) == written


def test_truncate_from_then_append_continues_at_the_cut_index(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    written = fill(journal, 10, 6)
    journal.truncate_from(2)
    with pytest.raises(ValueError):
        journal.append(b"old next", 16, 2)
    journal.append(b"new", 12, 2)
    journal.append(b"newer", 13, 2)
    expected = [*written[:2], (b"new", 12, 2), (b"newer", 13, 2)]
    assert entries_of(journal) == expected
    journal.close()
    assert entries_of(Journal(tmp_path)) == expected


def test_unsynced_appends_cut_by_truncate_from_do_not_come_back(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    written = fill(journal, 1, 2)
    journal.append(b"unsynced", 3, 1)
    journal.truncate_from(2)
    journal.append(b"other", 3, 2)
    journal.close()
    assert entries_of(Journal(tmp_path)) == [*written, (b"other", 3, 2)]


@pytest.mark.parametrize("position", [1, 3, 5])
def test_drop_before_keeps_exactly_the_suffix_with_its_indexes(
    tmp_path: Path, position: int
) -> None:
    journal = Journal(tmp_path)
    written = fill(journal, 20, 6)
    journal.drop_before(position)
    assert entries_of(journal) == written[position:]
    assert journal.index_at(0) == 20 + position
    journal.append(b"more", 26, 1)
    journal.close()
    reopened = Journal(tmp_path)
    assert entries_of(reopened) == [*written[position:], (b"more", 26, 1)]
    reopened.close()


@pytest.mark.parametrize("position", [0, -1])
def test_drop_before_nothing_changes_nothing(tmp_path: Path, position: int) -> None:
    journal = Journal(tmp_path)
    written = fill(journal, 1, 3)
    journal.drop_before(position)
    journal.close()
    assert entries_of(Journal(tmp_path)) == written


@pytest.mark.parametrize("how", ["drop_before_len", "drop_before_past_end", "clear"])
def test_forgetting_everything_then_appending_a_fresh_index_survives_reopen(
    tmp_path: Path, how: str
) -> None:
    journal = Journal(tmp_path)
    fill(journal, 1, 5)
    if how == "clear":
        journal.clear()
    else:
        journal.drop_before(5 if how == "drop_before_len" else 50)
    assert len(journal) == 0
    assert segment_files(tmp_path) == []
    journal.append(b"fresh", 500, 7)
    journal.append(b"fresher", 501, 7)
    journal.close()
    reopened = Journal(tmp_path)
    assert entries_of(reopened) == [(b"fresh", 500, 7), (b"fresher", 501, 7)]
    reopened.close()


def test_clear_then_lower_fresh_index_survives_reopen(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    fill(journal, 100, 5)
    journal.drop_before(2)
    journal.clear()
    journal.append(b"low", 3, 1)
    journal.close()
    assert entries_of(Journal(tmp_path)) == [(b"low", 3, 1)]


# -- segments ---------------------------------------------------------------------------------


def test_segments_roll_and_reopen_reads_across_them(tmp_path: Path, small_segments: int) -> None:
    journal = Journal(tmp_path)
    written = fill(journal, 1, 10)
    journal.close()
    assert [path.name for path in segment_files(tmp_path)] == [
        f"segment-{first:020d}.log" for first in (1, 4, 7, 10)
    ]
    reopened = Journal(tmp_path)
    assert entries_of(reopened) == written
    reopened.close()


@pytest.mark.parametrize(
    ("position", "left"),
    [(2, [1, 4, 7, 10]), (3, [4, 7, 10]), (4, [4, 7, 10]), (6, [7, 10]), (9, [10])],
)
def test_drop_before_deletes_whole_old_segments(
    tmp_path: Path, small_segments: int, position: int, left: list[int]
) -> None:
    journal = Journal(tmp_path)
    written = fill(journal, 1, 10)
    journal.drop_before(position)
    assert [path.name for path in segment_files(tmp_path)] == [
        f"segment-{first:020d}.log" for first in left
    ]
    assert entries_of(journal) == written[position:]
    journal.append(b"x" * 10, 11, 1)
    journal.close()
    reopened = Journal(tmp_path)
    assert entries_of(reopened) == [*written[position:], (b"x" * 10, 11, 1)]
    reopened.close()


@pytest.mark.parametrize(
    ("position", "left"),
    [(0, [1]), (2, [1]), (3, [1, 4]), (4, [1, 4]), (8, [1, 4, 7])],
)
def test_truncate_from_across_segments_deletes_later_segments(
    tmp_path: Path, small_segments: int, position: int, left: list[int]
) -> None:
    journal = Journal(tmp_path)
    written = fill(journal, 1, 10)
    journal.truncate_from(position)
    assert [path.name for path in segment_files(tmp_path)] == [
        f"segment-{first:020d}.log" for first in left
    ]
    assert entries_of(journal) == written[:position]
    rewritten = fill(journal, position + 1, 5, term=2)
    journal.close()
    reopened = Journal(tmp_path)
    assert entries_of(reopened) == written[:position] + rewritten
    reopened.close()


def test_torn_tail_in_last_of_several_segments_is_cut(tmp_path: Path, small_segments: int) -> None:
    journal = Journal(tmp_path)
    written = fill(journal, 1, 8)
    journal.close()
    last = segment_files(tmp_path)[-1]
    with open(last, "r+b") as out:
        out.truncate(HEADER + 10 + 5)  # second record of the last segment is torn
    reopened = Journal(tmp_path)
    assert entries_of(reopened) == written[:-1]
    reopened.append(b"after", 8, 2)
    reopened.close()
    assert entries_of(Journal(tmp_path)) == [*written[:-1], (b"after", 8, 2)]


# -- cache and fsync --------------------------------------------------------------------------


def test_small_cache_does_not_change_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "JOURNAL_CACHE_ENTRIES_MAX", 2)
    journal = Journal(tmp_path)
    written = fill(journal, 1, 10)
    assert len(journal._cache) <= 2
    for position in [0, 9, 3, 3, -1, 5, 0, 8]:
        assert journal.entry(position) == written[position]
    journal.truncate_from(5)
    rewritten = fill(journal, 6, 3, term=2)
    assert entries_of(journal) == written[:5] + rewritten
    journal.drop_before(2)
    assert entries_of(journal) == written[2:5] + rewritten
    assert len(journal._cache) <= 2
    journal.close()


def test_cache_holds_at_most_its_bytes_and_keeps_the_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries of big batches are megabytes: a count bound alone let 1,024 of them pin
    hundreds of MB on every node (seen with a 1M x 1 KiB backlog)."""
    monkeypatch.setattr(limits, "JOURNAL_CACHE_BYTES_MAX", 3000)
    journal = Journal(tmp_path)
    commands = [bytes([index]) * 1000 for index in range(10)]
    for index, command in enumerate(commands, start=1):
        journal.append(command, index, 1)
        assert journal._cache_bytes == sum(len(c) for c in journal._cache.values()) <= 3000
    assert list(journal._cache) == [8, 9, 10]
    assert journal.entry(0) == (commands[0], 1, 1)  # read back from disk, then cached
    assert list(journal._cache) == [9, 10, 1]
    journal.truncate_from(8)
    assert list(journal._cache) == [1] and journal._cache_bytes == 1000
    one_big = b"x" * 5000  # bigger than the bound: kept alone, the newest
    journal.append(one_big, 9, 2)
    assert list(journal._cache) == [9] and journal._cache_bytes == 5000
    journal.clear()
    assert journal._cache_bytes == 0
    journal.close()


def test_without_fsync_everything_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "JOURNAL_SEGMENT_BYTES_MAX", 100)
    journal = Journal(tmp_path, fsync=False)
    journal.set_term(2, "me:1")
    written = fill(journal, 1, 10)
    journal.truncate_from(8)
    journal.drop_before(2)
    journal.append(b"tail", 9, 2)
    journal.close()
    expected = [*written[2:8], (b"tail", 9, 2)]
    reopened = Journal(tmp_path, fsync=False)
    assert entries_of(reopened) == expected
    assert (reopened.term, reopened.voted_for) == (2, "me:1")
    reopened.clear()
    reopened.append(b"fresh", 40, 3)
    reopened.close()
    assert entries_of(Journal(tmp_path, fsync=False)) == [(b"fresh", 40, 3)]


# -- property: random operations against a list ----------------------------------------------

_commands = st.binary(max_size=40)
_operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.lists(st.tuples(_commands, st.integers(0, 3)), max_size=6)),
        st.tuples(st.just("truncate_from"), st.integers(0, 12)),
        st.tuples(st.just("drop_before"), st.integers(-1, 12), st.integers(1, 10_000)),
        st.tuples(st.just("clear"), st.integers(1, 10_000)),
        st.tuples(st.just("sync")),
        st.tuples(st.just("reopen")),
    ),
    max_size=25,
)


@settings(max_examples=50, deadline=None)
@given(
    operations=_operations,
    first=st.integers(0, 1000),
    segment_bytes=st.sampled_from([64, 200, 10**9]),
)
def test_random_operations_agree_with_a_list(
    tmp_path_factory: pytest.TempPathFactory,
    operations: list[tuple[Any, ...]],
    first: int,
    segment_bytes: int,
) -> None:
    directory = tmp_path_factory.mktemp("journal")
    model: list[Entry] = []
    next_index = first
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(limits, "JOURNAL_SEGMENT_BYTES_MAX", segment_bytes)
        journal = Journal(directory)
        for operation in operations:
            kind = operation[0]
            if kind == "append":
                for command, term in operation[1]:
                    journal.append(command, next_index, term)
                    model.append((command, next_index, term))
                    next_index += 1
            elif kind == "truncate_from":
                position = operation[1]
                journal.truncate_from(position)
                if position < len(model):
                    next_index = model[position][1]
                    del model[position:]
            elif kind == "drop_before":
                position, fresh = operation[1], operation[2]
                journal.drop_before(position)
                if position >= len(model) and position > 0:
                    model, next_index = [], fresh
                elif position > 0:
                    del model[:position]
            elif kind == "clear":
                journal.clear()
                model, next_index = [], operation[1]
            elif kind == "sync":
                journal.sync()
            else:
                journal.close()
                journal = Journal(directory)
            assert len(journal) == len(model)
            assert entries_of(journal) == model
        journal.close()
        assert entries_of(Journal(directory)) == model
