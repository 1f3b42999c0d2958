"""The state's key schema and value codecs: the one reference for what the store holds.

Integers in keys are big-endian u64 (`<u64>`), so byte order is numeric order; `<inc>` is a
queue's or topic's incarnation id, fresh for every create, so a re-created name never sees the
records of a deleted one. Metadata values are JSON with sorted keys; message and cursor values
are struct-packed, bodies stored raw.

    m:clock                      <u64> largest now_ms applied so far
    m:users                      <u64> users created; user ids are "u1", "u2", ...
    m:topics, m:queues           <u64> live topics / queues, checked against TOPICS_MAX / QUEUES_MAX
    m:incarnation                <u64> last incarnation id handed out
    u:<key_hash>                 json {"admin", "id"}, plus "revoked": true once revoked
    i:<user_id>                  the user's key hash (users created before this index existed
                                 are found by scanning u:)
    o:q:<user_id>, o:t:<user_id> <u64> queues / topics the user owns, against USER_QUEUES_MAX /
                                 USER_TOPICS_MAX (ownership never changes hands)
    t:<name>                     json TopicMeta: incarnation, owner, retention, first/next offset,
                                 stored body bytes, access lists
    q:<name>                     json QueueMeta: incarnation, owner, settings, next sequence,
                                 depth, access lists
    T<inc><offset u64>           topic message: >QH publish_time_ms, len(producer_id);
                                 producer_id; body
    S<inc><user_id>              topic subscription: >QQQQQ acked, delivered, lease_deadline_ms,
                                 high (largest offset ever delivered + 1), redeliveries
    Q<inc><sequence u64>         queue message: >QQQ?H publish_time_ms, visible_at_ms,
                                 delivery_count, leased, len(producer_id); producer_id; body
    V<inc><visible_at u64><seq>  visibility index; value b"L" + the lessee's user id while leased
                                 (b"L" alone for leases of the original rules), b"" when
                                 ready/delayed
    C<inc><user_id>              queue consumer record (Subscribe kind=QUEUE), empty value
    D<inc><len u8><producer_id><first producer_sequence u64>
                                 dedup run: >QQQ last producer_sequence, the sequence/offset
                                 given to the first, expires_at_ms. One command's new publishes
                                 with consecutive producer sequences (their sequences/offsets
                                 are consecutive too) share one run. A 16-byte >QQ record
                                 (sequence/offset, expires_at_ms), written before runs, is a run
                                 of one.
    E<expires_at u64><D key without its "D">
                                 dedup expiry index, purged in time order
    X<inc>                       incarnation deleted, its T/S/Q/V/C records still being purged
    n:<node_id>                  json {"client", "raft", "removed"}: the member registry

Every key is built by one function here (`queue_message_key(incarnation, sequence)`, ...) and
every integer read back from a key by one named reader (`visibility_visible_at_ms(key)`, ...),
with the offsets named beside them. The hot loops of consume, ack and publish still build keys
by concatenating a prefix made once per command (`queue_message_prefix(incarnation)`) with
`u64(sequence)`: a function call per message there was a measurable share of their cost.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from chasqui_node.commands import Kind, MemberRecord, UserInfo

# ---------------------------------------------------------------------------------------------
# Value layouts.

U64 = struct.Struct(">Q")
TOPIC_MESSAGE = struct.Struct(">QH")  # publish_time_ms, len(producer_id)
QUEUE_MESSAGE = struct.Struct(">QQQ?H")  # publish_time, visible_at, count, leased, len(producer)
CURSOR = struct.Struct(">QQQQQ")  # acked, delivered, lease_deadline_ms, high, redeliveries
DEDUP_RECORD = struct.Struct(">QQ")  # a dedup record from before runs: position, expires_at_ms
DEDUP_RUN = struct.Struct(">QQQ")  # last producer sequence, position of the first, expires_at_ms
LEASED = b"L"  # a visibility index value starting with this marks a lease

u64: Callable[[int], bytes] = U64.pack  # bound directly: called several times per message


def read_u64(data: bytes, at: int = 0) -> int:
    value: int = U64.unpack_from(data, at)[0]
    return value


# ---------------------------------------------------------------------------------------------
# Keys: fixed metadata keys and prefixes.

CLOCK_KEY = b"m:clock"
USERS_KEY = b"m:users"
TOPICS_KEY = b"m:topics"
QUEUES_KEY = b"m:queues"
INCARNATION_KEY = b"m:incarnation"
USER_PREFIX = b"u:"
USER_INDEX_PREFIX = b"i:"
OWNED_QUEUES_PREFIX = b"o:q:"
OWNED_TOPICS_PREFIX = b"o:t:"
TOPIC_META_PREFIX = b"t:"
QUEUE_META_PREFIX = b"q:"
TOPIC_MESSAGE_PREFIX = b"T"
SUBSCRIPTION_PREFIX = b"S"
QUEUE_MESSAGE_PREFIX = b"Q"
VISIBILITY_PREFIX = b"V"
CONSUMER_PREFIX = b"C"
DEDUP_PREFIX = b"D"
DEDUP_EXPIRY_PREFIX = b"E"
DELETED_PREFIX = b"X"
MEMBER_PREFIX = b"n:"
# The records of an incarnation, purged in this order once it is deleted.
INCARNATION_PREFIXES = (
    TOPIC_MESSAGE_PREFIX,
    SUBSCRIPTION_PREFIX,
    QUEUE_MESSAGE_PREFIX,
    VISIBILITY_PREFIX,
    CONSUMER_PREFIX,
)

# Offsets inside keys. T, S, Q, V, C, D and X keys are one prefix byte and the incarnation.
INCARNATION_AT = 1
INCARNATION_PREFIX_BYTES = 9  # prefix byte + <inc>: all records of one kind and incarnation
TOPIC_MESSAGE_OFFSET_AT = 9  # T<inc><offset>
QUEUE_MESSAGE_SEQUENCE_AT = 9  # Q<inc><sequence>
VISIBILITY_VISIBLE_AT_AT = 9  # V<inc><visible_at><sequence>
VISIBILITY_SEQUENCE_AT = 17
DEDUP_EXPIRY_EXPIRES_AT_AT = 1  # E<expires_at><dedup key without its "D">
DEDUP_EXPIRY_DEDUP_KEY_AT = 9
DEDUP_FIRST_SEQUENCE_BYTES = 8  # a dedup key ends with its run's first producer sequence


# -- key builders -----------------------------------------------------------------------------


def user_key(key_hash: str) -> bytes:
    return USER_PREFIX + key_hash.encode("utf-8", errors="surrogatepass")


def user_index_key(user_id: str) -> bytes:
    return USER_INDEX_PREFIX + user_id.encode()


def owned_key(kind: Kind, user_id: str) -> bytes:
    prefix = OWNED_TOPICS_PREFIX if kind is Kind.TOPIC else OWNED_QUEUES_PREFIX
    return prefix + user_id.encode()


def topic_meta_key(name: str) -> bytes:
    return TOPIC_META_PREFIX + name.encode()


def queue_meta_key(name: str) -> bytes:
    return QUEUE_META_PREFIX + name.encode()


def member_key(node_id: str) -> bytes:
    return MEMBER_PREFIX + node_id.encode()


def topic_message_prefix(incarnation: int) -> bytes:
    """T<inc>: a topic's messages follow, by offset."""
    return TOPIC_MESSAGE_PREFIX + u64(incarnation)


def topic_message_key(incarnation: int, offset: int) -> bytes:
    return TOPIC_MESSAGE_PREFIX + u64(incarnation) + u64(offset)


def subscription_key(incarnation: int, user_id: str) -> bytes:
    return SUBSCRIPTION_PREFIX + u64(incarnation) + user_id.encode()


def queue_message_prefix(incarnation: int) -> bytes:
    """Q<inc>: a queue's messages follow, by sequence."""
    return QUEUE_MESSAGE_PREFIX + u64(incarnation)


def queue_message_key(incarnation: int, sequence: int) -> bytes:
    return QUEUE_MESSAGE_PREFIX + u64(incarnation) + u64(sequence)


def visibility_prefix(incarnation: int) -> bytes:
    """V<inc>: a queue's visibility index follows, by time the message becomes visible."""
    return VISIBILITY_PREFIX + u64(incarnation)


def visibility_key(incarnation: int, visible_at_ms: int, sequence: int) -> bytes:
    return VISIBILITY_PREFIX + u64(incarnation) + u64(visible_at_ms) + u64(sequence)


def consumer_key(incarnation: int, user_id: str) -> bytes:
    return CONSUMER_PREFIX + u64(incarnation) + user_id.encode()


def dedup_prefix(incarnation: int, producer_id: str) -> bytes:
    """D<inc><len u8><producer_id>: a producer's dedup runs follow, by first sequence."""
    producer = producer_id.encode()
    return DEDUP_PREFIX + u64(incarnation) + bytes([len(producer)]) + producer


def dedup_key(producer_prefix: bytes, first_sequence: int) -> bytes:
    """The key of the run starting at `first_sequence`, under `dedup_prefix(...)`."""
    return producer_prefix + u64(first_sequence)


def dedup_expiry_key(expires_at_ms: int, dedup_key: bytes) -> bytes:
    """E<expires_at u64><the dedup key without its "D">; `dedup_expiry_dedup_key` reads it
    back."""
    return DEDUP_EXPIRY_PREFIX + u64(expires_at_ms) + dedup_key[1:]


def deleted_key(incarnation: int) -> bytes:
    return DELETED_PREFIX + u64(incarnation)


# -- key readers ------------------------------------------------------------------------------


def topic_message_offset(key: bytes) -> int:
    """The offset of a T key."""
    value: int = U64.unpack_from(key, TOPIC_MESSAGE_OFFSET_AT)[0]
    return value


def queue_message_sequence(key: bytes) -> int:
    """The sequence of a Q key."""
    value: int = U64.unpack_from(key, QUEUE_MESSAGE_SEQUENCE_AT)[0]
    return value


def visibility_visible_at_ms(key: bytes) -> int:
    """When the message of a V key becomes visible (its lease deadline while leased)."""
    value: int = U64.unpack_from(key, VISIBILITY_VISIBLE_AT_AT)[0]
    return value


def visibility_sequence(key: bytes) -> int:
    """The sequence of the message a V key indexes."""
    value: int = U64.unpack_from(key, VISIBILITY_SEQUENCE_AT)[0]
    return value


def visibility_sequence_bytes(key: bytes) -> bytes:
    """The `u64(sequence)` a V key ends with, to build the message's Q key from."""
    return key[VISIBILITY_SEQUENCE_AT:]


def dedup_first_sequence(key: bytes) -> int:
    """The first producer sequence of a D key's run."""
    return read_u64(key, len(key) - DEDUP_FIRST_SEQUENCE_BYTES)


def dedup_expiry_expires_at_ms(key: bytes) -> int:
    """When the dedup run an E key indexes expires."""
    value: int = U64.unpack_from(key, DEDUP_EXPIRY_EXPIRES_AT_AT)[0]
    return value


def dedup_expiry_dedup_key(key: bytes) -> bytes:
    """The D key an E key indexes."""
    return DEDUP_PREFIX + key[DEDUP_EXPIRY_DEDUP_KEY_AT:]


def deleted_incarnation_bytes(key: bytes) -> bytes:
    """The `u64(incarnation)` of an X key: its records are the incarnation prefixes + this."""
    return key[INCARNATION_AT:]


# ---------------------------------------------------------------------------------------------
# Values: metadata (JSON).


@dataclass
class TopicMeta:
    incarnation: int
    owner: str
    retention_ms: int
    retention_bytes: int
    first_offset: int
    next_offset: int
    stored_bytes: int
    publishers: list[str] = field(default_factory=list)  # empty: anyone may publish
    consumers: list[str] = field(default_factory=list)  # empty: anyone may consume

    def copy(self) -> TopicMeta:
        return copy_meta(self)


@dataclass
class QueueMeta:
    incarnation: int
    owner: str
    visibility_timeout_ms: int
    max_deliveries: int
    dead_letter_queue: str
    max_length: int  # 0: limits.QUEUE_DEPTH_MAX, read when publishing
    overflow: str
    message_ttl_ms: int
    next_sequence: int
    depth: int
    publishers: list[str] = field(default_factory=list)  # empty: anyone may publish
    consumers: list[str] = field(default_factory=list)  # empty: anyone may consume

    def copy(self) -> QueueMeta:
        return copy_meta(self)


Meta = TypeVar("Meta", TopicMeta, QueueMeta)


def copy_meta(meta: Meta) -> Meta:
    """An independent copy, made field by field: several times cheaper than decoding the JSON
    again, or than `dataclasses.replace`."""
    fields = meta.__dict__.copy()
    fields["publishers"] = fields["publishers"].copy()
    fields["consumers"] = fields["consumers"].copy()
    clone = object.__new__(type(meta))
    clone.__dict__ = fields
    return clone


_JSON_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def encode_json(record: TopicMeta | QueueMeta | dict[str, Any]) -> bytes:
    # A metadata dataclass's __dict__ holds exactly its fields (the lists are only read), so
    # this is the JSON of `dataclasses.asdict(record)` without its deep copy.
    fields = record if isinstance(record, dict) else vars(record)
    return _JSON_ENCODER.encode(fields).encode()


def decode_meta(cls: type[Meta], value: bytes) -> Meta:
    return cls(**json.loads(value))


def encode_user(user_id: str, admin: bool, revoked: bool) -> bytes:
    record: dict[str, Any] = {"admin": admin, "id": user_id}
    if revoked:
        record["revoked"] = True
    return encode_json(record)


def decode_user(value: bytes) -> UserInfo:
    record = json.loads(value)
    return UserInfo(
        user_id=record["id"], admin=record["admin"], revoked=record.get("revoked", False)
    )


def encode_member(client: str, raft: str, removed: bool) -> bytes:
    return encode_json({"client": client, "raft": raft, "removed": removed})


def decode_member(node_id: str, value: bytes) -> MemberRecord:
    record = json.loads(value)
    return MemberRecord(node_id, record["client"], record["raft"], record["removed"])


# ---------------------------------------------------------------------------------------------
# Values: messages, cursors, dedup runs (struct-packed).


@dataclass(slots=True)
class QueueMessage:
    publish_time_ms: int
    visible_at_ms: int
    delivery_count: int
    leased: bool
    producer_id: str
    body: bytes

    def encode(self) -> bytes:
        producer = self.producer_id.encode()
        header = QUEUE_MESSAGE.pack(
            self.publish_time_ms,
            self.visible_at_ms,
            self.delivery_count,
            self.leased,
            len(producer),
        )
        return header + producer + self.body

    @staticmethod
    def decode(value: bytes) -> QueueMessage:
        publish_time, visible_at, count, leased, producer_len = QUEUE_MESSAGE.unpack_from(value)
        start = QUEUE_MESSAGE.size
        producer = value[start : start + producer_len].decode()
        body = value[start + producer_len :]
        return QueueMessage(publish_time, visible_at, count, leased, producer, body)


@dataclass
class Cursor:
    """A topic subscription: `acked` is the next offset not yet acked, `delivered` the next not
    yet handed out; [acked, delivered) is leased until `lease_deadline_ms`. `redeliveries` counts
    window resets since everything below `high` was acked, which gives delivery counts.

    `windows` holds the first offset of each consume reply not yet acked past, ascending. Acks
    are cumulative, so a client that never received one reply (lost in a leader change) and
    acks a later one would silently skip it; an ack may therefore not cross into a later
    window while an earlier one is unacked (see `topics.ack_offset`)."""

    acked: int
    delivered: int
    lease_deadline_ms: int
    high: int
    redeliveries: int
    windows: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        return CURSOR.pack(
            self.acked, self.delivered, self.lease_deadline_ms, self.high, self.redeliveries
        ) + b"".join(u64(start) for start in self.windows)

    @staticmethod
    def decode(value: bytes) -> Cursor:
        starts = value[CURSOR.size :]
        windows = [read_u64(starts, at) for at in range(0, len(starts), 8)]
        acked, delivered, lease_deadline_ms, high, redeliveries = CURSOR.unpack_from(value)
        return Cursor(acked, delivered, lease_deadline_ms, high, redeliveries, windows)

    def rewind(self) -> None:
        """Hand everything not acked out again, from `acked`."""
        self.delivered = self.acked
        self.redeliveries += 1
        self.windows.clear()


class DedupRun(NamedTuple):
    """A stored dedup record: producer sequences first..last were given positions (sequences
    or offsets) from `position` on, and are duplicates until `expires_at_ms`."""

    key: bytes
    first: int
    last: int
    position: int
    expires_at_ms: int

    @classmethod
    def decode(cls, key: bytes, value: bytes) -> DedupRun:
        first = dedup_first_sequence(key)
        if len(value) == DEDUP_RECORD.size:  # written before runs: a run of one
            position, expires_at_ms = DEDUP_RECORD.unpack(value)
            return cls(key, first, first, position, expires_at_ms)
        last, position, expires_at_ms = DEDUP_RUN.unpack(value)
        return cls(key, first, last, position, expires_at_ms)


def encode_dedup_run(last: int, position: int, expires_at_ms: int) -> bytes:
    return DEDUP_RUN.pack(last, position, expires_at_ms)
