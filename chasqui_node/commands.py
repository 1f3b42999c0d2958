"""Commands the state machine applies, the results it returns, and their wire encoding.

A Raft log entry is an `Entry`: the leader's clock (`now_ms`) and a batch of commands from
concurrent clients (group commit). Two encodings exist; `encode_for_raft` picks one:
- packed (versions 2 and 3, `bytes`, the normal one): a JSON header with every command as a list
  `[tag, field, field, ...]` in dataclass field order, followed by binary segments holding the
  bulk of a batch: its integer lists (sequences, delays, delivery counts) as little-endian
  int64 and its bodies as raw bytes behind their lengths. The header refers to each segment by
  its index. Bodies cross the journal, Raft and every replica's decoder without base64 (a
  third larger, and encoding plus decoding it was a fifth of a batch's cost on the leader).
  It needs pysyncobj to pickle with protocol 4 (replication.py sets it), which keeps `bytes`
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

Results are never replicated (each replica computes its own, and only the proposing node hands
them to a client), so they are plain frozen dataclasses (named tuples for the ones built per
message) with no encoding.
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
from typing import Any, NamedTuple

from chasqui_node import limits
from chasqui_node.errors import ChasquiError, InvalidName


class Kind(enum.Enum):
    """What a name refers to: topics fan out, queues hand each message to one consumer."""

    TOPIC = "topic"
    QUEUE = "queue"


class Overflow(enum.Enum):
    """What a queue at `max_length` does with one more publish."""

    REJECT_PUBLISH = "reject_publish"
    DROP_HEAD = "drop_head"


class StartPosition(enum.Enum):
    """Where a new topic subscription starts reading."""

    LATEST = "latest"  # messages published after the subscription (the default)
    EARLIEST = "earliest"  # the oldest retained message
    OFFSET = "offset"  # a given offset, clamped to what is retained


# ---------------------------------------------------------------------------------------------
# Commands. `key_hash` is the SHA-256 hex digest of the caller's key; keys never enter the log.


@dataclass(frozen=True)
class CreateUser:
    key_hash: str
    admin: bool = False


@dataclass(frozen=True)
class CreateTopic:
    key_hash: str
    name: str
    exist_ok: bool = False
    retention_ms: int = 0  # 0: limits.TOPIC_RETENTION_MS_DEFAULT
    retention_bytes: int = 0  # 0: limits.TOPIC_RETENTION_BYTES_DEFAULT


@dataclass(frozen=True)
class DeleteTopic:
    key_hash: str
    name: str


@dataclass(frozen=True)
class CreateQueue:
    key_hash: str
    name: str
    exist_ok: bool = False
    visibility_timeout_ms: int = 0  # 0: limits.VISIBILITY_TIMEOUT_MS_DEFAULT
    max_deliveries: int = 0  # 0: unlimited
    dead_letter_queue: str = ""  # "": none; must exist when the queue is created
    max_length: int = 0  # 0: limits.QUEUE_DEPTH_MAX
    overflow: Overflow = Overflow.REJECT_PUBLISH
    message_ttl_ms: int = 0  # 0: messages never expire


@dataclass(frozen=True)
class DeleteQueue:
    key_hash: str
    name: str


@dataclass(frozen=True)
class Subscribe:
    key_hash: str
    kind: Kind
    name: str
    start: StartPosition = StartPosition.LATEST
    offset: int = 0  # used with StartPosition.OFFSET


@dataclass(frozen=True)
class Unsubscribe:
    key_hash: str
    kind: Kind
    name: str


@dataclass(frozen=True)
class Publish:
    key_hash: str
    kind: Kind
    name: str
    body: bytes
    producer_id: str  # with `sequence`, identifies the publish for deduplication
    sequence: int
    delay_ms: int = 0  # queues only: the message becomes visible this much later


@dataclass(frozen=True)
class PublishBatch:
    """Publish several messages to one queue or topic, all or nothing (ARCHITECTURE promise 5).

    Item i is (`bodies[i]`, `sequences[i]`, `delays_ms[i]`); the three tuples have equal length.
    A `Publish` is applied as a batch of one, so both share every rule."""

    key_hash: str
    kind: Kind
    name: str
    producer_id: str
    bodies: tuple[bytes, ...]
    sequences: tuple[int, ...]
    delays_ms: tuple[int, ...]


@dataclass(frozen=True)
class Consume:
    key_hash: str
    kind: Kind
    name: str
    max_messages: int = 1
    visibility_timeout_ms: int = 0  # 0: the queue's own visibility timeout
    # Topics: the next offset the client expects (it received everything before it), or -1.
    # A reply lost in a leader change is then handed out again first, in order.
    next_offset: int = -1


@dataclass(frozen=True)
class Ack:
    """Queue: delete the message if this delivery still holds its lease (idempotent).
    Topic: move the caller's cursor past `sequence` (cumulative, idempotent)."""

    key_hash: str
    kind: Kind
    name: str
    sequence: int
    delivery_count: int


@dataclass(frozen=True)
class AckBatch:
    """Ack several deliveries of one queue or topic, in order, each as an `Ack` would be, and
    independently (one that is refused does not stop the others). Item i is (`sequences[i]`,
    `delivery_counts[i]`). One command per ack call: about 16 bytes per delivery in the entry
    instead of about 100 (the key hash, kind and name once), and one decode instead of many."""

    key_hash: str
    kind: Kind
    name: str
    sequences: tuple[int, ...]
    delivery_counts: tuple[int, ...]


@dataclass(frozen=True)
class Nack:
    """Give a leased message back, visible again after `delay_ms`."""

    key_hash: str
    kind: Kind
    name: str
    sequence: int
    delivery_count: int
    delay_ms: int = 0


@dataclass(frozen=True)
class Extend:
    """Push a leased message's visibility deadline to `now + extend_ms`."""

    key_hash: str
    kind: Kind
    name: str
    sequence: int
    delivery_count: int
    extend_ms: int


@dataclass(frozen=True)
class EnsureAdmin:
    """Bootstrap: make the holder of this key hash an admin, creating the user if needed.

    Proposed by a leader whose node was given an admin key (`--admin-key-file`), never on a
    client's behalf, so the set of admins is replicated state rather than per-node config.
    Idempotent; a revoked key stays revoked (the operator must configure a new one)."""

    key_hash: str


@dataclass(frozen=True)
class CreateUserAsAdmin:
    """An admin (`key_hash`) creates a user: how users are made when signup is closed, and
    the only way to create another admin."""

    key_hash: str
    new_key_hash: str
    admin: bool = False


@dataclass(frozen=True)
class RevokeUser:
    """An admin revokes a user's key: the key is refused from then on, the user's topics and
    queues stay (owned by the revoked id) until an admin deletes them."""

    key_hash: str
    user_id: str


@dataclass(frozen=True)
class SetAccess:
    """The owner (or an admin) replaces the access lists of a topic or queue. An empty list lets
    every user in; otherwise only the listed user ids (plus the owner and admins) may publish
    (`publishers`) or subscribe, consume, ack, nack and extend (`consumers`)."""

    key_hash: str
    kind: Kind
    name: str
    publishers: tuple[str, ...]
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class AddMember:
    """An admin records a new cluster member in the replicated registry, so every node can map
    its Raft address to the client address it gives in leader hints. The Raft configuration
    change itself is pysyncobj's, made by the leader once this commits."""

    key_hash: str
    node_id: str
    client_address: str
    raft_address: str


@dataclass(frozen=True)
class RemoveMember:
    """An admin records that a member left the cluster (a tombstone that also hides a member
    listed in the nodes' static `--cluster` configuration)."""

    key_hash: str
    node_id: str


Command = (
    CreateUser
    | CreateTopic
    | DeleteTopic
    | CreateQueue
    | DeleteQueue
    | Subscribe
    | Unsubscribe
    | Publish
    | Consume
    | Ack
    | Nack
    | Extend
    | PublishBatch
    | EnsureAdmin
    | CreateUserAsAdmin
    | RevokeUser
    | SetAccess
    | AddMember
    | RemoveMember
    | AckBatch
)


@dataclass(frozen=True)
class Entry:
    """One Raft log entry: cluster time when the leader proposed it (clock.py), a batch of
    commands, and the apply rules the leader runs (see the module docstring)."""

    now_ms: int
    commands: tuple[Command, ...]
    rules: int = 2  # RULES_CURRENT


def check_name(kind: Kind, name: str) -> None:
    """Raise InvalidName unless `name` is 1..NAME_BYTES_MAX bytes of [A-Za-z0-9._-].

    Checked at the edge (service) before proposing, and again by the state machine.
    """
    encoded = name.encode("utf-8", errors="surrogatepass")
    shown = name if len(name) <= 60 else name[:57] + "..."
    if not 1 <= len(encoded) <= limits.NAME_BYTES_MAX:
        raise InvalidName(
            kind.value,
            shown,
            f"must be 1 to name_bytes_max {limits.NAME_BYTES_MAX} bytes, got {len(encoded)}",
        )
    for char in name:
        if char not in limits.NAME_ALPHABET:
            raise InvalidName(kind.value, shown, f"character {char!r} is not one of [A-Za-z0-9._-]")


# ---------------------------------------------------------------------------------------------
# Results.


@dataclass(frozen=True)
class UserCreated:
    user_id: str


@dataclass(frozen=True)
class Created:
    kind: Kind
    name: str
    created: bool  # False when exist_ok found it already there (and owned by the caller)


@dataclass(frozen=True)
class Deleted:
    kind: Kind
    name: str


@dataclass(frozen=True)
class Subscribed:
    kind: Kind
    name: str
    offset: int  # topics: the next offset this subscription will receive; queues: 0


@dataclass(frozen=True)
class Unsubscribed:
    kind: Kind
    name: str


class Receipt(NamedTuple):
    """Where a published message went. (A named tuple, like `Delivery`: every node builds one
    per published message.)"""

    kind: Kind
    name: str
    sequence: int  # position in the queue or offset in the topic
    duplicate: bool  # True when (producer_id, sequence) was seen before: this is the original


@dataclass(frozen=True)
class Receipts:
    """A `PublishBatch` result: one receipt per item, in item order."""

    receipts: tuple[Receipt, ...]


class Delivery(NamedTuple):
    """One message handed out by a consume. (A named tuple rather than a frozen dataclass:
    every node builds one per delivered message, and a frozen dataclass's constructor costs
    nearly three times as much.)"""

    kind: Kind
    name: str
    sequence: int
    body: bytes
    delivery_count: int  # 1 on first delivery; never goes backwards
    publish_time_ms: int
    producer_id: str
    lease_deadline_ms: int  # ack before this, or the message is delivered again


@dataclass(frozen=True)
class Deliveries:
    deliveries: tuple[Delivery, ...]
    # Unless more_ready: the earliest time something may become ready for this consumer (a
    # lease expiring, a delayed message), or 0 if only a publish or nack can help. Lets a
    # long-poll sleep exactly, and a stream wait for the next publish without asking again.
    next_ready_ms: int = 0
    # The consume stopped while messages were still ready (max_messages, the reply's bytes, or
    # expired messages it dropped instead): ask again at once.
    more_ready: bool = False


@dataclass(frozen=True)
class Done:
    """Ack, nack and extend succeed with nothing to report."""


@dataclass(frozen=True)
class TopicInfo:
    name: str
    owner: str
    subscribed: bool
    first_offset: int
    next_offset: int
    # Access lists, shown to the owner and admins only (empty for everyone else).
    publishers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueueInfo:
    name: str
    owner: str
    subscribed: bool
    depth: int  # messages stored: ready, delayed or leased
    in_flight: int  # of which leased to a consumer now
    # Access lists, shown to the owner and admins only (empty for everyone else).
    publishers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()


@dataclass(frozen=True)
class UserInfo:
    user_id: str
    admin: bool
    revoked: bool = False


@dataclass(frozen=True)
class UserSummary:
    """One row of ListUsers (admins only)."""

    user_id: str
    admin: bool
    revoked: bool
    topics_owned: int
    queues_owned: int


@dataclass(frozen=True)
class MemberRecord:
    """One registry entry: a member added with AddMember, or a RemoveMember tombstone."""

    node_id: str
    client_address: str
    raft_address: str
    removed: bool


Result = (
    UserCreated
    | Created
    | Deleted
    | Subscribed
    | Unsubscribed
    | Receipt
    | Receipts
    | Deliveries
    | Done
    | ChasquiError
)


# ---------------------------------------------------------------------------------------------
# Encoding.

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

# Apply rules, by release. Each has its own version of both formats.
RULES_ORIGINAL = 1
# Dead-letter moves are authorized: the source queue's owner must be allowed to publish to the
# dead-letter queue, and a dead-letter queue re-created after the source queue is not its own.
# A queue lease belongs to the user that consumed it: only that user (or an admin) may ack,
# nack or extend it.
RULES_ACCESS_CHECKED = 2
RULES_CURRENT = RULES_ACCESS_CHECKED
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


def readies(command: Command) -> tuple[Kind, str] | None:
    """The queue or topic where applying `command` may make a message ready to consume."""
    if isinstance(command, Publish | PublishBatch | Nack):
        return command.kind, command.name
    return None


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
