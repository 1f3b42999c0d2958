"""The wire encoding of Raft log entries (`commands.Entry`) and of the commands in them.

Two encodings exist; `encode_for_raft` picks one:
- packed (versions 2 and 3, `bytes`, the normal one): a JSON header with every command as a list
  `[tag, field, field, ...]` in dataclass field order, followed by binary segments holding the
  bulk of a batch: its integer lists (sequences, delays, delivery counts) as little-endian
  int64 and its bodies as raw bytes behind their lengths. The header refers to each segment by
  its index. Bodies cross the journal, Raft and every replica's decoder without base64 (a
  third larger, and encoding plus decoding it was a fifth of a batch's cost on the leader).
  It needs pysyncobj to pickle with protocol 4 (raft/patches.py sets it), which keeps `bytes`
  verbatim; protocol 2 inflated them 1.5x.
- text (versions 1 and 2, ASCII `str`): the same JSON with bodies in base64 and lists
  inline. Entries written before the packed format, and the fallback for values the packed
  form cannot hold (an integer outside int64 in a list, which the state machine then refuses
  by its rules).

Each format's version also names the apply rules of the leader that wrote the entry
(`Entry.rules`): a release that changes what applying a command does bumps both versions, and
every replica applies an entry by the rules it was written under. So during a rolling upgrade
the upgraded followers apply the old leader's entries exactly as the old nodes do, and a node
older than the leader stops at the first entry of the new rules (`UnsupportedEntry`) instead
of applying it differently.
"""

from __future__ import annotations

import binascii
import dataclasses
import enum
import functools
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from chasqui_node.commands import (
    RULES_ACCESS_CHECKED,
    RULES_CURRENT,
    RULES_ORIGINAL,
    Ack,
    AckBatch,
    AddMember,
    Command,
    Consume,
    CreateQueue,
    CreateTopic,
    CreateUser,
    CreateUserAsAdmin,
    DeleteQueue,
    DeleteTopic,
    EnsureAdmin,
    Entry,
    Extend,
    Kind,
    Nack,
    Overflow,
    Publish,
    PublishBatch,
    RemoveMember,
    RevokeUser,
    SetAccess,
    StartPosition,
    Subscribe,
    Unsubscribe,
)

_COMMAND_TYPES: tuple[type[Any], ...] = (
    CreateUser,
    CreateTopic,
    DeleteTopic,
    CreateQueue,
    DeleteQueue,
    Subscribe,
    Unsubscribe,
    Publish,
    Consume,
    Ack,
    Nack,
    Extend,
    PublishBatch,
    EnsureAdmin,
    CreateUserAsAdmin,
    RevokeUser,
    SetAccess,
    AddMember,
    RemoveMember,
    AckBatch,
)
# Tags are part of the log format: append new types at the end, never reorder.
_TAG_OF: dict[type[Any], int] = {cls: tag for tag, cls in enumerate(_COMMAND_TYPES)}
_SCALARS: dict[str, type[Any]] = {"str": str, "int": int, "bool": bool, "bytes": bytes}
_ENUMS: dict[str, type[enum.Enum]] = {
    "Kind": Kind,
    "Overflow": Overflow,
    "StartPosition": StartPosition,
}
# Tuple fields of one command are parallel arrays (item i of each belongs together), encoded
# as JSON lists of the scalar encoding: bytes as base64 strings, ints as numbers.
_TUPLES: dict[str, type[Any]] = {
    "tuple[bytes, ...]": bytes,
    "tuple[int, ...]": int,
    "tuple[str, ...]": str,
}
# Commands whose tuple fields are parallel arrays and must have equal lengths; the tuples of
# other commands (access lists) are independent.
_PARALLEL_TUPLES: frozenset[type[Any]] = frozenset({PublishBatch, AckBatch})


@dataclass(frozen=True)
class _Field:
    name: str
    value_type: type[Any]  # a scalar or enum type; for a tuple field, its element type
    is_tuple: bool


def _field_of(field: dataclasses.Field[Any]) -> _Field:
    annotation = str(field.type)
    if annotation in _TUPLES:
        return _Field(field.name, _TUPLES[annotation], is_tuple=True)
    value_type = _SCALARS.get(annotation) or _ENUMS[annotation]
    return _Field(field.name, value_type, is_tuple=False)


_FIELDS: dict[type[Any], tuple[_Field, ...]] = {
    cls: tuple(_field_of(field) for field in dataclasses.fields(cls)) for cls in _COMMAND_TYPES
}
# Trailing fields added to a command after its first release (they have defaults), so entries
# written before them still decode. Append here whenever a field is appended.
_FIELDS_ADDED_LATER: dict[type[Any], int] = {Consume: 1}  # next_offset
_REQUIRED_FIELDS: dict[type[Any], int] = {
    cls: len(fields) - _FIELDS_ADDED_LATER.get(cls, 0) for cls, fields in _FIELDS.items()
}

_TEXT_VERSION_OF_RULES = {RULES_ORIGINAL: 1, RULES_ACCESS_CHECKED: 2}
_PACKED_VERSION_OF_RULES = {RULES_ORIGINAL: 2, RULES_ACCESS_CHECKED: 3}
_RULES_OF_TEXT_VERSION = {version: rules for rules, version in _TEXT_VERSION_OF_RULES.items()}
_RULES_OF_PACKED_VERSION = {version: rules for rules, version in _PACKED_VERSION_OF_RULES.items()}
ENTRY_FORMAT_VERSION = _TEXT_VERSION_OF_RULES[RULES_CURRENT]


class MalformedEntry(ValueError):
    """Entry text that does not decode: only a bug or a foreign writer can cause it."""


class UnsupportedEntry(MalformedEntry):
    """An entry from a newer Chasqui (an unknown entry version or command tag): a node that
    skipped it would diverge from the others, so it must stop until it is upgraded."""


def _encode_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return binascii.b2a_base64(value, newline=False).decode("ascii")
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_encode_value(element) for element in value]
    return value


def encode_command(command: Command, segments: list[bytes] | None = None) -> list[Any]:
    """The command as a JSON-ready list. With `segments` (the packed format), each integer or
    bytes list is appended there as a binary segment and its index stands in the list."""
    item: list[Any] = [_TAG_OF[type(command)]]
    for field in _FIELDS[type(command)]:
        value = getattr(command, field.name)
        if segments is not None and field.is_tuple and field.value_type in _PACK_SEGMENT:
            item.append(len(segments))
            segments.append(_PACK_SEGMENT[field.value_type](value))
        else:
            item.append(_encode_value(value))
    return item


def _decode_value(value_type: type[Any], raw: Any) -> Any:
    """Raises MalformedEntry, binascii.Error, TypeError or ValueError for a wrong value."""
    if value_type is bytes:
        if not isinstance(raw, str):
            raise MalformedEntry(f"base64 text expected, got {type(raw).__name__}")
        # Strict (canonical base64 only) and checked in C: base64.b64decode(validate=True)
        # checks with a regular expression first, a large share of applying a batch.
        return binascii.a2b_base64(raw, strict_mode=True)
    if issubclass(value_type, enum.Enum):
        return value_type(raw)
    if type(raw) is not value_type:
        raise MalformedEntry(f"{value_type.__name__} expected, got {type(raw).__name__}")
    return raw


_strict_a2b_base64 = functools.partial(binascii.a2b_base64, strict_mode=True)


def _decode_list(value_type: type[Any], raw: list[Any]) -> tuple[Any, ...]:
    """A tuple field's elements, as `_decode_value` decodes each. The lists of a batch hold
    hundreds of elements, so the common element types are checked and decoded in C (one
    Python call per element was a tenth of applying a publish batch)."""
    element_types = set(map(type, raw))
    if value_type is bytes and element_types <= {str}:
        return tuple(map(_strict_a2b_base64, raw))
    if value_type in (int, str) and element_types <= {value_type}:
        return tuple(raw)
    return tuple(_decode_value(value_type, each) for each in raw)  # raises for the odd one


def decode_command(item: Any, segments: _Segments | None = None) -> Command:
    if not isinstance(item, list) or not item or not isinstance(item[0], int):
        raise MalformedEntry(f"command is not a tagged list: {item!r:.80}")
    tag = item[0]
    if tag >= len(_COMMAND_TYPES):
        raise UnsupportedEntry(
            f"command tag {tag} is newer than this node knows (up to {len(_COMMAND_TYPES) - 1})"
        )
    if tag < 0:
        raise MalformedEntry(f"unknown command tag {tag}")
    cls = _COMMAND_TYPES[tag]
    fields = _FIELDS[cls]
    if not _REQUIRED_FIELDS[cls] <= len(item) - 1 <= len(fields):
        raise MalformedEntry(f"{cls.__name__} has {len(item) - 1} fields, expected {len(fields)}")
    # Fields appended to a command later have defaults; entries written before they existed
    # simply end early and decode with those defaults.
    fields = fields[: len(item) - 1]
    values: dict[str, Any] = {}
    tuple_lengths: set[int] = set()
    for field, raw in zip(fields, item[1:], strict=True):
        try:
            if not field.is_tuple:
                values[field.name] = _decode_value(field.value_type, raw)
                continue
            if segments is not None and field.value_type in _PACK_SEGMENT:
                values[field.name] = decoded = segments.take(raw, field.value_type)
                tuple_lengths.add(len(decoded))
                continue
            if not isinstance(raw, list):
                raise MalformedEntry(f"list expected, got {type(raw).__name__}")
            values[field.name] = _decode_list(field.value_type, raw)
            tuple_lengths.add(len(raw))
        except (binascii.Error, TypeError, ValueError) as error:  # MalformedEntry included
            raise MalformedEntry(f"{cls.__name__}.{field.name}: {error}") from error
    if cls in _PARALLEL_TUPLES and len(tuple_lengths) > 1:
        raise MalformedEntry(f"{cls.__name__} has lists of unequal lengths {sorted(tuple_lengths)}")
    command: Command = cls(**values)
    return command


def encode_entry(entry: Entry) -> str:
    """Encode an entry as compact ASCII JSON (the text format; see the module docstring)."""
    commands = [encode_command(command) for command in entry.commands]
    return _encode_json_entry(_TEXT_VERSION_OF_RULES[entry.rules], entry.now_ms, commands)


def _encode_json_entry(version: int, now_ms: int, commands: list[list[Any]]) -> str:
    """The JSON both formats share (all of the text one, the packed one's header)."""
    return json.dumps([version, now_ms, commands], separators=(",", ":"), ensure_ascii=True)


def encode_packed_entry(entry: Entry) -> bytes | None:
    """The packed encoding (see the module docstring), or None when a list holds a value it
    cannot represent (an integer outside int64, a non-bytes body): `encode_entry` then."""
    segments: list[bytes] = []
    try:
        commands = [encode_command(command, segments) for command in entry.commands]
    except (struct.error, TypeError):
        return None
    version = _PACKED_VERSION_OF_RULES[entry.rules]
    header = _encode_json_entry(version, entry.now_ms, commands).encode("ascii")
    return b"".join((_PACKED_PREFIX.pack(version, len(header)), header, *segments))


def encode_for_raft(entry: Entry) -> str | bytes:
    """What the leader proposes: the packed encoding when it can hold the entry, else text."""
    packed = encode_packed_entry(entry)
    return encode_entry(entry) if packed is None else packed


def decode_entry(data: str | bytes) -> Entry:
    """Decodes either encoding (text is a `str`, packed is `bytes`). Raises `MalformedEntry`
    for anything `encode_entry` / `encode_packed_entry` could not have produced, and its
    subclass `UnsupportedEntry` for an entry of a newer format."""
    if isinstance(data, str):
        return _decode_json_entry(data, _RULES_OF_TEXT_VERSION, None)
    if not isinstance(data, bytes):
        raise MalformedEntry(f"entry is neither text nor bytes: {type(data).__name__}")
    try:
        version, header_length = _PACKED_PREFIX.unpack_from(data)
    except struct.error as error:
        raise MalformedEntry(f"packed entry is too short: {error}") from error
    if version not in _RULES_OF_PACKED_VERSION:
        if version > PACKED_FORMAT_VERSION:
            raise UnsupportedEntry(f"entry version {version} is newer than {PACKED_FORMAT_VERSION}")
        raise MalformedEntry(f"packed entry has unknown version {version}")
    header_end = _PACKED_PREFIX.size + header_length
    if header_end > len(data):
        raise MalformedEntry(f"packed entry header of {header_length} bytes exceeds the entry")
    segments = _Segments(data, header_end)
    entry = _decode_json_entry(
        data[_PACKED_PREFIX.size : header_end], _RULES_OF_PACKED_VERSION, segments, version
    )
    segments.check_all_taken()
    return entry


def _decode_json_entry(
    text: str | bytes,
    rules_of_version: dict[int, int],
    segments: _Segments | None,
    packed_version: int | None = None,
) -> Entry:
    """`rules_of_version` maps this format's versions to their rules; a packed entry's header
    repeats the version of its prefix (`packed_version`)."""
    try:
        raw = json.loads(text)
    except (ValueError, TypeError) as error:
        raise MalformedEntry(f"entry is not JSON: {error}") from error
    version = raw[0] if isinstance(raw, list) and raw else None
    rules = rules_of_version.get(version) if type(version) is int else None
    if not (isinstance(raw, list) and len(raw) == 3 and rules is not None) or (
        packed_version is not None and version != packed_version
    ):
        newest = max(rules_of_version)
        if type(version) is int and version > newest:
            raise UnsupportedEntry(f"entry version {version} is newer than {newest}")
        raise MalformedEntry(f"entry has unknown shape or version: {str(raw)[:80]}")
    now_ms, items = raw[1], raw[2]
    if type(now_ms) is not int or not isinstance(items, list):
        raise MalformedEntry("entry fields have wrong types")
    commands = tuple(decode_command(item, segments) for item in items)
    return Entry(now_ms=now_ms, commands=commands, rules=rules)


# -- the packed format's binary segments ------------------------------------------------------
# prefix: version (u8), JSON header length (u32); then the header; then the segments, each a
# kind byte and an item count (u32) followed by `count` int64 (b"q"), or by `count` u32 lengths
# and the concatenated bodies (b"b"). All little-endian.
PACKED_FORMAT_VERSION = _PACKED_VERSION_OF_RULES[RULES_CURRENT]
_PACKED_PREFIX = struct.Struct("<BI")
_SEGMENT_HEAD = struct.Struct("<cI")
_INTS, _BODIES = b"q", b"b"


def _pack_ints(values: tuple[int, ...]) -> bytes:
    count = len(values)
    return _SEGMENT_HEAD.pack(_INTS, count) + struct.pack(f"<{count}q", *values)


def _pack_bodies(bodies: tuple[bytes, ...]) -> bytes:
    count = len(bodies)
    lengths = struct.pack(f"<{count}I", *map(len, bodies))
    return b"".join((_SEGMENT_HEAD.pack(_BODIES, count), lengths, *bodies))


_PACK_SEGMENT: dict[type[Any], Callable[[Any], bytes]] = {int: _pack_ints, bytes: _pack_bodies}
_SEGMENT_KIND: dict[type[Any], bytes] = {int: _INTS, bytes: _BODIES}


class _Segments:
    """The segments of one packed entry, parsed whole (bounds checked before anything is
    allocated); each is taken by exactly one command field of the matching type."""

    def __init__(self, data: bytes, offset: int) -> None:
        self._kinds: list[bytes] = []
        self._values: list[tuple[Any, ...]] = []
        self._taken: set[int] = set()
        end = len(data)
        while offset < end:
            if offset + _SEGMENT_HEAD.size > end:
                raise MalformedEntry(f"packed entry ends inside a segment head at {offset}")
            kind, count = _SEGMENT_HEAD.unpack_from(data, offset)
            offset += _SEGMENT_HEAD.size
            if kind == _INTS:
                values_end = offset + 8 * count
                if values_end > end:
                    raise MalformedEntry(f"segment of {count} integers exceeds the entry")
                values: tuple[Any, ...] = struct.unpack_from(f"<{count}q", data, offset)
                offset = values_end
            elif kind == _BODIES:
                lengths_end = offset + 4 * count
                if lengths_end > end:
                    raise MalformedEntry(f"segment of {count} bodies exceeds the entry")
                lengths = struct.unpack_from(f"<{count}I", data, offset)
                starts = list(accumulate(lengths, initial=lengths_end))
                if starts[-1] > end:
                    raise MalformedEntry(
                        f"bodies of {starts[-1] - lengths_end} bytes exceed the entry"
                    )
                values = tuple(map(data.__getitem__, map(slice, starts, starts[1:])))
                offset = starts[-1]
            else:
                raise MalformedEntry(f"unknown segment kind {kind!r}")
            self._kinds.append(kind)
            self._values.append(values)

    def take(self, index: Any, value_type: type[Any]) -> tuple[Any, ...]:
        if type(index) is not int or not 0 <= index < len(self._values):
            raise MalformedEntry(f"segment reference {index!r:.40} is not a segment")
        if index in self._taken:
            raise MalformedEntry(f"segment {index} is referred to twice")
        if self._kinds[index] != _SEGMENT_KIND[value_type]:
            raise MalformedEntry(f"segment {index} holds no {value_type.__name__} values")
        self._taken.add(index)
        return self._values[index]

    def check_all_taken(self) -> None:
        if len(self._taken) != len(self._values):
            raise MalformedEntry(
                f"packed entry has {len(self._values) - len(self._taken)} unreferenced segments"
            )


def _base64_size(body: bytes) -> int:
    return (len(body) + 2) // 3 * 4


def encoded_size(command: Command) -> int:
    """An upper bound on the bytes the command adds to an encoded entry (ASCII text names and
    ids), used to keep entries under the chunking size. A `PublishBatch` counts every body and
    item; one oversized command still makes an entry of its own."""
    size = 160 + len(command.key_hash) + len(getattr(command, "name", ""))
    size += len(getattr(command, "producer_id", ""))
    if isinstance(command, Publish):
        size += _base64_size(command.body)
    elif isinstance(command, PublishBatch):
        # Per item, generously: the body's quotes, three separators and two integers of up to
        # 20 characters each (the service fills them from 64-bit proto fields).
        size += sum(_base64_size(body) + 56 for body in command.bodies)
    elif isinstance(command, AckBatch):
        size += 42 * len(command.sequences)  # two integers of up to 20 characters, separators
    elif isinstance(command, SetAccess):
        size += sum(len(user_id) + 3 for user_id in command.publishers + command.consumers)
    elif isinstance(command, CreateUserAsAdmin | RevokeUser):
        size += len(getattr(command, "new_key_hash", "")) + len(getattr(command, "user_id", ""))
    return size
