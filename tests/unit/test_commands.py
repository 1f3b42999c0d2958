"""Proves both entry encodings are faithful, strict round trips: every command type survives
`encode_entry` (text) and `encode_packed_entry` (bytes) through `decode_entry` unchanged, the
text is ASCII, the packed form carries bodies raw, and anything neither encoder could have
produced (including every truncation of a packed entry) is refused with `MalformedEntry`
rather than turned into a wrong command."""

from __future__ import annotations

import json
import os
import struct

import pytest

from chasqui_node.commands import (
    RULES_ACCESS_CHECKED,
    RULES_ORIGINAL,
    Ack,
    AckBatch,
    Command,
    Consume,
    CreateQueue,
    CreateTopic,
    CreateUser,
    DeleteQueue,
    DeleteTopic,
    Entry,
    Extend,
    Kind,
    Nack,
    Overflow,
    Publish,
    PublishBatch,
    StartPosition,
    Subscribe,
    Unsubscribe,
)
from chasqui_node.entries import (
    MalformedEntry,
    UnsupportedEntry,
    decode_command,
    decode_entry,
    encode_command,
    encode_entry,
    encode_for_raft,
    encode_packed_entry,
    encoded_size,
)

EVERY_COMMAND: list[Command] = [
    CreateUser("h" * 64, admin=True),
    CreateTopic("h", "news", exist_ok=True, retention_ms=5, retention_bytes=6),
    DeleteTopic("h", "news"),
    CreateQueue("h", "jobs", True, 1000, 3, "dead", 10, Overflow.DROP_HEAD, 60_000),
    DeleteQueue("h", "jobs"),
    Subscribe("h", Kind.TOPIC, "news", StartPosition.OFFSET, 42),
    Unsubscribe("h", Kind.QUEUE, "jobs"),
    Publish("h", Kind.QUEUE, "jobs", bytes(range(256)), "producer-1", 7, delay_ms=9),
    Publish("h", Kind.TOPIC, "news", b"", "", 0),
    Consume("h", Kind.QUEUE, "jobs", 10, 5000),
    Ack("h", Kind.TOPIC, "news", 3, 1),
    AckBatch("h", Kind.QUEUE, "jobs", (3, 4, 9), (1, 1, 2)),
    AckBatch("h", Kind.TOPIC, "news", (), ()),
    Nack("h", Kind.QUEUE, "jobs", 3, 2, delay_ms=100),
    Extend("h", Kind.QUEUE, "jobs", 3, 2, extend_ms=1000),
    PublishBatch("h", Kind.QUEUE, "jobs", "p", (b"", bytes(range(256))), (1, 2), (0, 9)),
    PublishBatch("h", Kind.TOPIC, "news", "", (), (), ()),
]


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=lambda c: type(c).__name__)
def test_every_command_round_trips(command: Command) -> None:
    assert decode_command(json.loads(json.dumps(encode_command(command)))) == command


def test_entry_round_trips_as_ascii_text() -> None:
    entry = Entry(now_ms=1_700_000_000_000, commands=tuple(EVERY_COMMAND))
    text = encode_entry(entry)
    assert text.isascii()
    assert decode_entry(text) == entry


def test_an_ack_batch_is_compact() -> None:
    one_by_one = [Ack("h" * 64, Kind.QUEUE, "jobs", 1000 + i, 1) for i in range(100)]
    batch = AckBatch("h" * 64, Kind.QUEUE, "jobs", tuple(range(1000, 1100)), (1,) * 100)
    singles = len(encode_entry(Entry(1, tuple(one_by_one))))
    assert len(encode_entry(Entry(1, (batch,)))) * 10 < singles


def test_ack_batch_items_must_pair_up() -> None:
    item = encode_command(AckBatch("h", Kind.QUEUE, "jobs", (1, 2), (1, 1)))
    item[-1] = [1]
    with pytest.raises(MalformedEntry):
        decode_command(item)


def test_an_entry_from_a_newer_version_is_unsupported_not_skippable() -> None:
    """A node must stop on these (replication.py), not skip them like a malformed entry."""
    with pytest.raises(UnsupportedEntry, match="command tag 999 is newer"):
        decode_entry(json.dumps([1, 5, [[999, "h"]]]))
    with pytest.raises(UnsupportedEntry, match="entry version 3 is newer"):
        decode_entry(json.dumps([3, 5, []]))
    with pytest.raises(MalformedEntry) as refused:
        decode_entry(json.dumps([0, 5, []]))
    assert not isinstance(refused.value, UnsupportedEntry)


@pytest.mark.parametrize("rules", [RULES_ORIGINAL, RULES_ACCESS_CHECKED])
def test_an_entry_keeps_the_rules_it_was_written_under(rules: int) -> None:
    """Old leaders' entries (text version 1, packed version 2) apply by the original rules on
    every replica; the current versions carry the current rules."""
    entry = Entry(5, (AckBatch("h", Kind.QUEUE, "jobs", (1, 2), (1, 1)),), rules=rules)
    assert decode_entry(encode_entry(entry)) == entry
    packed = encode_packed_entry(entry)
    assert packed is not None and decode_entry(packed) == entry
    assert packed[0] == {RULES_ORIGINAL: 2, RULES_ACCESS_CHECKED: 3}[rules]


def test_a_packed_entry_whose_header_disagrees_with_its_prefix_is_malformed() -> None:
    packed = encode_packed_entry(Entry(5, (), rules=RULES_ORIGINAL))
    assert packed is not None
    with pytest.raises(MalformedEntry) as refused:
        decode_entry(b"\x03" + packed[1:])
    assert not isinstance(refused.value, UnsupportedEntry)


def test_empty_entry_round_trips() -> None:
    assert decode_entry(encode_entry(Entry(5, ()))) == Entry(5, ())


def test_encoded_size_covers_the_real_encoding() -> None:
    for command in EVERY_COMMAND:
        assert encoded_size(command) >= len(json.dumps(encode_command(command)))


def test_batch_encodes_bodies_as_base64_lists() -> None:
    command = PublishBatch("h", Kind.QUEUE, "jobs", "p", (b"\x00\xff", b"ab"), (1, 2), (0, 5))
    assert encode_command(command)[5:] == [["AP8=", "YWI="], [1, 2], [0, 5]]


def test_encoded_size_covers_commands_at_their_limits() -> None:
    name = "n" * 200
    key_hash = "h" * 128
    producer_id = "p" * 64
    largest = 2**64 - 1
    commands: list[Command] = [
        Publish(key_hash, Kind.QUEUE, name, b"x" * 1000, producer_id, largest, largest),
        PublishBatch(
            key_hash,
            Kind.QUEUE,
            name,
            producer_id,
            (b"x" * 1000,) * 50,
            (largest,) * 50,
            (largest,) * 50,
        ),
        PublishBatch(key_hash, Kind.QUEUE, name, producer_id, (b"",) * 500, (0,) * 500, (0,) * 500),
    ]
    for command in commands:
        assert encoded_size(command) >= len(json.dumps(encode_command(command)))


def _valid_publish() -> list[object]:
    return encode_command(Publish("h", Kind.QUEUE, "jobs", b"body", "p", 1))


def _valid_batch() -> list[object]:
    return encode_command(PublishBatch("h", Kind.QUEUE, "jobs", "p", (b"a", b"b"), (1, 2), (0, 0)))


def _batch_with(position: int, value: object) -> str:
    item = _valid_batch()
    item[position] = value
    return json.dumps([1, 0, [item]])


MALFORMED_ENTRIES = {
    "not json": "[1, 2",
    "not a list": '{"a": 1}',
    "wrong version": json.dumps([99, 0, []]),
    "too few parts": json.dumps([1, 0]),
    "now_ms not int": json.dumps([1, "0", []]),
    "now_ms bool": json.dumps([1, True, []]),
    "commands not a list": json.dumps([1, 0, {}]),
    "command not a list": json.dumps([1, 0, [5]]),
    "empty command": json.dumps([1, 0, [[]]]),
    "unknown tag": json.dumps([1, 0, [[99, "h"]]]),
    "negative tag": json.dumps([1, 0, [[-1, "h"]]]),
    "tag not int": json.dumps([1, 0, [["0", "h", False]]]),
    "missing field": json.dumps([1, 0, [[0, "h"]]]),
    "extra field": json.dumps([1, 0, [[0, "h", False, 1]]]),
    "str where bool": json.dumps([1, 0, [[0, "h", "yes"]]]),
    "int where bool": json.dumps([1, 0, [[0, "h", 1]]]),
    "bool where int": json.dumps([1, 0, [[*_valid_publish()[:6], True, 0]]]),
    "bad base64 body": json.dumps([1, 0, [[*_valid_publish()[:4], "!!!", "p", 1, 0]]]),
    "unknown enum": json.dumps([1, 0, [[*_valid_publish()[:2], "stream", *_valid_publish()[3:]]]]),
    "int where str": json.dumps([1, 0, [[2, 5, "news"]]]),
    "batch bodies not a list": _batch_with(5, "YQ=="),
    "batch sequences not a list": _batch_with(6, 1),
    "batch body not base64 text": _batch_with(5, ["YQ==", 5]),
    "batch body bad base64": _batch_with(5, ["YQ==", "!!"]),
    "batch sequence not int": _batch_with(6, [1, "2"]),
    "batch sequence bool": _batch_with(6, [1, True]),
    "batch delay float": _batch_with(7, [0, 0.5]),
    "batch sequence list nested": _batch_with(6, [[1], [2]]),
    "batch fewer sequences": _batch_with(6, [1]),
    "batch more delays": _batch_with(7, [0, 0, 0]),
    "batch no bodies": _batch_with(5, []),
}


@pytest.mark.parametrize("text", MALFORMED_ENTRIES.values(), ids=MALFORMED_ENTRIES.keys())
def test_malformed_entry_is_rejected(text: str) -> None:
    with pytest.raises(MalformedEntry):
        decode_entry(text)


# -- the packed format ------------------------------------------------------------------------


def test_entry_round_trips_packed() -> None:
    entry = Entry(now_ms=1_700_000_000_000, commands=tuple(EVERY_COMMAND))
    packed = encode_for_raft(entry)
    assert isinstance(packed, bytes)
    assert decode_entry(packed) == entry


def test_packed_bodies_travel_raw_and_lists_as_segments() -> None:
    bodies = tuple(os.urandom(256) for _ in range(100))
    command = PublishBatch("h", Kind.QUEUE, "jobs", "p", bodies, tuple(range(100)), (0,) * 100)
    packed = encode_packed_entry(Entry(1, (command,)))
    assert packed is not None
    assert all(body in packed for body in bodies)
    assert len(packed) < 100 * 256 + 100 * (4 + 8 + 8) + 200  # bodies, lengths, two int lists
    assert len(packed) < len(encode_entry(Entry(1, (command,))))  # base64 is a third larger


def test_values_the_packed_form_cannot_hold_fall_back_to_text() -> None:
    """An integer beyond int64 in a list (the state machine refuses it by its own rules, alike
    on every node) must still reach the log intact: in the text format."""
    huge = PublishBatch("h", Kind.QUEUE, "jobs", "p", (b"a",), (2**64 - 1,), (0,))
    entry = Entry(1, (EVERY_COMMAND[0], huge))
    assert encode_packed_entry(entry) is None
    text = encode_for_raft(entry)
    assert isinstance(text, str)
    assert decode_entry(text) == entry


def _packed(*commands: Command) -> bytes:
    packed = encode_packed_entry(Entry(7, commands))
    assert packed is not None
    return packed


def _with_header(packed: bytes, header: object, version: int = 2) -> bytes:
    """`packed` with its JSON header replaced (segments kept)."""
    _version, length = struct.unpack_from("<BI", packed)
    text = json.dumps(header).encode()
    return struct.pack("<BI", version, len(text)) + text + packed[5 + length :]


_BATCH = PublishBatch("h", Kind.QUEUE, "jobs", "p", (b"ab", b"c"), (1, 2), (0, 0))
_BATCH_PACKED = _packed(_BATCH)
_BATCH_ITEM = encode_command(_BATCH, [])  # segment references 0, 1, 2


def _batch_item_with(position: int, value: object) -> list[object]:
    item = list(_BATCH_ITEM)
    item[position] = value
    return [2, 7, [item]]


MALFORMED_PACKED = {
    "empty": b"",
    "prefix cut": b"\x02\x00",
    "older version byte": b"\x01" + _BATCH_PACKED[1:],
    "header beyond the entry": b"\x02" + struct.pack("<I", 10**6) + _BATCH_PACKED[5:],
    "header not json": _BATCH_PACKED[:5] + b"{" * (len(_BATCH_PACKED) - 5),
    "header says version 1": _with_header(_BATCH_PACKED, [1, 7, [_BATCH_ITEM]]),
    "unknown segment kind": _BATCH_PACKED + b"z\x00\x00\x00\x00",
    "segment head cut": _BATCH_PACKED + b"q\x00",
    "int segment beyond the entry": _BATCH_PACKED + b"q\xff\xff\x00\x00",
    "body lengths beyond the entry": _BATCH_PACKED + b"b\xff\xff\x00\x00",
    "bodies beyond the entry": _BATCH_PACKED + b"b\x01\x00\x00\x00\x09\x00\x00\x00ab",
    "unreferenced segment": _BATCH_PACKED + b"q\x00\x00\x00\x00",
    "reference out of range": _with_header(_BATCH_PACKED, _batch_item_with(5, 3)),
    "reference negative": _with_header(_BATCH_PACKED, _batch_item_with(5, -1)),
    "reference not int": _with_header(_BATCH_PACKED, _batch_item_with(5, "0")),
    "reference bool": _with_header(_BATCH_PACKED, _batch_item_with(6, True)),
    "reference inline list": _with_header(_BATCH_PACKED, _batch_item_with(6, [1, 2])),
    "reference taken twice": _with_header(_BATCH_PACKED, _batch_item_with(7, 1)),
    "ints where bodies": _with_header(_BATCH_PACKED, _batch_item_with(5, 1)),
    "bodies where ints": _with_header(_BATCH_PACKED, [2, 7, [[*_BATCH_ITEM[:5], 1, 0, 2]]]),
}


@pytest.mark.parametrize("data", MALFORMED_PACKED.values(), ids=MALFORMED_PACKED.keys())
def test_malformed_packed_entry_is_rejected(data: bytes) -> None:
    with pytest.raises(MalformedEntry) as refused:
        decode_entry(data)
    assert not isinstance(refused.value, UnsupportedEntry)


def test_every_cut_of_a_packed_entry_is_rejected() -> None:
    """A torn or truncated entry never decodes into a shorter, wrong one."""
    packed = _packed(*EVERY_COMMAND)
    for end in range(len(packed)):
        with pytest.raises(MalformedEntry):
            decode_entry(packed[:end])


def test_a_packed_entry_of_a_newer_version_is_unsupported() -> None:
    with pytest.raises(UnsupportedEntry, match="entry version 4 is newer"):
        decode_entry(b"\x04" + _BATCH_PACKED[1:])
    with pytest.raises(UnsupportedEntry, match="command tag 999 is newer"):
        decode_entry(_with_header(_BATCH_PACKED, [2, 7, [[999, "h"]]]))
    with pytest.raises(MalformedEntry, match="neither text nor bytes"):
        decode_entry([2, 7, []])  # type: ignore[arg-type]
