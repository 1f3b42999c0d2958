"""Commands the state machine applies, the results it returns, and the apply rules.

A Raft log entry is an `Entry`: cluster time when the leader proposed it (`now_ms`), a batch
of commands from concurrent clients (group commit), and the apply rules of that leader's
release (`rules`, see below). How entries are encoded for the log is entries.py.

Apply rules. A release that changes what applying a command does adds a rules version, and
every replica applies an entry by the rules it was written under (entries.py gives each rules
version its own format versions). So during a rolling upgrade the upgraded followers apply the
old leader's entries exactly as the old nodes do, and a node older than the leader stops at the
first entry of the new rules (`entries.UnsupportedEntry`) instead of applying it differently.

Results are never replicated (each replica computes its own, and only the proposing node hands
them to a client), so they are plain frozen dataclasses (named tuples for the ones built per
message) with no encoding.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

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

    def as_batch(self) -> PublishBatch:
        """This publish as a batch of one: how it is checked and applied."""
        return PublishBatch(
            key_hash=self.key_hash,
            kind=self.kind,
            name=self.name,
            producer_id=self.producer_id,
            bodies=(self.body,),
            sequences=(self.sequence,),
            delays_ms=(self.delay_ms,),
        )


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


# Apply rules, by release. Each has its own version of both formats.
RULES_ORIGINAL = 1
# Dead-letter moves are authorized: the source queue's owner must be allowed to publish to the
# dead-letter queue, and a dead-letter queue re-created after the source queue is not its own.
# A queue lease belongs to the user that consumed it: only that user (or an admin) may ack,
# nack or extend it.
RULES_ACCESS_CHECKED = 2
RULES_CURRENT = RULES_ACCESS_CHECKED


@dataclass(frozen=True)
class Entry:
    """One Raft log entry: cluster time when the leader proposed it (clock.py), a batch of
    commands, and the apply rules the leader runs (see the module docstring)."""

    now_ms: int
    commands: tuple[Command, ...]
    rules: int = RULES_CURRENT


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


def readies(command: Command) -> tuple[Kind, str] | None:
    """The queue or topic where applying `command` may make a message ready to consume."""
    if isinstance(command, Publish | PublishBatch | Nack):
        return command.kind, command.name
    return None
