"""The deterministic heart of Chasqui: applies committed entries to a key-value store.

Plain Python: no I/O, no clock, no randomness, no logging. Time arrives as data (`Entry.now_ms`,
stamped by the leader) and is folded into a stored clock that never goes backwards, so every
replica fed the same entries in the same order ends byte-identical and returns identical results.

All state lives in a `Store` passed in: the node passes a wrapper around an LMDB write transaction
(one per entry, aborted whole if `apply_entry` raises), tests pass `MemoryStore`.

Key schema. Integers in keys are big-endian u64 (`<u64>`), so byte order is numeric order;
`<inc>` is a queue's or topic's incarnation id, fresh for every create, so a re-created name never
sees the records of a deleted one. Metadata values are JSON with sorted keys; message and cursor
values are struct-packed, bodies stored raw.

    m:clock                      <u64> largest now_ms applied so far
    m:users                      <u64> users created; user ids are "u1", "u2", ...
    m:topics, m:queues           <u64> live topics / queues, checked against TOPICS_MAX / QUEUES_MAX
    m:incarnation                <u64> last incarnation id handed out
    u:<key_hash>                 json {"admin", "id"}, plus "revoked": true once revoked
    i:<user_id>                  the user's key hash (users created before this index existed
                                 are found by scanning u:)
    o:q:<user_id>, o:t:<user_id> <u64> queues / topics the user owns, against USER_QUEUES_MAX /
                                 USER_TOPICS_MAX (ownership never changes hands)
    t:<name>                     json _TopicMeta: incarnation, owner, retention, first/next offset,
                                 stored body bytes, access lists
    q:<name>                     json _QueueMeta: incarnation, owner, settings, next sequence,
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

Bounded work: no command loads a whole queue or topic. Per command, at most
`DEDUP_PURGE_PER_COMMAND` dedup records, `DELETED_PURGE_PER_COMMAND` records of deleted
incarnations and `RETENTION_PURGE_PER_COMMAND` expired topic or queue messages are removed;
counters live in the metadata records.

Refusals: each handler validates fully (raising a `ChasquiError`) before its first write;
`apply_entry` turns the raise into the command's result, so a refused command writes nothing.
Topic and queue metadata an entry changes is kept decoded and stored once, after the entry's last
command (see `_Applier`); the stored bytes are the same as writing it after every command.
Housekeeping (dedup expiry, purging deleted incarnations) runs before each command and writes
only when there is something to purge.
"""

from __future__ import annotations

import bisect
import itertools
import json
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

from chasqui_node import limits
from chasqui_node.commands import (
    RULES_ACCESS_CHECKED,
    Ack,
    AckBatch,
    AddMember,
    Command,
    Consume,
    Created,
    CreateQueue,
    CreateTopic,
    CreateUser,
    CreateUserAsAdmin,
    Deleted,
    DeleteQueue,
    DeleteTopic,
    Deliveries,
    Delivery,
    Done,
    EnsureAdmin,
    Entry,
    Extend,
    Kind,
    MemberRecord,
    Nack,
    Overflow,
    Publish,
    PublishBatch,
    QueueInfo,
    Receipt,
    Receipts,
    RemoveMember,
    Result,
    RevokeUser,
    SetAccess,
    StartPosition,
    Subscribe,
    Subscribed,
    TopicInfo,
    Unsubscribe,
    Unsubscribed,
    UserCreated,
    UserInfo,
    UserSummary,
    check_name,
)
from chasqui_node.errors import (
    AlreadyExists,
    ChasquiError,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    QueueFull,
    ResourceExhausted,
    Unauthenticated,
)

# Integers that reach keys, struct fields or clock arithmetic stay below this.
INT_MAX = limits.OFFSET_MAX
_SCAN_PAGE = 1000
_TOPIC_PAGE = 16  # topic messages read per scan while consuming (bodies up to 1 MiB each)


class Store(Protocol):
    """The key-value state the machine reads and writes; one transaction per entry."""

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> bool:
        """Remove `key`; True if it existed."""
        ...

    def scan(
        self, prefix: bytes, start: bytes = b"", limit: int = 1000
    ) -> list[tuple[bytes, bytes]]:
        """Pairs whose key starts with `prefix`, ascending byte order, beginning at
        max(prefix, start); at most `limit`."""
        ...

    def floor(self, prefix: bytes, key: bytes) -> tuple[bytes, bytes] | None:
        """The pair with the greatest key <= `key`, if that key starts with `prefix`."""
        ...


class MemoryStore:
    """A `Store` in a dict plus a sorted key list; for tests and property checks."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        if key not in self._data:
            bisect.insort(self._keys, key)
        self._data[key] = bytes(value)

    def delete(self, key: bytes) -> bool:
        if key not in self._data:
            return False
        del self._data[key]
        del self._keys[bisect.bisect_left(self._keys, key)]
        return True

    def scan(
        self, prefix: bytes, start: bytes = b"", limit: int = 1000
    ) -> list[tuple[bytes, bytes]]:
        index = bisect.bisect_left(self._keys, max(prefix, start))
        pairs: list[tuple[bytes, bytes]] = []
        while index < len(self._keys) and len(pairs) < limit:
            key = self._keys[index]
            if not key.startswith(prefix):
                break
            pairs.append((key, self._data[key]))
            index += 1
        return pairs

    def floor(self, prefix: bytes, key: bytes) -> tuple[bytes, bytes] | None:
        index = bisect.bisect_right(self._keys, key) - 1
        if index < 0 or not self._keys[index].startswith(prefix):
            return None
        found = self._keys[index]
        return found, self._data[found]

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every pair in key order, for comparing replicas."""
        return [(key, self._data[key]) for key in self._keys]

    def copy(self) -> MemoryStore:
        """An independent snapshot (keys and values are immutable bytes)."""
        clone = MemoryStore()
        clone._data = dict(self._data)
        clone._keys = list(self._keys)
        return clone


# ---------------------------------------------------------------------------------------------
# Encoding of keys and values.

_U64 = struct.Struct(">Q")
_TOPIC_MESSAGE = struct.Struct(">QH")
_QUEUE_MESSAGE = struct.Struct(">QQQ?H")
_CURSOR = struct.Struct(">QQQQQ")
_DEDUP = struct.Struct(">QQ")  # a dedup record from before runs
_DEDUP_RUN = struct.Struct(">QQQ")

_K_CLOCK = b"m:clock"
_K_USERS = b"m:users"
_K_TOPICS = b"m:topics"
_K_QUEUES = b"m:queues"
_K_INCARNATION = b"m:incarnation"
_P_USER = b"u:"
_P_USER_INDEX = b"i:"
_P_OWNED_QUEUES = b"o:q:"
_P_OWNED_TOPICS = b"o:t:"
_P_TOPIC_META = b"t:"
_P_QUEUE_META = b"q:"
_P_TOPIC_MESSAGE = b"T"
_P_SUBSCRIPTION = b"S"
_P_QUEUE_MESSAGE = b"Q"
_P_VISIBILITY = b"V"
_P_CONSUMER = b"C"
_P_DEDUP = b"D"
_P_DEDUP_EXPIRY = b"E"
_P_DELETED = b"X"
_P_MEMBER = b"n:"
_INCARNATION_PREFIXES = (
    _P_TOPIC_MESSAGE,
    _P_SUBSCRIPTION,
    _P_QUEUE_MESSAGE,
    _P_VISIBILITY,
    _P_CONSUMER,
)
_LEASED = b"L"


_u64: Callable[[int], bytes] = _U64.pack  # bound directly: called several times per message


def _read_u64(data: bytes, at: int = 0) -> int:
    value: int = _U64.unpack_from(data, at)[0]
    return value


def _get_counter(store: Store, key: bytes) -> int:
    value = store.get(key)
    return 0 if value is None else _read_u64(value)


@dataclass
class _TopicMeta:
    incarnation: int
    owner: str
    retention_ms: int
    retention_bytes: int
    first_offset: int
    next_offset: int
    stored_bytes: int
    publishers: list[str] = field(default_factory=list)  # empty: anyone may publish
    consumers: list[str] = field(default_factory=list)  # empty: anyone may consume

    def copy(self) -> _TopicMeta:
        return _copy_meta(self)


@dataclass
class _QueueMeta:
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

    def copy(self) -> _QueueMeta:
        return _copy_meta(self)


_Meta = TypeVar("_Meta", _TopicMeta, _QueueMeta)


def _copy_meta(meta: _Meta) -> _Meta:
    """An independent copy, made field by field: several times cheaper than decoding the JSON
    again, or than `dataclasses.replace`."""
    fields = meta.__dict__.copy()
    fields["publishers"] = fields["publishers"].copy()
    fields["consumers"] = fields["consumers"].copy()
    clone = object.__new__(type(meta))
    clone.__dict__ = fields
    return clone


_JSON_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _encode_json(record: _TopicMeta | _QueueMeta | dict[str, Any]) -> bytes:
    # A metadata dataclass's __dict__ holds exactly its fields (the lists are only read), so
    # this is the JSON of `dataclasses.asdict(record)` without its deep copy.
    fields = record if isinstance(record, dict) else vars(record)
    return _JSON_ENCODER.encode(fields).encode()


def _decode_meta(cls: type[_Meta], value: bytes) -> _Meta:
    return cls(**json.loads(value))


@dataclass(slots=True)
class _QueueMessage:
    publish_time_ms: int
    visible_at_ms: int
    delivery_count: int
    leased: bool
    producer_id: str
    body: bytes

    def encode(self) -> bytes:
        producer = self.producer_id.encode()
        header = _QUEUE_MESSAGE.pack(
            self.publish_time_ms,
            self.visible_at_ms,
            self.delivery_count,
            self.leased,
            len(producer),
        )
        return header + producer + self.body

    @staticmethod
    def decode(value: bytes) -> _QueueMessage:
        publish_time, visible_at, count, leased, producer_len = _QUEUE_MESSAGE.unpack_from(value)
        start = _QUEUE_MESSAGE.size
        producer = value[start : start + producer_len].decode()
        body = value[start + producer_len :]
        return _QueueMessage(publish_time, visible_at, count, leased, producer, body)


class _NewMessage(NamedTuple):
    """A batch item that is not a duplicate, with the sequence or offset it will be given.
    (A named tuple rather than a frozen dataclass: one is built per published message, and a
    frozen dataclass's constructor costs several times as much.)"""

    body: bytes
    delay_ms: int
    producer_sequence: int
    position: int


class _DedupRun(NamedTuple):
    """A stored dedup record: producer sequences first..last were given positions (sequences
    or offsets) from `position` on, and are duplicates until `expires_at_ms`."""

    key: bytes
    first: int
    last: int
    position: int
    expires_at_ms: int

    @classmethod
    def decode(cls, key: bytes, value: bytes) -> _DedupRun:
        first = _read_u64(key, len(key) - 8)
        if len(value) == _DEDUP.size:  # written before runs: a run of one
            position, expires_at_ms = _DEDUP.unpack(value)
            return cls(key, first, first, position, expires_at_ms)
        last, position, expires_at_ms = _DEDUP_RUN.unpack(value)
        return cls(key, first, last, position, expires_at_ms)


class _BatchPlan(NamedTuple):
    """What `plan_batch` decided: every item's receipt, the new items, the dedup key prefix of
    the producer (b"" without a producer id) and the expired runs the new items replace."""

    receipts: list[Receipt]
    new_messages: list[_NewMessage]
    dedup_prefix: bytes
    expired_runs: list[_DedupRun]


@dataclass
class _Cursor:
    """A topic subscription: `acked` is the next offset not yet acked, `delivered` the next not
    yet handed out; [acked, delivered) is leased until `lease_deadline_ms`. `redeliveries` counts
    window resets since everything below `high` was acked, which gives delivery counts.

    `windows` holds the first offset of each consume reply not yet acked past, ascending. Acks
    are cumulative, so a client that never received one reply (lost in a leader change) and
    acks a later one would silently skip it; an ack may therefore not cross into a later
    window while an earlier one is unacked (see `ack`)."""

    acked: int
    delivered: int
    lease_deadline_ms: int
    high: int
    redeliveries: int
    windows: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        return _CURSOR.pack(
            self.acked, self.delivered, self.lease_deadline_ms, self.high, self.redeliveries
        ) + b"".join(_u64(start) for start in self.windows)

    @staticmethod
    def decode(value: bytes) -> _Cursor:
        starts = value[_CURSOR.size :]
        windows = [_read_u64(starts, at) for at in range(0, len(starts), 8)]
        acked, delivered, lease_deadline_ms, high, redeliveries = _CURSOR.unpack_from(value)
        return _Cursor(acked, delivered, lease_deadline_ms, high, redeliveries, windows)

    def rewind(self) -> None:
        """Hand everything not acked out again, from `acked`."""
        self.delivered = self.acked
        self.redeliveries += 1
        self.windows.clear()


def _topic_message_key(incarnation: int, offset: int) -> bytes:
    return _P_TOPIC_MESSAGE + _u64(incarnation) + _u64(offset)


def _subscription_key(incarnation: int, user_id: str) -> bytes:
    return _P_SUBSCRIPTION + _u64(incarnation) + user_id.encode()


def _queue_message_key(incarnation: int, sequence: int) -> bytes:
    return _P_QUEUE_MESSAGE + _u64(incarnation) + _u64(sequence)


def _visibility_key(incarnation: int, visible_at_ms: int, sequence: int) -> bytes:
    return _P_VISIBILITY + _u64(incarnation) + _u64(visible_at_ms) + _u64(sequence)


def _consumer_key(incarnation: int, user_id: str) -> bytes:
    return _P_CONSUMER + _u64(incarnation) + user_id.encode()


def _dedup_prefix(incarnation: int, producer_id: str) -> bytes:
    """D<inc><len u8><producer_id>: a producer's dedup runs follow, by first sequence."""
    producer = producer_id.encode()
    return _P_DEDUP + _u64(incarnation) + bytes([len(producer)]) + producer


def _dedup_expiry_key(expires_at_ms: int, dedup_key: bytes) -> bytes:
    """E<expires_at u64><the dedup key without its "D">; `purge_dedup` reads it back."""
    return _P_DEDUP_EXPIRY + _u64(expires_at_ms) + dedup_key[1:]


# ---------------------------------------------------------------------------------------------
# Stateless checks the edges already made; the state machine asserts them once more.


def _check_int(what: str, value: int, low: int, high: int, limit_name: str, unit: str = "") -> None:
    if value < low:
        raise InvalidArgument(f"{what} must be at least {low}, got {value}")
    if value > high:
        raise LimitExceeded(what, value, limit_name, high, unit)


def _reply_bytes(name: str, producer_id: str, body: bytes) -> int:
    """What one delivery adds to a consume reply, at most; compared with CONSUME_BYTES_MAX."""
    return len(body) + len(name) + len(producer_id.encode()) + limits.DELIVERY_ENVELOPE_BYTES


def _check_assigned(queue: _QueueMeta, queue_name: str, sequence: int) -> None:
    if not 0 <= sequence < queue.next_sequence:
        raise NotFound(f'message {sequence} was never published to queue "{queue_name}"')


def _check_sequence(what: str, value: int) -> None:
    if not 0 <= value <= INT_MAX:
        raise InvalidArgument(f"{what} must be between 0 and {INT_MAX}, got {value}")


_ACTION_WORDS = {
    "publish": "publish to",
    "subscribe": "subscribe to",
    "consume": "consume from",
}


def _allowed(user: UserInfo, action: str, meta: _TopicMeta | _QueueMeta) -> bool:
    """Whether `user` may do `action` ("publish", "subscribe", "consume"; ack, nack and extend
    count as consume) on a topic or queue. The owner and admins always may; otherwise an empty
    access list lets everyone in."""
    if user.admin or user.user_id == meta.owner:
        return True
    allowed = meta.publishers if action == "publish" else meta.consumers
    return not allowed or user.user_id in allowed


def _authorize(
    user: UserInfo, action: str, kind: Kind, name: str, meta: _TopicMeta | _QueueMeta
) -> None:
    """Raise PermissionDenied when `user` may not do `action` on the named topic or queue
    (see `_allowed`)."""
    if not _allowed(user, action, meta):
        list_name = "publishers" if action == "publish" else "consumers"
        raise PermissionDenied(
            f'user {user.user_id} may not {_ACTION_WORDS[action]} {kind.value} "{name}": '
            f"not on its {list_name} list (owner {meta.owner})"
        )


def _user_key(key_hash: str) -> bytes:
    return _P_USER + key_hash.encode("utf-8", errors="surrogatepass")


def _lookup_user(store: Store, key_hash: str) -> UserInfo | None:
    value = store.get(_user_key(key_hash))
    if value is None:
        return None
    record = json.loads(value)
    return UserInfo(
        user_id=record["id"], admin=record["admin"], revoked=record.get("revoked", False)
    )


def _authenticated(store: Store, key_hash: str) -> UserInfo:
    """Raises Unauthenticated for an unknown or revoked key."""
    return _check_authenticated(_lookup_user(store, key_hash))


def _check_authenticated(user: UserInfo | None) -> UserInfo:
    if user is None:
        raise Unauthenticated("unknown key")
    if user.revoked:
        raise Unauthenticated(f"the key of user {user.user_id} has been revoked")
    return user


def _visible_lists(
    user: UserInfo, meta: _TopicMeta | _QueueMeta
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Access lists are the owner's business: shown to the owner and admins, empty to others."""
    if user.admin or user.user_id == meta.owner:
        return tuple(meta.publishers), tuple(meta.consumers)
    return (), ()


def _owned_key(kind: Kind, user_id: str) -> bytes:
    prefix = _P_OWNED_TOPICS if kind is Kind.TOPIC else _P_OWNED_QUEUES
    return prefix + user_id.encode()


# ---------------------------------------------------------------------------------------------


class StateMachine:
    """Applies entries and answers read-only queries. Holds no state of its own: everything is in
    the `Store`, so one instance may serve any number of stores.

    `apply_entry` runs on the replication thread inside one write transaction. It never raises
    for anything a client can send; an unexpected exception is a bug and the caller must abort
    the entry's transaction. The queries run on a read transaction and raise `ChasquiError`."""

    def apply_entry(self, store: Store, entry: Entry) -> list[Result]:
        stored_clock = _get_counter(store, _K_CLOCK)
        clock = max(stored_clock, min(max(entry.now_ms, 0), INT_MAX // 2))
        if clock != stored_clock:
            store.put(_K_CLOCK, _u64(clock))
        applier = _Applier(store, clock, entry.rules)
        results: list[Result] = []
        for command in entry.commands:
            applier.housekeep()
            try:
                results.append(applier.apply(command))
            except ChasquiError as error:
                results.append(error)
        applier.write_metas()
        return results

    def clock_ms(self, store: Store) -> int:
        """Cluster time as applied so far: the largest stamp of any entry (0 in a new state)."""
        return _get_counter(store, _K_CLOCK)

    def authenticate(self, store: Store, key_hash: str) -> UserInfo:
        """Raises Unauthenticated when no user has this key hash, or its key was revoked."""
        return _authenticated(store, key_hash)

    def list_users(self, store: Store, key_hash: str) -> list[UserSummary]:
        """Every user in creation order, revoked ones included. Admins only: raises
        PermissionDenied for anyone else (at most USERS_MAX rows)."""
        user = self.authenticate(store, key_hash)
        if not user.admin:
            raise PermissionDenied(f"user {user.user_id} is not an admin; only admins list users")
        users: list[UserSummary] = []
        for _, value in _scan_all(store, _P_USER):
            record = json.loads(value)
            user_id = record["id"]
            users.append(
                UserSummary(
                    user_id=user_id,
                    admin=record["admin"],
                    revoked=record.get("revoked", False),
                    topics_owned=_get_counter(store, _owned_key(Kind.TOPIC, user_id)),
                    queues_owned=_get_counter(store, _owned_key(Kind.QUEUE, user_id)),
                )
            )
        users.sort(key=lambda summary: (len(summary.user_id), summary.user_id))
        return users

    def members(self, store: Store) -> list[MemberRecord]:
        """The member registry sorted by node id, tombstones included (at most
        MEMBER_RECORDS_MAX). Unauthenticated: replication reads it to give leader hints."""
        return [_member_record(node_id, value) for node_id, value in _scan_all(store, _P_MEMBER)]

    def list_topics(self, store: Store, key_hash: str, owned_only: bool) -> list[TopicInfo]:
        """Every topic sorted by name (only the caller's with `owned_only`)."""
        user = self.authenticate(store, key_hash)
        topics: list[TopicInfo] = []
        for name, value in _scan_all(store, _P_TOPIC_META):
            meta = _decode_meta(_TopicMeta, value)
            if owned_only and meta.owner != user.user_id:
                continue
            subscribed = store.get(_subscription_key(meta.incarnation, user.user_id)) is not None
            publishers, consumers = _visible_lists(user, meta)
            topics.append(
                TopicInfo(
                    name,
                    meta.owner,
                    subscribed,
                    meta.first_offset,
                    meta.next_offset,
                    publishers,
                    consumers,
                )
            )
        return topics

    def list_queues(self, store: Store, key_hash: str, owned_only: bool) -> list[QueueInfo]:
        """Every queue sorted by name (only the caller's with `owned_only`). `in_flight` counts
        leases still running at the last applied clock, up to limits.IN_FLIGHT_COUNT_MAX."""
        user = self.authenticate(store, key_hash)
        clock = _get_counter(store, _K_CLOCK)
        queues: list[QueueInfo] = []
        for name, value in _scan_all(store, _P_QUEUE_META):
            meta = _decode_meta(_QueueMeta, value)
            if owned_only and meta.owner != user.user_id:
                continue
            subscribed = store.get(_consumer_key(meta.incarnation, user.user_id)) is not None
            prefix = _P_VISIBILITY + _u64(meta.incarnation)
            later = store.scan(prefix, prefix + _u64(clock + 1), limit=limits.IN_FLIGHT_COUNT_MAX)
            in_flight = sum(1 for _, mark in later if mark[:1] == _LEASED)
            publishers, consumers = _visible_lists(user, meta)
            queues.append(
                QueueInfo(
                    name, meta.owner, subscribed, meta.depth, in_flight, publishers, consumers
                )
            )
        return queues


def _member_record(node_id: str, value: bytes) -> MemberRecord:
    record = json.loads(value)
    return MemberRecord(node_id, record["client"], record["raft"], record["removed"])


def _check_address(what: str, address: str) -> None:
    _check_int(
        what, len(address.encode()), 1, limits.ADDRESS_BYTES_MAX, "address_bytes_max", "bytes"
    )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"{what} {address!r} is not host:port")


def _scan_all(store: Store, prefix: bytes) -> list[tuple[str, bytes]]:
    """All (name, value) under a metadata prefix, paging so no single scan is unbounded; the
    number of names is itself bounded by TOPICS_MAX / QUEUES_MAX."""
    found: list[tuple[str, bytes]] = []
    start = prefix
    while True:
        page = store.scan(prefix, start, limit=_SCAN_PAGE)
        for key, value in page:
            found.append((key[len(prefix) :].decode("utf-8", "surrogatepass"), value))
        if len(page) < _SCAN_PAGE:
            return found
        start = page[-1][0] + b"\x00"


class _Applier:
    """Applies the commands of one entry at one clock.

    It lives for one entry and caches what the entry's commands read again and again (an entry
    often carries a hundred acks of one queue): users by key hash, and topic and queue metadata
    decoded, which is written back once, by `write_metas` after the last command, rather than
    re-encoded per command. Handlers get a private copy of a cached meta and change the cache
    only through `put_meta` / `delete_meta`, so what a handler changes without storing it (a
    refused command, a consume that leaves the depth alone) is dropped as before. It also
    remembers facts that no later command of the entry can undo (no expired dedup record, no
    deleted incarnation left to purge, the age of a topic's oldest message) to skip scans."""

    def __init__(self, store: Store, clock: int, rules: int) -> None:
        self.store = store
        self.clock = clock
        self.rules = rules  # the entry's apply rules (commands.py): older entries keep theirs
        self.users: dict[str, UserInfo | None] = {}
        self.metas: dict[bytes, _TopicMeta | _QueueMeta | None] = {}  # None: no such name
        self.metas_changed: dict[bytes, None] = {}  # keys to write back, in first-change order
        self.names_checked: set[tuple[Kind, str]] = set()
        self.dedup_expired_none = False  # True once no dedup record is due at this clock
        self.deleted_none = False  # True once no deleted incarnation is left to purge
        # (incarnation, offset) of a topic's first stored message -> its publish_time_ms.
        self.topic_heads: dict[tuple[int, int], int] = {}
        self.handlers: dict[type[Any], Callable[[UserInfo, Any], Result]] = {
            CreateTopic: self.create_topic,
            DeleteTopic: self.delete_topic,
            CreateQueue: self.create_queue,
            DeleteQueue: self.delete_queue,
            Subscribe: self.subscribe,
            Unsubscribe: self.unsubscribe,
            Publish: self.publish,
            PublishBatch: self.publish_batch,
            Consume: self.consume,
            Ack: self.ack,
            AckBatch: self.ack_batch,
            Nack: self.nack,
            Extend: self.extend,
            CreateUserAsAdmin: self.create_user_as_admin,
            RevokeUser: self.revoke_user,
            SetAccess: self.set_access,
            AddMember: self.add_member,
            RemoveMember: self.remove_member,
        }

    # -- dispatch and housekeeping ------------------------------------------------------------

    def apply(self, command: Command) -> Result:
        if isinstance(command, CreateUser):
            return self.create_user(command.key_hash, command.admin)
        if isinstance(command, EnsureAdmin):
            return self.ensure_admin(command)
        return self.handlers[type(command)](self.authenticated(command.key_hash), command)

    def authenticated(self, key_hash: str) -> UserInfo:
        """Raises Unauthenticated for an unknown or revoked key."""
        try:
            user = self.users[key_hash]
        except KeyError:
            user = self.users[key_hash] = _lookup_user(self.store, key_hash)
        return _check_authenticated(user)

    def housekeep(self) -> None:
        self.purge_dedup()
        self.purge_deleted()

    def purge_dedup(self, budget: int = 0) -> None:
        """Remove dedup records expired at this clock, oldest first, at most `budget`
        (DEDUP_PURGE_PER_COMMAND when 0). The first page is one row: usually the oldest is not
        due."""
        if self.dedup_expired_none:
            return
        budget = budget or limits.DEDUP_PURGE_PER_COMMAND
        page_rows = 1
        while budget > 0:
            asked = min(page_rows, budget)
            rows = self.store.scan(_P_DEDUP_EXPIRY, limit=asked)
            for key, _ in rows:
                if _read_u64(key, 1) > self.clock:
                    # The clock stands still within an entry and new records expire later.
                    self.dedup_expired_none = True
                    return
                self.store.delete(key)
                self.store.delete(_P_DEDUP + key[9:])
            if len(rows) < asked:
                self.dedup_expired_none = True
                return
            budget -= len(rows)
            page_rows = _SCAN_PAGE

    def purge_deleted(self) -> None:
        if self.deleted_none:
            return
        pending = self.store.scan(_P_DELETED, limit=1)
        if not pending:
            self.deleted_none = True  # until a delete in this entry adds a marker
            return
        marker = pending[0][0]
        incarnation = marker[1:]
        budget = limits.DELETED_PURGE_PER_COMMAND
        for prefix in _INCARNATION_PREFIXES:
            rows = self.store.scan(prefix + incarnation, limit=budget)
            for key, _ in rows:
                self.store.delete(key)
            budget -= len(rows)
            if budget == 0:
                return  # maybe more left: the next command continues
        self.store.delete(marker)

    # -- counters and lookups -----------------------------------------------------------------

    def bump(self, key: bytes, delta: int) -> int:
        value = _get_counter(self.store, key) + delta
        self.store.put(key, _u64(value))
        return value

    def check_name(self, kind: Kind, name: str) -> None:
        """`check_name`, once per name and entry."""
        if (kind, name) not in self.names_checked:
            check_name(kind, name)
            self.names_checked.add((kind, name))

    def load_meta(self, cls: type[_Meta], key: bytes) -> _Meta | None:
        """A private copy of the metadata under `key` as this entry has left it so far."""
        try:
            meta = self.metas[key]
        except KeyError:
            value = self.store.get(key)
            meta = self.metas[key] = None if value is None else _decode_meta(cls, value)
        if meta is None:
            return None
        assert isinstance(meta, cls), "t: and q: keys hold their own kinds"
        return meta.copy()

    def put_meta(self, key: bytes, meta: _TopicMeta | _QueueMeta) -> None:
        self.metas[key] = meta.copy()  # later changes to the caller's object are not stored
        self.metas_changed[key] = None

    def delete_meta(self, key: bytes) -> None:
        self.metas[key] = None
        self.metas_changed[key] = None

    def write_metas(self) -> None:
        """Store every metadata record the entry changed: once each, after its last command."""
        for key in self.metas_changed:
            meta = self.metas[key]
            if meta is None:
                self.store.delete(key)
            else:
                self.store.put(key, _encode_json(meta))
        self.metas_changed.clear()

    def topic_meta(self, name: str) -> _TopicMeta | None:
        return self.load_meta(_TopicMeta, _P_TOPIC_META + name.encode())

    def queue_meta(self, name: str) -> _QueueMeta | None:
        return self.load_meta(_QueueMeta, _P_QUEUE_META + name.encode())

    def existing_topic(self, name: str) -> _TopicMeta:
        self.check_name(Kind.TOPIC, name)
        meta = self.topic_meta(name)
        if meta is None:
            raise NotFound(f'topic "{name}" does not exist')
        return meta

    def existing_queue(self, name: str) -> _QueueMeta:
        self.check_name(Kind.QUEUE, name)
        meta = self.queue_meta(name)
        if meta is None:
            raise NotFound(f'queue "{name}" does not exist')
        return meta

    def put_topic_meta(self, name: str, meta: _TopicMeta) -> None:
        self.put_meta(_P_TOPIC_META + name.encode(), meta)

    def put_queue_meta(self, name: str, meta: _QueueMeta) -> None:
        self.put_meta(_P_QUEUE_META + name.encode(), meta)

    # -- users --------------------------------------------------------------------------------

    @staticmethod
    def check_key_hash(key_hash: str) -> None:
        if not 1 <= len(key_hash) <= limits.KEY_HASH_CHARS_MAX:
            raise InvalidArgument(
                f"key hash must be 1 to key_hash_chars_max {limits.KEY_HASH_CHARS_MAX} "
                f"characters, got {len(key_hash)}"
            )

    def create_user(self, key_hash: str, admin: bool) -> Result:
        self.check_key_hash(key_hash)
        existing = _lookup_user(self.store, key_hash)
        if existing is not None:
            raise AlreadyExists("user", existing.user_id)
        count = _get_counter(self.store, _K_USERS)
        if count >= limits.USERS_MAX:
            raise ResourceExhausted(f"user count is at users_max {limits.USERS_MAX}")
        user_id = f"u{count + 1}"
        self.store.put(_K_USERS, _u64(count + 1))
        self.store.put(_user_key(key_hash), _encode_json({"admin": admin, "id": user_id}))
        self.users.pop(key_hash, None)
        self.store.put(_P_USER_INDEX + user_id.encode(), key_hash.encode("utf-8", "surrogatepass"))
        return UserCreated(user_id)

    def create_user_as_admin(self, user: UserInfo, command: CreateUserAsAdmin) -> Result:
        if not user.admin:
            what = "admin users" if command.admin else "users on this cluster"
            raise PermissionDenied(
                f"user {user.user_id} is not an admin; only an admin may create {what}"
            )
        return self.create_user(command.new_key_hash, command.admin)

    def ensure_admin(self, command: EnsureAdmin) -> Result:
        self.check_key_hash(command.key_hash)
        existing = _lookup_user(self.store, command.key_hash)
        if existing is None:
            return self.create_user(command.key_hash, admin=True)
        if existing.revoked:
            raise FailedPrecondition(
                f"the configured admin key (user {existing.user_id}) has been revoked; "
                "configure a new admin key"
            )
        if not existing.admin:
            self.put_user(command.key_hash, existing.user_id, admin=True, revoked=False)
        return UserCreated(existing.user_id)

    def put_user(self, key_hash: str, user_id: str, admin: bool, revoked: bool) -> None:
        record: dict[str, Any] = {"admin": admin, "id": user_id}
        if revoked:
            record["revoked"] = True
        self.store.put(_user_key(key_hash), _encode_json(record))
        self.users.pop(key_hash, None)

    def user_exists(self, user_id: str) -> bool:
        """User ids are "u1".."uN" in creation order and users are never deleted."""
        digits = user_id[1:]
        if not (user_id.startswith("u") and digits.isascii() and digits.isdigit()):
            return False
        if digits.startswith("0"):
            return False
        return int(digits) <= _get_counter(self.store, _K_USERS)

    def key_hash_of(self, user_id: str) -> str:
        indexed = self.store.get(_P_USER_INDEX + user_id.encode())
        if indexed is not None:
            return indexed.decode("utf-8", "surrogatepass")
        for key_hash, value in _scan_all(self.store, _P_USER):
            if json.loads(value)["id"] == user_id:
                return key_hash
        raise NotFound(f"user {user_id} does not exist")

    def may_dead_letter(self, queue: _QueueMeta, target: _QueueMeta) -> bool:
        """Whether `queue`'s owner may publish its dead letters to `target`: as a publish of
        its own. A revoked owner keeps only its own queues as dead-letter queues."""
        owner = _lookup_user(self.store, self.key_hash_of(queue.owner))
        assert owner is not None, "the user index points at a missing user"
        if owner.revoked:
            return owner.user_id == target.owner
        return _allowed(owner, "publish", target)

    def check_user_id(self, what: str, user_id: str) -> None:
        _check_int(
            what, len(user_id.encode()), 1, limits.USER_ID_BYTES_MAX, "user_id_bytes_max", "bytes"
        )
        if not self.user_exists(user_id):
            raise NotFound(f"user {user_id!r} does not exist")

    def revoke_user(self, user: UserInfo, command: RevokeUser) -> Result:
        if not user.admin:
            raise PermissionDenied(
                f"user {user.user_id} is not an admin; only an admin may revoke keys"
            )
        self.check_user_id("user_id", command.user_id)
        if command.user_id == user.user_id:
            raise FailedPrecondition(
                f"user {user.user_id} cannot revoke its own key; ask another admin"
            )
        key_hash = self.key_hash_of(command.user_id)
        target = _lookup_user(self.store, key_hash)
        assert target is not None, "the user index points at a missing user"
        if not target.revoked:
            self.put_user(key_hash, target.user_id, admin=target.admin, revoked=True)
        return Done()

    # -- member registry ----------------------------------------------------------------------

    def check_member_admin(self, user: UserInfo, node_id: str) -> None:
        if not user.admin:
            raise PermissionDenied(
                f"user {user.user_id} is not an admin; only an admin may change cluster members"
            )
        _check_int(
            "node_id", len(node_id.encode()), 1, limits.NODE_ID_BYTES_MAX, "node_id_bytes_max",
            "bytes",
        )  # fmt: skip

    def add_member(self, user: UserInfo, command: AddMember) -> Result:
        """Idempotent for the same addresses, so a caller may retry after a timeout."""
        self.check_member_admin(user, command.node_id)
        _check_address("client_address", command.client_address)
        _check_address("raft_address", command.raft_address)
        records = {
            node_id: _member_record(node_id, value)
            for node_id, value in _scan_all(self.store, _P_MEMBER)
        }
        for record in records.values():
            if record.removed or record.node_id == command.node_id:
                continue
            if command.raft_address == record.raft_address:
                raise FailedPrecondition(
                    f"raft address {command.raft_address} belongs to member {record.node_id}"
                )
        existing = records.get(command.node_id)
        if existing is not None and not existing.removed:
            if (existing.client_address, existing.raft_address) == (
                command.client_address,
                command.raft_address,
            ):
                return Done()
            raise AlreadyExists("member", command.node_id)
        if existing is None and len(records) >= limits.MEMBER_RECORDS_MAX:
            raise ResourceExhausted(
                f"the member registry holds member_records_max {limits.MEMBER_RECORDS_MAX} records"
            )
        self.put_member(command.node_id, command.client_address, command.raft_address, False)
        return Done()

    def remove_member(self, user: UserInfo, command: RemoveMember) -> Result:
        """Writes a tombstone even for a member only listed in the nodes' `--cluster`."""
        self.check_member_admin(user, command.node_id)
        value = self.store.get(_P_MEMBER + command.node_id.encode())
        if value is None:
            if len(_scan_all(self.store, _P_MEMBER)) >= limits.MEMBER_RECORDS_MAX:
                raise ResourceExhausted(
                    "the member registry holds member_records_max "
                    f"{limits.MEMBER_RECORDS_MAX} records"
                )
            self.put_member(command.node_id, "", "", True)
        else:
            record = _member_record(command.node_id, value)
            if not record.removed:
                self.put_member(command.node_id, record.client_address, record.raft_address, True)
        return Done()

    def put_member(self, node_id: str, client: str, raft: str, removed: bool) -> None:
        self.store.put(
            _P_MEMBER + node_id.encode(),
            _encode_json({"client": client, "raft": raft, "removed": removed}),
        )

    # -- access lists -------------------------------------------------------------------------

    def access_list(self, what: str, user_ids: tuple[str, ...]) -> list[str]:
        """The list in canonical form (sorted, no repeats), every id an existing user."""
        unique = sorted(set(user_ids), key=lambda user_id: (len(user_id), user_id))
        _check_int(what, len(unique), 0, limits.ACCESS_LIST_USERS_MAX, "access_list_users_max")
        for user_id in unique:
            self.check_user_id(f"{what} entry", user_id)
        return unique

    def set_access(self, user: UserInfo, command: SetAccess) -> Result:
        meta: _TopicMeta | _QueueMeta
        if command.kind is Kind.TOPIC:
            meta = self.existing_topic(command.name)
        else:
            meta = self.existing_queue(command.name)
        self.check_owner(user, command.kind, command.name, meta.owner, "change its access lists")
        meta.publishers = self.access_list("publishers", command.publishers)
        meta.consumers = self.access_list("consumers", command.consumers)
        if isinstance(meta, _TopicMeta):
            self.put_topic_meta(command.name, meta)
        else:
            self.put_queue_meta(command.name, meta)
        return Done()

    # -- per-user ownership counts ------------------------------------------------------------

    def check_owned(self, user: UserInfo, kind: Kind) -> None:
        if user.admin:
            return
        owned = _get_counter(self.store, _owned_key(kind, user.user_id))
        limit_name, limit = (
            ("user_topics_max", limits.USER_TOPICS_MAX)
            if kind is Kind.TOPIC
            else ("user_queues_max", limits.USER_QUEUES_MAX)
        )
        if owned >= limit:
            raise ResourceExhausted(
                f"user {user.user_id} owns {owned} {kind.value}s, at {limit_name} {limit}; "
                f"delete one before creating another"
            )

    def count_owned(self, kind: Kind, user_id: str, delta: int) -> None:
        """Owned counts never go below zero: what was created before they were kept is not
        counted, so deleting it must not make room twice."""
        key = _owned_key(kind, user_id)
        value = max(0, _get_counter(self.store, key) + delta)
        if value:
            self.store.put(key, _u64(value))
        else:
            self.store.delete(key)

    # -- topics and queues: create and delete -------------------------------------------------

    def create_topic(self, user: UserInfo, command: CreateTopic) -> Result:
        check_name(Kind.TOPIC, command.name)
        _check_int("retention_ms", command.retention_ms, 0, INT_MAX // 2, "retention_ms_max")
        _check_int(
            "retention_bytes", command.retention_bytes, 0, INT_MAX, "retention_bytes_max", "bytes"
        )
        existing = self.topic_meta(command.name)
        if existing is not None:
            if command.exist_ok and existing.owner == user.user_id:
                return Created(Kind.TOPIC, command.name, created=False)
            raise AlreadyExists("topic", command.name)
        count = _get_counter(self.store, _K_TOPICS)
        if count >= limits.TOPICS_MAX:
            raise ResourceExhausted(f"topic count is at topics_max {limits.TOPICS_MAX}")
        self.check_owned(user, Kind.TOPIC)
        meta = _TopicMeta(
            incarnation=self.bump(_K_INCARNATION, 1),
            owner=user.user_id,
            retention_ms=command.retention_ms or limits.TOPIC_RETENTION_MS_DEFAULT,
            retention_bytes=command.retention_bytes or limits.TOPIC_RETENTION_BYTES_DEFAULT,
            first_offset=0,
            next_offset=0,
            stored_bytes=0,
        )
        self.store.put(_K_TOPICS, _u64(count + 1))
        self.count_owned(Kind.TOPIC, user.user_id, 1)
        self.put_topic_meta(command.name, meta)
        return Created(Kind.TOPIC, command.name, created=True)

    def create_queue(self, user: UserInfo, command: CreateQueue) -> Result:
        check_name(Kind.QUEUE, command.name)
        _check_int(
            "visibility_timeout_ms",
            command.visibility_timeout_ms,
            0,
            limits.VISIBILITY_TIMEOUT_MS_MAX,
            "visibility_timeout_ms_max",
        )
        _check_int(
            "max_deliveries",
            command.max_deliveries,
            0,
            limits.MAX_DELIVERIES_MAX,
            "max_deliveries_max",
        )
        _check_int("max_length", command.max_length, 0, limits.QUEUE_DEPTH_MAX, "queue_depth_max")
        _check_int(
            "message_ttl_ms",
            command.message_ttl_ms,
            0,
            limits.MESSAGE_TTL_MS_MAX,
            "message_ttl_ms_max",
        )
        if command.dead_letter_queue:
            check_name(Kind.QUEUE, command.dead_letter_queue)
        existing = self.queue_meta(command.name)
        if existing is not None:
            if command.exist_ok and existing.owner == user.user_id:
                return Created(Kind.QUEUE, command.name, created=False)
            raise AlreadyExists("queue", command.name)
        if command.dead_letter_queue:
            target = self.queue_meta(command.dead_letter_queue)
            if target is None:
                raise NotFound(
                    f'dead-letter queue "{command.dead_letter_queue}" does not exist; '
                    "create it before the queue that uses it"
                )
            if self.rules >= RULES_ACCESS_CHECKED and not _allowed(user, "publish", target):
                raise PermissionDenied(
                    f"user {user.user_id} may not use queue "
                    f'"{command.dead_letter_queue}" as a dead-letter queue: not on its '
                    f"publishers list (owner {target.owner})"
                )
        count = _get_counter(self.store, _K_QUEUES)
        if count >= limits.QUEUES_MAX:
            raise ResourceExhausted(f"queue count is at queues_max {limits.QUEUES_MAX}")
        self.check_owned(user, Kind.QUEUE)
        meta = _QueueMeta(
            incarnation=self.bump(_K_INCARNATION, 1),
            owner=user.user_id,
            visibility_timeout_ms=command.visibility_timeout_ms
            or limits.VISIBILITY_TIMEOUT_MS_DEFAULT,
            max_deliveries=command.max_deliveries,
            dead_letter_queue=command.dead_letter_queue,
            max_length=command.max_length,
            overflow=command.overflow.value,
            message_ttl_ms=command.message_ttl_ms,
            next_sequence=0,
            depth=0,
        )
        self.store.put(_K_QUEUES, _u64(count + 1))
        self.count_owned(Kind.QUEUE, user.user_id, 1)
        self.put_queue_meta(command.name, meta)
        return Created(Kind.QUEUE, command.name, created=True)

    def check_owner(
        self, user: UserInfo, kind: Kind, name: str, owner: str, action: str = "delete it"
    ) -> None:
        if not (user.admin or owner == user.user_id):
            raise PermissionDenied(
                f'{kind.value} "{name}" belongs to {owner}; only its owner or an admin may {action}'
            )

    def delete_topic(self, user: UserInfo, command: DeleteTopic) -> Result:
        meta = self.existing_topic(command.name)
        self.check_owner(user, Kind.TOPIC, command.name, meta.owner)
        self.delete_meta(_P_TOPIC_META + command.name.encode())
        self.count_owned(Kind.TOPIC, meta.owner, -1)
        self.bump(_K_TOPICS, -1)
        self.store.put(_P_DELETED + _u64(meta.incarnation), Kind.TOPIC.value.encode())
        self.deleted_none = False
        return Deleted(Kind.TOPIC, command.name)

    def delete_queue(self, user: UserInfo, command: DeleteQueue) -> Result:
        meta = self.existing_queue(command.name)
        self.check_owner(user, Kind.QUEUE, command.name, meta.owner)
        self.delete_meta(_P_QUEUE_META + command.name.encode())
        self.count_owned(Kind.QUEUE, meta.owner, -1)
        self.bump(_K_QUEUES, -1)
        self.store.put(_P_DELETED + _u64(meta.incarnation), Kind.QUEUE.value.encode())
        self.deleted_none = False
        return Deleted(Kind.QUEUE, command.name)

    # -- subscriptions ------------------------------------------------------------------------

    def subscribe(self, user: UserInfo, command: Subscribe) -> Result:
        if command.kind is Kind.QUEUE:
            queue = self.existing_queue(command.name)
            _authorize(user, "subscribe", Kind.QUEUE, command.name, queue)
            self.store.put(_consumer_key(queue.incarnation, user.user_id), b"")
            return Subscribed(Kind.QUEUE, command.name, 0)
        topic = self.existing_topic(command.name)
        _authorize(user, "subscribe", Kind.TOPIC, command.name, topic)
        key = _subscription_key(topic.incarnation, user.user_id)
        value = self.store.get(key)
        if value is not None:
            return Subscribed(Kind.TOPIC, command.name, _Cursor.decode(value).acked)
        if self.purge_topic(topic):
            self.put_topic_meta(command.name, topic)
        if command.start is StartPosition.EARLIEST:
            offset = topic.first_offset
        elif command.start is StartPosition.OFFSET:
            offset = min(max(command.offset, topic.first_offset), topic.next_offset)
        else:
            offset = topic.next_offset
        self.store.put(key, _Cursor(offset, offset, 0, offset, 0).encode())
        return Subscribed(Kind.TOPIC, command.name, offset)

    def unsubscribe(self, user: UserInfo, command: Unsubscribe) -> Result:
        if command.kind is Kind.QUEUE:
            key = _consumer_key(self.existing_queue(command.name).incarnation, user.user_id)
        else:
            key = _subscription_key(self.existing_topic(command.name).incarnation, user.user_id)
        if not self.store.delete(key):
            raise NotFound(
                f'user {user.user_id} is not subscribed to {command.kind.value} "{command.name}"'
            )
        return Unsubscribed(command.kind, command.name)

    # -- publish ------------------------------------------------------------------------------

    def publish(self, user: UserInfo, command: Publish) -> Result:
        """A single publish is a batch of one: both follow exactly the same rules."""
        batch = PublishBatch(
            key_hash=command.key_hash,
            kind=command.kind,
            name=command.name,
            producer_id=command.producer_id,
            bodies=(command.body,),
            sequences=(command.sequence,),
            delays_ms=(command.delay_ms,),
        )
        [receipt] = self.publish_batch(user, batch).receipts
        return receipt

    def publish_batch(self, user: UserInfo, command: PublishBatch) -> Receipts:
        """All or nothing (ARCHITECTURE promise 5): every item is validated, then the
        destination, deduplication and room for the new items are checked for the batch as a
        whole; only then is anything written. Duplicates answer with their original receipt
        and take no room."""
        self.check_batch(command)
        if command.kind is Kind.TOPIC:
            return self.publish_topic(user, command)
        return self.publish_queue(user, command)

    def check_batch(self, command: PublishBatch) -> None:
        count = len(command.bodies)
        if not len(command.sequences) == len(command.delays_ms) == count:
            raise InvalidArgument(
                f"a publish batch needs one sequence and one delay per body: got {count} "
                f"bodies, {len(command.sequences)} sequences and {len(command.delays_ms)} delays"
            )
        _check_int(
            "batch",
            count,
            0,
            limits.PUBLISH_BATCH_MESSAGES_MAX,
            "publish_batch_messages_max",
            "messages",
        )
        if count and not (
            max(map(len, command.bodies)) <= limits.MESSAGE_BYTES_MAX
            and min(command.sequences) >= 0
            and max(command.sequences) <= INT_MAX
            and min(command.delays_ms) >= 0
            and max(command.delays_ms) <= limits.DELAY_MS_MAX
            and (command.kind is Kind.QUEUE or not any(command.delays_ms))
        ):
            self.check_batch_items(command)
        _check_int(
            "batch",
            sum(map(len, command.bodies)),
            0,
            limits.PUBLISH_BATCH_BYTES_MAX,
            "publish_batch_bytes_max",
            "bytes",
        )
        try:
            producer = command.producer_id.encode()
        except UnicodeEncodeError as error:
            raise InvalidArgument(f"producer_id is not valid UTF-8 text: {error.reason}") from None
        _check_int(
            "producer_id",
            len(producer),
            0,
            limits.PRODUCER_ID_BYTES_MAX,
            "producer_id_bytes_max",
            "bytes",
        )

    @staticmethod
    def check_batch_items(command: PublishBatch) -> None:
        """Raise for the first item that breaks a rule, in item order: the slow path of
        `check_batch`, taken only when its whole-batch bounds found something wrong."""
        for body, sequence, delay_ms in zip(
            command.bodies, command.sequences, command.delays_ms, strict=True
        ):
            _check_int(
                "message", len(body), 0, limits.MESSAGE_BYTES_MAX, "message_bytes_max", "bytes"
            )
            _check_sequence("sequence", sequence)
            _check_int("delay_ms", delay_ms, 0, limits.DELAY_MS_MAX, "delay_ms_max")
            if delay_ms and command.kind is Kind.TOPIC:
                raise InvalidArgument(
                    "delay_ms applies to queues only; topic messages are visible at once"
                )

    def dedup_run(self, dedup_prefix: bytes, producer_sequence: int) -> _DedupRun | None:
        """The stored run holding `producer_sequence`, live or expired, if any."""
        found = self.store.floor(dedup_prefix, dedup_prefix + _u64(producer_sequence))
        if found is None:
            return None
        run = _DedupRun.decode(*found)
        return run if producer_sequence <= run.last else None

    def none_published(self, dedup_prefix: bytes, sequences: tuple[int, ...]) -> bool:
        """Whether no stored run (live or expired) holds any of `sequences` and none repeats:
        then every item is new. Two lookups for the batch (runs never overlap: the run below
        the lowest sequence, and the first run starting at or above it) instead of one per
        item, which stays the path for retries."""
        if len(set(sequences)) != len(sequences):
            return False
        low = min(sequences)
        low_key = dedup_prefix + _u64(low)
        below = self.store.floor(dedup_prefix, low_key)
        if below is not None and _DedupRun.decode(*below).last >= low:
            return False
        above = self.store.scan(dedup_prefix, low_key, limit=1)
        return not above or _DedupRun.decode(*above[0]).first > max(sequences)

    def plan_batch(self, incarnation: int, command: PublishBatch, next_position: int) -> _BatchPlan:
        """Every item's receipt, and the items that are new with the sequence or offset each
        will get. Writes nothing. An item repeating an earlier item of the same batch is a
        duplicate of that item."""
        kind, name, sequences = command.kind, command.name, command.sequences
        dedup_prefix = b""
        if command.producer_id:
            dedup_prefix = _dedup_prefix(incarnation, command.producer_id)
        if not sequences or not dedup_prefix or self.none_published(dedup_prefix, sequences):
            positions = range(next_position, next_position + len(sequences))
            return _BatchPlan(
                [Receipt(kind, name, position, False) for position in positions],
                list(map(_NewMessage, command.bodies, command.delays_ms, sequences, positions)),
                dedup_prefix,
                [],
            )
        receipts: list[Receipt] = []
        new_messages: list[_NewMessage] = []
        planned: dict[int, int] = {}
        expired: dict[bytes, _DedupRun] = {}
        for body, sequence, delay_ms in zip(
            command.bodies, sequences, command.delays_ms, strict=True
        ):
            run = self.dedup_run(dedup_prefix, sequence)
            original = planned.get(sequence)
            if run is not None and run.expires_at_ms > self.clock:
                original = run.position + sequence - run.first
            elif run is not None:
                expired[run.key] = run  # expired, not purged yet: publish anew
            if original is not None:
                receipts.append(Receipt(kind, name, original, duplicate=True))
                continue
            position = next_position + len(new_messages)
            planned[sequence] = position
            new_messages.append(_NewMessage(body, delay_ms, sequence, position))
            receipts.append(Receipt(kind, name, position, duplicate=False))
        return _BatchPlan(receipts, new_messages, dedup_prefix, list(expired.values()))

    def remember_publishes(self, plan: _BatchPlan) -> None:
        """Write the dedup runs of a command's new messages (after the messages): each stretch
        of consecutive producer sequences is one run (their positions are consecutive by
        construction). Expired runs holding any of them go first, so runs never overlap."""
        for run in plan.expired_runs:
            self.store.delete(_dedup_expiry_key(run.expires_at_ms, run.key))
            self.store.delete(run.key)
        new_messages = plan.new_messages
        if not plan.dedup_prefix or not new_messages:
            return
        expires_at_ms = self.clock + limits.DEDUP_WINDOW_MS
        first = new_messages[0]
        sequences = [message.producer_sequence for message in new_messages]
        consecutive_span = sequences[-1] - sequences[0] == len(sequences) - 1
        if consecutive_span and sequences == list(range(sequences[0], sequences[-1] + 1)):
            runs = [(first, new_messages[-1])]  # the usual batch: one run
        else:
            runs = []
            for previous, message in itertools.pairwise(new_messages):
                if message.producer_sequence != previous.producer_sequence + 1:
                    runs.append((first, previous))
                    first = message
            runs.append((first, new_messages[-1]))
        for start, end in runs:
            key = plan.dedup_prefix + _u64(start.producer_sequence)
            self.store.put(
                key, _DEDUP_RUN.pack(end.producer_sequence, start.position, expires_at_ms)
            )
            self.store.put(_dedup_expiry_key(expires_at_ms, key), b"")
        if expires_at_ms <= self.clock:
            self.dedup_expired_none = False  # a zero dedup window: due at once
        if len(runs) > 1:
            # A command purges as many expired runs as it wrote beyond the one of a usual
            # batch, so scattered sequences cannot outgrow the purge.
            self.purge_dedup(len(runs))

    def publish_topic(self, user: UserInfo, command: PublishBatch) -> Receipts:
        topic = self.existing_topic(command.name)
        _authorize(user, "publish", Kind.TOPIC, command.name, topic)
        plan = self.plan_batch(topic.incarnation, command, topic.next_offset)
        producer = command.producer_id.encode()
        header = _TOPIC_MESSAGE.pack(self.clock, len(producer)) + producer
        key_prefix = _P_TOPIC_MESSAGE + _u64(topic.incarnation)
        for message in plan.new_messages:
            offset = topic.next_offset
            assert offset == message.position, "planned offsets are assigned in order"
            self.store.put(key_prefix + _u64(offset), header + message.body)
            topic.next_offset += 1
            topic.stored_bytes += len(message.body)
            self.purge_topic(topic)
        self.remember_publishes(plan)
        if plan.new_messages:
            self.put_topic_meta(command.name, topic)
        return Receipts(tuple(plan.receipts))

    def publish_queue(self, user: UserInfo, command: PublishBatch) -> Receipts:
        queue = self.existing_queue(command.name)
        _authorize(user, "publish", Kind.QUEUE, command.name, queue)
        next_sequence = queue.next_sequence
        plan = self.plan_batch(queue.incarnation, command, next_sequence)
        depth_max = min(queue.max_length or limits.QUEUE_DEPTH_MAX, limits.QUEUE_DEPTH_MAX)
        adding = len(plan.new_messages)
        if queue.depth + adding > depth_max and queue.overflow != Overflow.DROP_HEAD.value:
            raise QueueFull(command.name, queue.depth, depth_max, adding)
        items = [(message.body, message.delay_ms) for message in plan.new_messages]
        if queue.depth + adding <= depth_max:
            self.enqueue(queue, command.producer_id, items)
        else:
            # DROP_HEAD makes room one message at a time, as that many single publishes would:
            # a batch longer than the queue keeps only its own newest messages.
            for item in items:
                while queue.depth >= depth_max:
                    if not self.drop_head(queue):
                        break
                self.enqueue(queue, command.producer_id, [item])
        assert queue.next_sequence == next_sequence + adding, "planned sequences are taken"
        self.remember_publishes(plan)
        if plan.new_messages:
            self.put_queue_meta(command.name, queue)
        return Receipts(tuple(plan.receipts))

    # -- queue internals ----------------------------------------------------------------------

    def enqueue(
        self, queue: _QueueMeta, producer_id: str, items: Sequence[tuple[bytes, int]]
    ) -> None:
        """Store (body, delay_ms) items at the queue's next sequences, in order. The header
        and keys that all ready (undelayed) items share are built once for the batch."""
        clock, put = self.clock, self.store.put
        producer = producer_id.encode()
        incarnation = _u64(queue.incarnation)
        message_prefix = _P_QUEUE_MESSAGE + incarnation
        visibility_prefix = _P_VISIBILITY + incarnation
        # The encoding of _QueueMessage(clock, visible_at_ms, 0, False, producer_id, body).
        ready_header = _QUEUE_MESSAGE.pack(clock, clock, 0, False, len(producer)) + producer
        ready_prefix = visibility_prefix + _u64(clock)
        sequence = queue.next_sequence
        for body, delay_ms in items:
            sequence_bytes = _u64(sequence)
            if delay_ms:
                visible_at_ms = clock + delay_ms
                header = _QUEUE_MESSAGE.pack(clock, visible_at_ms, 0, False, len(producer))
                put(message_prefix + sequence_bytes, header + producer + body)
                put(visibility_prefix + _u64(visible_at_ms) + sequence_bytes, b"")
            else:
                put(message_prefix + sequence_bytes, ready_header + body)
                put(ready_prefix + sequence_bytes, b"")
            sequence += 1
        queue.depth += sequence - queue.next_sequence
        queue.next_sequence = sequence

    def remove_message(self, queue: _QueueMeta, sequence: int, message: _QueueMessage) -> None:
        incarnation, sequence_bytes = _u64(queue.incarnation), _u64(sequence)
        self.store.delete(_P_QUEUE_MESSAGE + incarnation + sequence_bytes)
        self.store.delete(
            _P_VISIBILITY + incarnation + _u64(message.visible_at_ms) + sequence_bytes
        )
        queue.depth -= 1

    def drop_head(self, queue: _QueueMeta) -> bool:
        """Delete the oldest stored message (overflow DROP_HEAD); False if the queue is empty."""
        head = self.store.scan(_P_QUEUE_MESSAGE + _u64(queue.incarnation), limit=1)
        if not head:
            return False
        key, value = head[0]
        self.remove_message(queue, _read_u64(key, 9), _QueueMessage.decode(value))
        return True

    def dead_letter(self, queue_name: str, queue: _QueueMeta, message: _QueueMessage) -> None:
        """Move a removed message to the queue's dead-letter queue, if it still has one that
        can take it; otherwise the message is dropped.

        The move is a publish by the queue's owner, decided here on every replica: the owner
        must still be allowed to publish to the dead-letter queue (its access list may have
        changed since), and it must be the queue that existed when this one was created
        (CreateQueue checks that it did). A dead-letter queue deleted and re-created by anyone
        since has a later incarnation than this queue: the new one does not get these."""
        target_name = queue.dead_letter_queue
        if not target_name or target_name == queue_name:
            return
        target = self.queue_meta(target_name)
        if target is None:
            return
        if self.rules >= RULES_ACCESS_CHECKED and not (
            target.incarnation < queue.incarnation and self.may_dead_letter(queue, target)
        ):
            return
        depth_max = min(target.max_length or limits.QUEUE_DEPTH_MAX, limits.QUEUE_DEPTH_MAX)
        if target.depth >= depth_max:
            if target.overflow != Overflow.DROP_HEAD.value:
                return  # a full dead-letter queue cannot refuse a consume: drop
            self.drop_head(target)
        self.enqueue(target, message.producer_id, [(message.body, 0)])
        self.put_queue_meta(target_name, target)

    def move_visibility(
        self, queue: _QueueMeta, sequence: int, message: _QueueMessage, visible_at_ms: int
    ) -> None:
        incarnation, sequence_bytes = _u64(queue.incarnation), _u64(sequence)
        visibility_prefix = _P_VISIBILITY + incarnation
        old_key = visibility_prefix + _u64(message.visible_at_ms) + sequence_bytes
        mark = (self.store.get(old_key) or _LEASED) if message.leased else b""  # the lessee stays
        self.store.delete(old_key)
        message.visible_at_ms = visible_at_ms
        self.store.put(visibility_prefix + _u64(visible_at_ms) + sequence_bytes, mark)
        self.store.put(_P_QUEUE_MESSAGE + incarnation + sequence_bytes, message.encode())

    # -- consume ------------------------------------------------------------------------------

    def consume(self, user: UserInfo, command: Consume) -> Result:
        _check_int(
            "max_messages",
            command.max_messages,
            1,
            limits.CONSUME_MESSAGES_MAX,
            "consume_messages_max",
        )
        _check_int(
            "visibility_timeout_ms",
            command.visibility_timeout_ms,
            0,
            limits.VISIBILITY_TIMEOUT_MS_MAX,
            "visibility_timeout_ms_max",
        )
        if command.kind is Kind.TOPIC:
            return self.consume_topic(user, command)
        return self.consume_queue(user, command)

    def consume_queue(self, user: UserInfo, command: Consume) -> Result:
        queue = self.existing_queue(command.name)
        _authorize(user, "consume", Kind.QUEUE, command.name, queue)
        visibility_ms = command.visibility_timeout_ms or queue.visibility_timeout_ms
        prefix = _P_VISIBILITY + _u64(queue.incarnation)
        candidates = self.store.scan(
            prefix, limit=command.max_messages + limits.RETENTION_PURGE_PER_COMMAND
        )
        deliveries: list[Delivery] = []
        reply_bytes = 0
        depth_before = queue.depth
        # Unless the loop stops at a message not yet visible, one may be ready after the last.
        more_ready = len(candidates) == command.max_messages + limits.RETENTION_PURGE_PER_COMMAND
        # The hot path of consuming: each lease is written from the stored header and bytes
        # (no _QueueMessage, no re-encoding of the body); the old index key is the candidate's.
        store, clock, name = self.store, self.clock, command.name
        message_prefix = _P_QUEUE_MESSAGE + _u64(queue.incarnation)
        lease_deadline_ms = clock + visibility_ms
        leased_prefix = prefix + _u64(lease_deadline_ms)
        lease_mark = self.lease_mark(user)
        header_size, pack_header = _QUEUE_MESSAGE.size, _QUEUE_MESSAGE.pack
        for key, _ in candidates:
            if _read_u64(key, 9) > clock:
                more_ready = False
                break
            if len(deliveries) >= command.max_messages:
                more_ready = True
                break
            sequence_bytes = key[17:]
            message_key = message_prefix + sequence_bytes
            value = store.get(message_key)
            assert value is not None, "visibility index points at a missing message"
            publish_time_ms, _, count, _, producer_len = _QUEUE_MESSAGE.unpack_from(value)
            expired = queue.message_ttl_ms > 0 and publish_time_ms + queue.message_ttl_ms <= clock
            if expired or 0 < queue.max_deliveries <= count:
                message = _QueueMessage.decode(value)
                self.remove_message(queue, _read_u64(key, 17), message)
                self.dead_letter(name, queue, message)
                continue
            producer_id = value[header_size : header_size + producer_len].decode()
            body = value[header_size + producer_len :]
            reply_bytes += _reply_bytes(name, producer_id, body)
            if deliveries and reply_bytes > limits.CONSUME_BYTES_MAX:
                more_ready = True
                break  # the reply is full; this message stays ready for the next consume
            count += 1
            store.delete(key)
            store.put(leased_prefix + sequence_bytes, lease_mark)
            store.put(
                message_key,
                pack_header(publish_time_ms, lease_deadline_ms, count, True, producer_len)
                + value[header_size:],
            )
            deliveries.append(
                Delivery(
                    Kind.QUEUE,
                    name,
                    _read_u64(key, 17),
                    body,
                    count,
                    publish_time_ms,
                    producer_id,
                    lease_deadline_ms,
                )
            )
        if queue.depth != depth_before:
            self.put_queue_meta(command.name, queue)
        if more_ready:
            return Deliveries(tuple(deliveries), more_ready=True)
        # Every stored message is leased or delayed now (those just delivered included).
        first = self.store.scan(prefix, limit=1)
        return Deliveries(tuple(deliveries), _read_u64(first[0][0], 9) if first else 0)

    def consume_topic(self, user: UserInfo, command: Consume) -> Result:
        topic = self.existing_topic(command.name)
        _authorize(user, "consume", Kind.TOPIC, command.name, topic)
        key = _subscription_key(topic.incarnation, user.user_id)
        cursor = self.cursor(key, command.name, user)
        if self.purge_topic(topic):
            self.put_topic_meta(command.name, topic)
        before = cursor.encode()
        self.expire_window(cursor, topic)
        if len(cursor.windows) >= limits.TOPIC_WINDOWS_MAX:
            cursor.rewind()  # that many unacked replies: start again from the last ack
        if command.next_offset >= 0:
            # The client has everything before next_offset. Anything handed out from there on
            # never reached it (a reply lost in a leader change): hand it out again first.
            resume = max(cursor.acked, min(command.next_offset, cursor.delivered))
            if resume < cursor.delivered:
                cursor.delivered = resume
                cursor.redeliveries += 1
                cursor.windows = [start for start in cursor.windows if start < resume]
        visibility_ms = command.visibility_timeout_ms or limits.VISIBILITY_TIMEOUT_MS_DEFAULT
        deadline_ms = self.clock + visibility_ms
        deliveries: list[Delivery] = []
        reply_bytes = 0
        more_ready = False
        for row_key, value in self.topic_rows(topic, cursor.delivered, command.max_messages):
            offset = _read_u64(row_key, 9)
            publish_time_ms, producer_len = _TOPIC_MESSAGE.unpack_from(value)
            header = _TOPIC_MESSAGE.size
            producer_id = value[header : header + producer_len].decode()
            body = value[header + producer_len :]
            reply_bytes += _reply_bytes(command.name, producer_id, body)
            if deliveries and reply_bytes > limits.CONSUME_BYTES_MAX:
                more_ready = True
                break  # the reply is full; the cursor stops before this message
            count = cursor.redeliveries + 1 if offset < cursor.high else 1
            deliveries.append(
                Delivery(
                    Kind.TOPIC,
                    command.name,
                    offset,
                    body,
                    count,
                    publish_time_ms,
                    producer_id,
                    deadline_ms,
                )
            )
        if deliveries:
            cursor.windows.append(deliveries[0].sequence)
            cursor.delivered = deliveries[-1].sequence + 1
            cursor.high = max(cursor.high, cursor.delivered)
            cursor.lease_deadline_ms = deadline_ms
        if cursor.encode() != before:
            self.store.put(key, cursor.encode())
        if more_ready or len(deliveries) == command.max_messages:  # the topic may hold more
            return Deliveries(tuple(deliveries), more_ready=True)
        # At the end of the topic: only the open window's lease ending rewinds the cursor.
        next_ready_ms = cursor.lease_deadline_ms if cursor.delivered > cursor.acked else 0
        return Deliveries(tuple(deliveries), next_ready_ms)

    # -- topic internals ----------------------------------------------------------------------

    def topic_rows(
        self, topic: _TopicMeta, offset: int, count_max: int
    ) -> Iterator[tuple[bytes, bytes]]:
        """Stored messages from `offset` on, at most `count_max`, read a page at a time so a
        consume that stops early for size has not loaded hundreds of large bodies."""
        start = _topic_message_key(topic.incarnation, offset)
        while count_max > 0:
            page = self.store.scan(start[:9], start, limit=min(count_max, _TOPIC_PAGE))
            yield from page
            if len(page) < min(count_max, _TOPIC_PAGE):
                return
            count_max -= len(page)
            start = page[-1][0] + b"\x00"

    def cursor(self, key: bytes, topic_name: str, user: UserInfo) -> _Cursor:
        value = self.store.get(key)
        if value is None:
            raise NotFound(
                f'user {user.user_id} has no subscription to topic "{topic_name}"; subscribe first'
            )
        return _Cursor.decode(value)

    def expire_window(self, cursor: _Cursor, topic: _TopicMeta) -> None:
        """Skip what retention dropped, and reopen a window whose lease expired."""
        cursor.acked = max(cursor.acked, topic.first_offset)
        cursor.delivered = max(cursor.delivered, cursor.acked)
        cursor.high = max(cursor.high, cursor.acked)
        cursor.windows = [start for start in cursor.windows if start >= cursor.acked]
        if cursor.delivered > cursor.acked and cursor.lease_deadline_ms <= self.clock:
            cursor.rewind()

    def purge_topic(self, topic: _TopicMeta) -> bool:
        """Drop messages past retention (age or bytes) from the head, at most
        RETENTION_PURGE_PER_COMMAND per call. Mutates `topic`; the caller stores it. True if
        anything was dropped.

        A publish calls this once per message, so the head's age is remembered for the entry
        (a stored message never changes, and the clock stands still): while the topic is within
        its bytes, a head known to be young answers without reading the store."""
        if topic.first_offset >= topic.next_offset:
            return False
        if topic.stored_bytes <= topic.retention_bytes:
            head_time_ms = self.topic_heads.get((topic.incarnation, topic.first_offset))
            if head_time_ms is not None and head_time_ms + topic.retention_ms > self.clock:
                return False
        budget = limits.RETENTION_PURGE_PER_COMMAND
        page_rows = 1  # usually the head stays: read one message, not a page of bodies
        start = _topic_message_key(topic.incarnation, topic.first_offset)
        dropped = False
        while budget > 0:
            asked = min(page_rows, budget)
            rows = self.store.scan(start[:9], start, limit=asked)
            for key, value in rows:
                publish_time_ms, producer_len = _TOPIC_MESSAGE.unpack_from(value)
                too_old = publish_time_ms + topic.retention_ms <= self.clock
                if not (too_old or topic.stored_bytes > topic.retention_bytes):
                    self.topic_heads[(topic.incarnation, _read_u64(key, 9))] = publish_time_ms
                    return dropped
                self.store.delete(key)
                topic.stored_bytes -= len(value) - _TOPIC_MESSAGE.size - producer_len
                topic.first_offset = _read_u64(key, 9) + 1
                dropped = True
            if len(rows) < asked:
                return dropped
            budget -= len(rows)
            start = rows[-1][0] + b"\x00"
            page_rows = _TOPIC_PAGE
        return dropped

    # -- ack, nack, extend --------------------------------------------------------------------

    def ack(self, user: UserInfo, command: Ack) -> Result:
        items = [(command.sequence, command.delivery_count)]
        if command.kind is Kind.QUEUE:
            return self.ack_queue(user, command.name, items)
        return self.ack_topic(user, command.name, items)

    def ack_batch(self, user: UserInfo, command: AckBatch) -> Result:
        """Each item as one `Ack`, independently; the result is the first refusal, if any."""
        _check_int("ack batch", len(command.sequences), 0, limits.ACK_BATCH_MAX, "ack_batch_max")
        if not command.sequences:
            return Done()  # like no acks at all, even for a name that does not exist
        items = zip(command.sequences, command.delivery_counts, strict=True)
        if command.kind is Kind.QUEUE:
            return self.ack_queue(user, command.name, items)
        return self.ack_topic(user, command.name, items)

    def ack_queue(self, user: UserInfo, name: str, items: Iterable[tuple[int, int]]) -> Result:
        """Delete each message whose delivery still holds its lease (idempotent), with the
        queue's metadata loaded, authorized and stored once for the batch rather than once per
        message (two copies of it per ack were a third of an ack's cost). Refusals of the
        queue itself (NotFound, PermissionDenied) are every item's, so they refuse the whole
        batch; any other is returned, the first one, after the other items are applied."""
        queue = self.existing_queue(name)
        _authorize(user, "consume", Kind.QUEUE, name, queue)
        depth_before = queue.depth
        first_refusal: ChasquiError | None = None
        # The hot path of acking reads only the stored header (see `check_lease` for the rule).
        store, clock = self.store, self.clock
        incarnation = _u64(queue.incarnation)
        message_prefix = _P_QUEUE_MESSAGE + incarnation
        visibility_prefix = _P_VISIBILITY + incarnation
        for sequence, delivery_count in items:
            try:
                _check_assigned(queue, name, sequence)
                sequence_bytes = _u64(sequence)
                value = store.get(message_prefix + sequence_bytes)
                if value is None:
                    continue  # acked before (or dropped): acks are idempotent
                _, visible_at_ms, count, leased, _ = _QUEUE_MESSAGE.unpack_from(value)
                if not (1 <= delivery_count == count and leased and visible_at_ms > clock):
                    message = _QueueMessage.decode(value)
                    self.check_lease(name, sequence, delivery_count, message)  # raises
                visibility_key = visibility_prefix + _u64(visible_at_ms) + sequence_bytes
                self.check_lessee(user, name, sequence, delivery_count, visibility_key)
                store.delete(message_prefix + sequence_bytes)
                store.delete(visibility_key)
                queue.depth -= 1
            except ChasquiError as error:
                first_refusal = first_refusal or error
        if queue.depth != depth_before:
            self.put_queue_meta(name, queue)
        return first_refusal or Done()

    def ack_topic(self, user: UserInfo, name: str, items: Iterable[tuple[int, int]]) -> Result:
        """Move the caller's cursor past each offset in turn (cumulative, idempotent); the
        first refusal is returned after the other items are applied."""
        first_refusal: Result | None = None
        for offset, _delivery_count in items:
            try:
                result = self.ack_offset(user, name, offset)
            except ChasquiError as error:
                result = error
            if first_refusal is None and isinstance(result, ChasquiError):
                first_refusal = result
        return first_refusal or Done()

    def ack_offset(self, user: UserInfo, name: str, sequence: int) -> Result:
        key, cursor = self.leased_window(user, name, sequence)
        if sequence < cursor.acked:
            return Done()  # acked before: acks are idempotent
        window_start = max(
            (start for start in cursor.windows if start <= sequence),
            default=cursor.acked,
        )
        if window_start > cursor.acked:
            # Offsets [acked, window_start) went out in an earlier reply that was never
            # acked, perhaps never received. Acking past them would lose them: hand
            # everything out again instead, and say so.
            skipped = cursor.acked
            cursor.rewind()
            self.store.put(key, cursor.encode())
            return FailedPrecondition(
                f'offsets {skipped} to {window_start - 1} of topic "{name}" were '
                f"handed out to user {user.user_id} by an earlier consume that was not "
                f"acked; offset {sequence} was not acked past them, and every "
                f"offset from {skipped} will be delivered again"
            )
        cursor.acked = sequence + 1
        cursor.windows = [start for start in cursor.windows if start > sequence]
        if cursor.acked >= cursor.high:
            cursor.redeliveries = 0
        self.store.put(key, cursor.encode())
        return Done()

    def nack(self, user: UserInfo, command: Nack) -> Result:
        _check_int("delay_ms", command.delay_ms, 0, limits.DELAY_MS_MAX, "delay_ms_max")
        if command.kind is Kind.TOPIC:
            key, cursor = self.leased_window(user, command.name, command.sequence)
            if command.sequence < cursor.acked:
                return Done()  # already acked: nothing to give back
            self.check_window_lease(command.name, command.sequence, cursor, user)
            if command.delay_ms:
                cursor.lease_deadline_ms = self.clock + command.delay_ms
            else:
                cursor.rewind()
            self.store.put(key, cursor.encode())
            return Done()
        queue, message = self.leased_message(user, command.name, command.sequence)
        if message is None:
            return Done()  # acked or dropped meanwhile: nothing to give back
        if not message.leased and message.delivery_count == command.delivery_count:
            return Done()  # this delivery was already given back: a retried nack
        self.check_lease(command.name, command.sequence, command.delivery_count, message)
        self.check_lessee(
            user,
            command.name,
            command.sequence,
            command.delivery_count,
            _visibility_key(queue.incarnation, message.visible_at_ms, command.sequence),
        )
        message.leased = False
        self.move_visibility(queue, command.sequence, message, self.clock + command.delay_ms)
        return Done()

    def extend(self, user: UserInfo, command: Extend) -> Result:
        _check_int(
            "extend_ms",
            command.extend_ms,
            1,
            limits.VISIBILITY_TIMEOUT_MS_MAX,
            "visibility_timeout_ms_max",
        )
        if command.kind is Kind.TOPIC:
            key, cursor = self.leased_window(user, command.name, command.sequence)
            if command.sequence < cursor.acked:
                raise FailedPrecondition(
                    f'offset {command.sequence} of topic "{command.name}" is already acked by '
                    f"user {user.user_id}"
                )
            self.check_window_lease(command.name, command.sequence, cursor, user)
            cursor.lease_deadline_ms = self.clock + command.extend_ms
            self.store.put(key, cursor.encode())
            return Done()
        queue, message = self.leased_message(user, command.name, command.sequence)
        if message is None:
            raise FailedPrecondition(
                f'message {command.sequence} on queue "{command.name}" is no longer stored: '
                "it was acked, expired or dead-lettered"
            )
        self.check_lease(command.name, command.sequence, command.delivery_count, message)
        self.check_lessee(
            user,
            command.name,
            command.sequence,
            command.delivery_count,
            _visibility_key(queue.incarnation, message.visible_at_ms, command.sequence),
        )
        self.move_visibility(queue, command.sequence, message, self.clock + command.extend_ms)
        return Done()

    def leased_message(
        self, user: UserInfo, queue_name: str, sequence: int
    ) -> tuple[_QueueMeta, _QueueMessage | None]:
        """The queue and the stored message (None when it is gone: acked or dropped). Raises
        NotFound for a sequence the queue never assigned, PermissionDenied for a user no longer
        on the queue's consumers list (ack, nack and extend count as consuming)."""
        queue = self.existing_queue(queue_name)
        _authorize(user, "consume", Kind.QUEUE, queue_name, queue)
        return queue, self.stored_message(queue, queue_name, sequence)

    def stored_message(
        self, queue: _QueueMeta, queue_name: str, sequence: int
    ) -> _QueueMessage | None:
        """The stored message (None when acked or dropped); NotFound if never assigned."""
        _check_assigned(queue, queue_name, sequence)
        value = self.store.get(_queue_message_key(queue.incarnation, sequence))
        return None if value is None else _QueueMessage.decode(value)

    def lease_mark(self, user: UserInfo) -> bytes:
        """The visibility index value of a message leased to `user` by this entry."""
        if self.rules >= RULES_ACCESS_CHECKED:
            return _LEASED + user.user_id.encode()
        return _LEASED

    def check_lessee(
        self,
        user: UserInfo,
        queue_name: str,
        sequence: int,
        delivery_count: int,
        visibility_key: bytes,
    ) -> None:
        """Raise PermissionDenied unless `user` consumed this lease (or is an admin). Leases
        written under the original rules name no lessee: anyone allowed to consume may settle
        them, as before."""
        if self.rules < RULES_ACCESS_CHECKED or user.admin:
            return
        mark = self.store.get(visibility_key)
        assert mark is not None and mark[:1] == _LEASED, "a live lease has its index entry"
        lessee = bytes(mark[1:])
        if lessee and lessee != user.user_id.encode():
            raise PermissionDenied(
                f'delivery {delivery_count} of message {sequence} on queue "{queue_name}" is '
                f"leased to another user, not to user {user.user_id}; only the consumer that "
                "received it may ack, nack or extend it"
            )

    def check_lease(
        self, queue_name: str, sequence: int, delivery_count: int, message: _QueueMessage
    ) -> None:
        if (
            1 <= delivery_count == message.delivery_count
            and message.leased
            and message.visible_at_ms > self.clock
        ):
            return  # still leased to this delivery (checked first: the message is not built)
        what = f'delivery {delivery_count} of message {sequence} on queue "{queue_name}"'
        if delivery_count > message.delivery_count or delivery_count < 1:
            raise FailedPrecondition(
                f"{what} never happened: the message has been delivered "
                f"{message.delivery_count} times"
            )
        if delivery_count < message.delivery_count:
            raise FailedPrecondition(
                f"{what} is no longer leased: the message was delivered again "
                f"(delivery {message.delivery_count})"
            )
        if not message.leased:
            raise FailedPrecondition(
                f"{what} is no longer leased: it was given back (nack) and will be delivered again"
            )
        assert message.visible_at_ms <= self.clock, "every other case returned above"
        raise FailedPrecondition(
            f"{what} is no longer leased: its lease expired at {message.visible_at_ms} and "
            "it will be delivered again"
        )

    def leased_window(self, user: UserInfo, topic_name: str, offset: int) -> tuple[bytes, _Cursor]:
        """The subscription key and its cursor; raises FailedPrecondition for an
        offset this subscription has not been handed."""
        topic = self.existing_topic(topic_name)
        _authorize(user, "consume", Kind.TOPIC, topic_name, topic)
        key = _subscription_key(topic.incarnation, user.user_id)
        cursor = self.cursor(key, topic_name, user)
        if offset >= cursor.delivered or offset < 0:
            raise FailedPrecondition(
                f'offset {offset} of topic "{topic_name}" is not leased to user {user.user_id}: '
                f"the next offset to deliver is {cursor.delivered}; consume it first"
            )
        return key, cursor

    def check_window_lease(
        self, topic_name: str, offset: int, cursor: _Cursor, user: UserInfo
    ) -> None:
        if cursor.lease_deadline_ms <= self.clock:
            raise FailedPrecondition(
                f'offset {offset} of topic "{topic_name}" is no longer leased to user '
                f"{user.user_id}: its lease expired at {cursor.lease_deadline_ms} and it will be "
                "delivered again"
            )
