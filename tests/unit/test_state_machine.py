"""Table-style tests of the state machine's semantics (ARCHITECTURE section 2), one behaviour each.

Every test drives a `StateMachine` over a `MemoryStore` through `apply_entry`, the way the node
does, with explicit `now_ms` values. Limits are checked just under, exactly at and just over
(big ones are lowered with monkeypatch, which works because the state machine reads
`limits.NAME` at call time). Refusals are checked by kind and full message, and a refused command
must leave the store byte-identical.
"""

from __future__ import annotations

import pytest

from chasqui_node import limits
from chasqui_node.commands import (
    Ack,
    AckBatch,
    Command,
    Consume,
    Created,
    CreateQueue,
    CreateTopic,
    CreateUser,
    Deleted,
    DeleteQueue,
    DeleteTopic,
    Deliveries,
    Delivery,
    Done,
    Entry,
    Extend,
    Kind,
    Nack,
    Overflow,
    Publish,
    QueueInfo,
    Receipt,
    Result,
    StartPosition,
    Subscribe,
    Subscribed,
    TopicInfo,
    Unsubscribe,
    Unsubscribed,
    UserCreated,
    UserInfo,
)
from chasqui_node.errors import (
    AlreadyExists,
    ChasquiError,
    FailedPrecondition,
    InvalidArgument,
    InvalidName,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    QueueFull,
    ResourceExhausted,
    Unauthenticated,
)
from chasqui_node.state import MemoryStore, StateMachine

ALICE = "a" * 64  # u1
BOB = "b" * 64  # u2
ADMIN = "c" * 64  # u3, admin
STRANGER = "d" * 64  # never registered
START_MS = 1_000_000
VISIBILITY_MS = limits.VISIBILITY_TIMEOUT_MS_DEFAULT
Q = Kind.QUEUE
T = Kind.TOPIC


class Broker:
    """A state machine, its store and a test clock, with three users already registered."""

    def __init__(self) -> None:
        self.machine = StateMachine()
        self.store = MemoryStore()
        self.now_ms = START_MS
        assert self.run(CreateUser(ALICE), CreateUser(BOB), CreateUser(ADMIN, admin=True)) == [
            UserCreated("u1"),
            UserCreated("u2"),
            UserCreated("u3"),
        ]

    def run(self, *commands: Command, now_ms: int | None = None) -> list[Result]:
        return self.machine.apply_entry(
            self.store, Entry(self.now_ms if now_ms is None else now_ms, commands)
        )

    def one(self, command: Command, now_ms: int | None = None) -> Result:
        [result] = self.run(command, now_ms=now_ms)
        return result

    def ok(self, command: Command) -> Result:
        result = self.one(command)
        assert not isinstance(result, ChasquiError), result
        return result

    def advance(self, ms: int) -> None:
        self.now_ms += ms

    def queue(self, name: str = "jobs", key_hash: str = ALICE, **settings: object) -> None:
        assert self.one(CreateQueue(key_hash, name, **settings)) == Created(Q, name, True)  # type: ignore[arg-type]

    def topic(self, name: str = "news", key_hash: str = ALICE, **settings: object) -> None:
        assert self.one(CreateTopic(key_hash, name, **settings)) == Created(T, name, True)  # type: ignore[arg-type]

    def publish(
        self,
        name: str = "jobs",
        body: bytes = b"m",
        kind: Kind = Q,
        producer_id: str = "",
        sequence: int = 0,
        delay_ms: int = 0,
    ) -> int:
        result = self.one(Publish(ALICE, kind, name, body, producer_id, sequence, delay_ms))
        assert isinstance(result, Receipt), result
        return result.sequence

    def consume(
        self, name: str = "jobs", count: int = 1, kind: Kind = Q, key_hash: str = BOB, **kw: int
    ) -> Deliveries:
        result = self.one(Consume(key_hash, kind, name, count, **kw))
        assert isinstance(result, Deliveries), result
        return result

    def bodies(
        self, name: str = "jobs", count: int = 10, kind: Kind = Q, key_hash: str = BOB
    ) -> list[bytes]:
        return [d.body for d in self.consume(name, count, kind, key_hash).deliveries]

    def refused(self, command: Command, error: type[ChasquiError], message: str) -> None:
        """The command is refused with exactly this error and changes nothing at all."""
        self.run()  # an empty entry brings the stored clock to now first
        before = self.store.items()
        result = self.one(command)
        assert type(result) is error, result
        assert result.message == message
        assert self.store.items() == before


@pytest.fixture
def broker() -> Broker:
    return Broker()


def keys_with_prefix(broker: Broker, prefix: bytes) -> list[bytes]:
    return [key for key, _ in broker.store.items() if key.startswith(prefix)]


# --- users and authentication ------------------------------------------------------------------


def test_users_get_sequential_ids_and_admin_flag(broker: Broker) -> None:
    assert broker.machine.authenticate(broker.store, ALICE) == UserInfo("u1", False)
    assert broker.machine.authenticate(broker.store, ADMIN) == UserInfo("u3", True)
    assert broker.one(CreateUser(STRANGER)) == UserCreated("u4")


def test_creating_a_user_with_a_known_key_is_already_exists_without_the_hash(
    broker: Broker,
) -> None:
    broker.refused(CreateUser(BOB), AlreadyExists, 'user "u2" already exists')


@pytest.mark.parametrize("key_hash", ["", "x" * (limits.KEY_HASH_CHARS_MAX + 1)])
def test_key_hash_of_wrong_length_is_invalid(broker: Broker, key_hash: str) -> None:
    broker.refused(
        CreateUser(key_hash),
        InvalidArgument,
        f"key hash must be 1 to key_hash_chars_max {limits.KEY_HASH_CHARS_MAX} characters, "
        f"got {len(key_hash)}",
    )


def test_key_hash_at_the_length_limit_is_accepted(broker: Broker) -> None:
    assert broker.one(CreateUser("x" * limits.KEY_HASH_CHARS_MAX)) == UserCreated("u4")


def test_users_max_under_at_over(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "USERS_MAX", 5)
    assert broker.one(CreateUser("k4")) == UserCreated("u4")  # under
    assert broker.one(CreateUser("k5")) == UserCreated("u5")  # reaches the limit
    broker.refused(CreateUser("k6"), ResourceExhausted, "user count is at users_max 5")


UNAUTHENTICATED_COMMANDS: list[Command] = [
    CreateTopic(STRANGER, "news"),
    DeleteTopic(STRANGER, "news"),
    CreateQueue(STRANGER, "jobs"),
    DeleteQueue(STRANGER, "jobs"),
    Subscribe(STRANGER, T, "news"),
    Unsubscribe(STRANGER, T, "news"),
    Publish(STRANGER, Q, "jobs", b"x", "", 0),
    Consume(STRANGER, Q, "jobs"),
    Ack(STRANGER, Q, "jobs", 0, 1),
    Nack(STRANGER, Q, "jobs", 0, 1),
    Extend(STRANGER, Q, "jobs", 0, 1, 1000),
]


@pytest.mark.parametrize("command", UNAUTHENTICATED_COMMANDS, ids=lambda c: type(c).__name__)
def test_unknown_key_is_unauthenticated(broker: Broker, command: Command) -> None:
    broker.queue()
    broker.topic()
    broker.refused(command, Unauthenticated, "unknown key")


def test_authenticate_and_listing_raise_for_unknown_key(broker: Broker) -> None:
    with pytest.raises(Unauthenticated, match="unknown key"):
        broker.machine.authenticate(broker.store, STRANGER)
    with pytest.raises(Unauthenticated):
        broker.machine.list_queues(broker.store, STRANGER, owned_only=False)
    with pytest.raises(Unauthenticated):
        broker.machine.list_topics(broker.store, STRANGER, owned_only=False)


# --- names and counts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "must be 1 to name_bytes_max 200 bytes, got 0"),
        ("a" * 201, "must be 1 to name_bytes_max 200 bytes, got 201"),
        ("has space", "character ' ' is not one of [A-Za-z0-9._-]"),
        ("a/b", "character '/' is not one of [A-Za-z0-9._-]"),
        ("ñandú", "character 'ñ' is not one of [A-Za-z0-9._-]"),
    ],
)
@pytest.mark.parametrize("kind", [Q, T])
def test_invalid_names_are_refused(broker: Broker, kind: Kind, name: str, reason: str) -> None:
    command: Command = CreateQueue(ALICE, name) if kind is Q else CreateTopic(ALICE, name)
    shown = name if len(name) <= 60 else name[:57] + "..."  # long names are shortened
    broker.refused(command, InvalidName, f"{kind.value} name {shown!r} is invalid: {reason}")


@pytest.mark.parametrize("name", ["a" * 199, "a" * 200, "Az09._-"])
def test_names_up_to_the_byte_limit_of_the_alphabet_are_accepted(broker: Broker, name: str) -> None:
    broker.queue(name)
    broker.topic(name)


def test_topics_and_queues_are_separate_namespaces(broker: Broker) -> None:
    broker.queue("same")
    broker.topic("same")
    assert broker.publish("same", kind=T) == 0
    assert broker.publish("same", kind=Q) == 0


@pytest.mark.parametrize("kind", [Q, T])
def test_count_limit_under_at_over(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, kind: Kind
) -> None:
    monkeypatch.setattr(limits, "QUEUES_MAX" if kind is Q else "TOPICS_MAX", 2)
    make = (lambda n: CreateQueue(ALICE, n)) if kind is Q else (lambda n: CreateTopic(ALICE, n))
    assert broker.one(make("one")) == Created(kind, "one", True)
    assert broker.one(make("two")) == Created(kind, "two", True)
    limit_name = "queues_max" if kind is Q else "topics_max"
    broker.refused(make("three"), ResourceExhausted, f"{kind.value} count is at {limit_name} 2")
    delete: Command = DeleteQueue(ALICE, "one") if kind is Q else DeleteTopic(ALICE, "one")
    assert broker.one(delete) == Deleted(kind, "one")
    assert broker.one(make("three")) == Created(kind, "three", True)


# --- ownership ----------------------------------------------------------------------------------


def test_exist_ok_by_the_owner_reports_not_created(broker: Broker) -> None:
    broker.queue()
    assert broker.one(CreateQueue(ALICE, "jobs", exist_ok=True)) == Created(Q, "jobs", False)
    broker.topic()
    assert broker.one(CreateTopic(ALICE, "news", exist_ok=True)) == Created(T, "news", False)


def test_existing_name_is_already_exists_with_or_without_exist_ok(broker: Broker) -> None:
    broker.queue()
    broker.topic()
    broker.refused(CreateQueue(ALICE, "jobs"), AlreadyExists, 'queue "jobs" already exists')
    broker.refused(CreateTopic(ALICE, "news"), AlreadyExists, 'topic "news" already exists')
    broker.refused(
        CreateQueue(BOB, "jobs", exist_ok=True), AlreadyExists, 'queue "jobs" already exists'
    )
    broker.refused(
        CreateTopic(BOB, "news", exist_ok=True), AlreadyExists, 'topic "news" already exists'
    )


def test_only_owner_or_admin_may_delete(broker: Broker) -> None:
    broker.queue()
    broker.topic()
    broker.refused(
        DeleteQueue(BOB, "jobs"),
        PermissionDenied,
        'queue "jobs" belongs to u1; only its owner or an admin may delete it',
    )
    broker.refused(
        DeleteTopic(BOB, "news"),
        PermissionDenied,
        'topic "news" belongs to u1; only its owner or an admin may delete it',
    )
    assert broker.one(DeleteQueue(ADMIN, "jobs")) == Deleted(Q, "jobs")
    assert broker.one(DeleteTopic(ALICE, "news")) == Deleted(T, "news")


def test_deleting_a_missing_name_is_not_found(broker: Broker) -> None:
    broker.refused(DeleteQueue(ALICE, "orders"), NotFound, 'queue "orders" does not exist')
    broker.refused(DeleteTopic(ALICE, "orders"), NotFound, 'topic "orders" does not exist')


def test_recreated_queue_does_not_see_old_messages(broker: Broker) -> None:
    broker.queue()
    broker.publish(body=b"old")
    broker.ok(DeleteQueue(ALICE, "jobs"))
    broker.queue()
    broker.publish(body=b"new")
    assert broker.bodies() == [b"new"]


def test_deleted_queue_and_topic_records_are_purged_in_bounded_batches(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "DELETED_PURGE_PER_COMMAND", 3)
    broker.queue()
    broker.topic()
    broker.ok(Subscribe(BOB, T, "news"))
    for _ in range(5):
        broker.publish()
        broker.publish("news", kind=T)
    broker.ok(DeleteQueue(ALICE, "jobs"))
    broker.ok(DeleteTopic(ALICE, "news"))

    def leftovers() -> int:
        return len([k for k in keys_with_prefix(broker, b"") if k[:1] in b"QVTSC"])

    # 5 queue messages, 5 index entries, 5 topic messages, 1 cursor; the DeleteTopic command
    # already purged one batch of the queue's records before it ran.
    assert leftovers() == 5 + 5 + 5 + 1 - 3
    broker.run(CreateUser("k4"))
    assert leftovers() == 5 + 5 + 5 + 1 - 6
    broker.run(*[CreateUser(f"k{n}") for n in range(5, 12)])
    assert [k for k in keys_with_prefix(broker, b"") if k[:1] in b"QVTSCX"] == []


# --- queues: publish limits ---------------------------------------------------------------------


def test_publish_to_full_queue_is_rejected(broker: Broker) -> None:
    broker.queue(max_length=2)
    assert broker.publish() == 0  # under
    assert broker.publish() == 1  # reaches max_length
    broker.refused(
        Publish(ALICE, Q, "jobs", b"m", "", 0),
        QueueFull,
        'queue "jobs" is full (2 of queue_depth_max 2)',
    )


def test_queue_depth_max_applies_without_max_length(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker.queue()
    monkeypatch.setattr(limits, "QUEUE_DEPTH_MAX", 2)
    broker.publish()
    broker.publish()
    broker.refused(
        Publish(ALICE, Q, "jobs", b"m", "", 0),
        QueueFull,
        'queue "jobs" is full (2 of queue_depth_max 2)',
    )


def test_acking_frees_room_in_a_full_queue(broker: Broker) -> None:
    broker.queue(max_length=1)
    broker.publish()
    [delivery] = broker.consume().deliveries
    broker.ok(Ack(BOB, Q, "jobs", delivery.sequence, 1))
    assert broker.publish() == 1


def test_drop_head_overflow_drops_the_oldest(broker: Broker) -> None:
    broker.queue(max_length=2, overflow=Overflow.DROP_HEAD)
    for body in (b"1", b"2", b"3"):
        broker.publish(body=body)
    assert broker.bodies() == [b"2", b"3"]
    assert broker.machine.list_queues(broker.store, ALICE, False)[0].depth == 2


@pytest.mark.parametrize(
    ("setting", "value", "limit_name", "limit"),
    [
        ("max_length", limits.QUEUE_DEPTH_MAX, "", 0),
        ("max_length", limits.QUEUE_DEPTH_MAX + 1, "queue_depth_max", limits.QUEUE_DEPTH_MAX),
        ("visibility_timeout_ms", limits.VISIBILITY_TIMEOUT_MS_MAX, "", 0),
        (
            "visibility_timeout_ms",
            limits.VISIBILITY_TIMEOUT_MS_MAX + 1,
            "visibility_timeout_ms_max",
            limits.VISIBILITY_TIMEOUT_MS_MAX,
        ),
        ("max_deliveries", limits.MAX_DELIVERIES_MAX, "", 0),
        (
            "max_deliveries",
            limits.MAX_DELIVERIES_MAX + 1,
            "max_deliveries_max",
            limits.MAX_DELIVERIES_MAX,
        ),
        ("message_ttl_ms", limits.MESSAGE_TTL_MS_MAX, "", 0),
        (
            "message_ttl_ms",
            limits.MESSAGE_TTL_MS_MAX + 1,
            "message_ttl_ms_max",
            limits.MESSAGE_TTL_MS_MAX,
        ),
    ],
)
def test_queue_settings_at_and_over_their_limits(
    broker: Broker, setting: str, value: int, limit_name: str, limit: int
) -> None:
    command = CreateQueue(ALICE, "jobs", **{setting: value})  # type: ignore[arg-type]
    if not limit_name:
        assert broker.one(command) == Created(Q, "jobs", True)
    else:
        broker.refused(command, LimitExceeded, f"{setting} of {value} exceeds {limit_name} {limit}")


def test_negative_queue_setting_is_invalid(broker: Broker) -> None:
    broker.refused(
        CreateQueue(ALICE, "jobs", max_length=-1),
        InvalidArgument,
        "max_length must be at least 0, got -1",
    )


@pytest.mark.parametrize(
    ("size", "accepted"),
    [
        (limits.MESSAGE_BYTES_MAX - 1, True),
        (limits.MESSAGE_BYTES_MAX, True),
        (limits.MESSAGE_BYTES_MAX + 1, False),
    ],
)
def test_message_size_limit(broker: Broker, size: int, accepted: bool) -> None:
    broker.queue()
    command = Publish(ALICE, Q, "jobs", b"x" * size, "", 0)
    if accepted:
        assert broker.one(command) == Receipt(Q, "jobs", 0, False)
    else:
        broker.refused(
            command,
            LimitExceeded,
            f"message of {size} bytes exceeds message_bytes_max {limits.MESSAGE_BYTES_MAX}",
        )


@pytest.mark.parametrize(
    ("size", "accepted"),
    [
        (limits.PRODUCER_ID_BYTES_MAX - 1, True),
        (limits.PRODUCER_ID_BYTES_MAX, True),
        (limits.PRODUCER_ID_BYTES_MAX + 1, False),
    ],
)
def test_producer_id_size_limit(broker: Broker, size: int, accepted: bool) -> None:
    broker.queue()
    command = Publish(ALICE, Q, "jobs", b"x", "p" * size, 0)
    if accepted:
        assert broker.one(command) == Receipt(Q, "jobs", 0, False)
    else:
        broker.refused(
            command,
            LimitExceeded,
            f"producer_id of {size} bytes exceeds producer_id_bytes_max "
            f"{limits.PRODUCER_ID_BYTES_MAX}",
        )


@pytest.mark.parametrize(
    ("delay_ms", "accepted"),
    [
        (limits.DELAY_MS_MAX - 1, True),
        (limits.DELAY_MS_MAX, True),
        (limits.DELAY_MS_MAX + 1, False),
    ],
)
def test_delay_limit(broker: Broker, delay_ms: int, accepted: bool) -> None:
    broker.queue()
    command = Publish(ALICE, Q, "jobs", b"x", "", 0, delay_ms)
    if accepted:
        assert broker.one(command) == Receipt(Q, "jobs", 0, False)
    else:
        broker.refused(
            command,
            LimitExceeded,
            f"delay_ms of {delay_ms} exceeds delay_ms_max {limits.DELAY_MS_MAX}",
        )


def test_delay_on_a_topic_is_invalid(broker: Broker) -> None:
    broker.topic()
    broker.refused(
        Publish(ALICE, T, "news", b"x", "", 0, 10),
        InvalidArgument,
        "delay_ms applies to queues only; topic messages are visible at once",
    )


def test_publish_to_missing_queue_or_topic_is_not_found(broker: Broker) -> None:
    broker.refused(
        Publish(ALICE, Q, "orders", b"x", "", 0), NotFound, 'queue "orders" does not exist'
    )
    broker.refused(
        Publish(ALICE, T, "orders", b"x", "", 0), NotFound, 'topic "orders" does not exist'
    )


def test_negative_publish_sequence_is_invalid(broker: Broker) -> None:
    broker.queue()
    broker.refused(
        Publish(ALICE, Q, "jobs", b"x", "p", -1),
        InvalidArgument,
        f"sequence must be between 0 and {2**63 - 1}, got -1",
    )


# --- queues: consume, leases, redelivery -------------------------------------------------------


def test_queue_is_fifo_by_publish_sequence(broker: Broker) -> None:
    broker.queue()
    for n in range(5):
        assert broker.publish(body=bytes([n])) == n
    deliveries = broker.consume(count=5).deliveries
    assert [d.sequence for d in deliveries] == [0, 1, 2, 3, 4]
    assert all(d.delivery_count == 1 for d in deliveries)


def test_consume_returns_lease_details(broker: Broker) -> None:
    broker.queue()
    broker.one(Publish(ALICE, Q, "jobs", b"hello", "prod", 7))
    broker.advance(5)
    [delivery] = broker.consume().deliveries
    assert delivery == Delivery(
        Q, "jobs", 0, b"hello", 1, START_MS, "prod", START_MS + 5 + VISIBILITY_MS
    )


def test_leased_message_is_not_handed_out_twice(broker: Broker) -> None:
    broker.queue()
    broker.publish()
    assert len(broker.consume().deliveries) == 1
    empty = broker.consume(key_hash=ALICE)
    assert empty.deliveries == ()
    assert empty.next_ready_ms == START_MS + VISIBILITY_MS


def test_empty_queue_has_no_next_ready_time(broker: Broker) -> None:
    broker.queue()
    assert broker.consume() == Deliveries((), 0)


def test_a_consume_that_takes_all_that_is_ready_says_when_more_may_be(broker: Broker) -> None:
    broker.queue(visibility_timeout_ms=1000)
    broker.publish()
    broker.publish(delay_ms=500)
    result = broker.consume(count=5)
    assert [d.sequence for d in result.deliveries] == [0]
    assert not result.more_ready
    assert result.next_ready_ms == START_MS + 500  # the delayed one, before the lease ends
    broker.advance(500)
    result = broker.consume(count=5)
    assert [d.sequence for d in result.deliveries] == [1]
    assert (result.more_ready, result.next_ready_ms) == (False, START_MS + 1000)


def test_a_consume_stopped_by_its_count_says_more_are_ready(broker: Broker) -> None:
    broker.queue()
    broker.publish()
    broker.publish()
    first = broker.consume(count=1)
    assert len(first.deliveries) == 1
    assert first.more_ready
    last = broker.consume(count=1)
    assert len(last.deliveries) == 1
    assert (last.more_ready, last.next_ready_ms) == (False, START_MS + VISIBILITY_MS)


def test_a_consume_stopped_by_its_reply_size_says_more_are_ready(broker: Broker) -> None:
    broker.queue()
    big = b"x" * limits.MESSAGE_BYTES_MAX
    messages = limits.CONSUME_BYTES_MAX // limits.MESSAGE_BYTES_MAX + 1
    for _ in range(messages):
        broker.publish(body=big)
    first = broker.consume(count=messages)
    assert len(first.deliveries) == messages - 1
    assert first.more_ready
    last = broker.consume(count=messages)
    assert len(last.deliveries) == 1
    assert not last.more_ready


def test_a_topic_consume_says_whether_it_reached_the_end(broker: Broker) -> None:
    broker.topic()
    broker.ok(Subscribe(BOB, T, "news"))
    for _ in range(3):
        broker.publish("news", kind=T)
    first = broker.consume("news", count=2, kind=T)
    assert len(first.deliveries) == 2
    assert first.more_ready  # as many as asked for: the topic may hold more
    rest = broker.consume("news", count=2, kind=T)
    assert len(rest.deliveries) == 1
    # At the end: only the open window's lease ending (a rewind) makes something ready.
    assert (rest.more_ready, rest.next_ready_ms) == (False, START_MS + VISIBILITY_MS)


def test_redelivery_after_lease_expiry_increments_delivery_count(broker: Broker) -> None:
    broker.queue(visibility_timeout_ms=1000)
    broker.publish()
    for expected_count in (1, 2, 3):
        [delivery] = broker.consume().deliveries
        assert delivery.delivery_count == expected_count
        broker.advance(999)
        assert broker.consume().deliveries == ()  # still leased
        broker.advance(1)


def test_consume_visibility_override(broker: Broker) -> None:
    broker.queue()
    broker.publish()
    [delivery] = broker.consume(visibility_timeout_ms=50).deliveries
    assert delivery.lease_deadline_ms == START_MS + 50
    broker.advance(50)
    assert broker.consume().deliveries[0].delivery_count == 2


@pytest.mark.parametrize(
    ("count", "error", "message"),
    [
        (0, InvalidArgument, "max_messages must be at least 1, got 0"),
        (
            limits.CONSUME_MESSAGES_MAX + 1,
            LimitExceeded,
            f"max_messages of {limits.CONSUME_MESSAGES_MAX + 1} exceeds consume_messages_max "
            f"{limits.CONSUME_MESSAGES_MAX}",
        ),
    ],
)
def test_consume_max_messages_out_of_range(
    broker: Broker, count: int, error: type[ChasquiError], message: str
) -> None:
    broker.queue()
    broker.refused(Consume(BOB, Q, "jobs", count), error, message)


def test_consume_max_messages_at_limit(broker: Broker) -> None:
    broker.queue()
    for _ in range(limits.CONSUME_MESSAGES_MAX + 1):
        broker.publish()
    assert len(broker.consume(count=limits.CONSUME_MESSAGES_MAX).deliveries) == 500


def test_delayed_message_becomes_visible_after_its_delay(broker: Broker) -> None:
    broker.queue()
    broker.publish(delay_ms=500)
    assert broker.consume() == Deliveries((), START_MS + 500)
    broker.advance(499)
    assert broker.consume().deliveries == ()
    broker.advance(1)
    assert broker.bodies() == [b"m"]


def test_ack_deletes_the_message(broker: Broker) -> None:
    broker.queue(visibility_timeout_ms=10)
    broker.publish()
    [delivery] = broker.consume().deliveries
    assert broker.one(Ack(BOB, Q, "jobs", delivery.sequence, 1)) == Done()
    broker.advance(100)
    assert broker.consume() == Deliveries((), 0)
    assert keys_with_prefix(broker, b"Q") == []


def test_ack_is_idempotent(broker: Broker) -> None:
    broker.queue()
    broker.publish()
    broker.consume()
    assert broker.one(Ack(BOB, Q, "jobs", 0, 1)) == Done()
    before = broker.store.items()
    assert broker.one(Ack(BOB, Q, "jobs", 0, 1)) == Done()
    assert broker.store.items() == before


def test_an_ack_batch_acks_every_item_it_can_and_reports_the_first_refusal(
    broker: Broker,
) -> None:
    broker.queue(visibility_timeout_ms=60_000)
    for _ in range(3):
        broker.publish()
    assert [d.sequence for d in broker.consume(count=3).deliveries] == [0, 1, 2]
    # Message 1 is acked with a delivery count it never had; 0 and 2 are acked all the same.
    result = broker.one(AckBatch(BOB, Q, "jobs", (0, 1, 2), (1, 5, 1)))
    assert isinstance(result, FailedPrecondition)
    assert "message 1" in result.message
    broker.advance(60_000)
    assert [(d.sequence, d.delivery_count) for d in broker.consume(count=3).deliveries] == [(1, 2)]


def test_ack_of_a_sequence_never_assigned_is_not_found(broker: Broker) -> None:
    broker.queue()
    broker.publish()
    broker.refused(
        Ack(BOB, Q, "jobs", 1, 1), NotFound, 'message 1 was never published to queue "jobs"'
    )


def test_ack_after_lease_expiry_is_refused(broker: Broker) -> None:
    broker.queue(visibility_timeout_ms=1000)
    broker.publish()
    broker.consume()
    broker.advance(1000)
    broker.refused(
        Ack(BOB, Q, "jobs", 0, 1),
        FailedPrecondition,
        f'delivery 1 of message 0 on queue "jobs" is no longer leased: its lease expired at '
        f"{START_MS + 1000} and it will be delivered again",
    )


def test_ack_of_an_older_delivery_is_refused(broker: Broker) -> None:
    broker.queue(visibility_timeout_ms=1000)
    broker.publish()
    broker.consume()
    broker.advance(1000)
    broker.consume()
    broker.refused(
        Ack(BOB, Q, "jobs", 0, 1),
        FailedPrecondition,
        'delivery 1 of message 0 on queue "jobs" is no longer leased: the message was '
        "delivered again (delivery 2)",
    )
    assert broker.one(Ack(BOB, Q, "jobs", 0, 2)) == Done()


def test_ack_of_a_delivery_that_never_happened_is_refused(broker: Broker) -> None:
    broker.queue()
    broker.publish()
    broker.refused(
        Ack(BOB, Q, "jobs", 0, 1),
        FailedPrecondition,
        'delivery 1 of message 0 on queue "jobs" never happened: the message has been '
        "delivered 0 times",
    )


def test_nack_makes_the_message_visible_again_now(broker: Broker) -> None:
    broker.queue()
    broker.publish()
    broker.consume()
    assert broker.one(Nack(BOB, Q, "jobs", 0, 1)) == Done()
    [again] = broker.consume().deliveries
    assert again.delivery_count == 2


def test_nack_with_delay(broker: Broker) -> None:
    broker.queue()
    broker.publish()
    broker.consume()
    broker.ok(Nack(BOB, Q, "jobs", 0, 1, delay_ms=300))
    assert broker.consume() == Deliveries((), START_MS + 300)
    broker.advance(300)
    assert broker.consume().deliveries[0].delivery_count == 2


def test_retried_nack_is_done_but_ack_after_nack_is_refused(broker: Broker) -> None:
    broker.queue()
    broker.publish()
    broker.consume()
    broker.ok(Nack(BOB, Q, "jobs", 0, 1, delay_ms=300))
    assert broker.one(Nack(BOB, Q, "jobs", 0, 1, delay_ms=300)) == Done()
    broker.refused(
        Ack(BOB, Q, "jobs", 0, 1),
        FailedPrecondition,
        'delivery 1 of message 0 on queue "jobs" is no longer leased: it was given back '
        "(nack) and will be delivered again",
    )


def test_nack_delay_over_limit_is_refused(broker: Broker) -> None:
    broker.queue()
    broker.publish()
    broker.consume()
    broker.refused(
        Nack(BOB, Q, "jobs", 0, 1, delay_ms=limits.DELAY_MS_MAX + 1),
        LimitExceeded,
        f"delay_ms of {limits.DELAY_MS_MAX + 1} exceeds delay_ms_max {limits.DELAY_MS_MAX}",
    )


def test_extend_pushes_the_lease_deadline(broker: Broker) -> None:
    broker.queue(visibility_timeout_ms=1000)
    broker.publish()
    broker.consume()
    broker.advance(900)
    assert broker.one(Extend(BOB, Q, "jobs", 0, 1, 5000)) == Done()
    broker.advance(4999)
    assert broker.consume() == Deliveries((), START_MS + 900 + 5000)
    assert broker.one(Ack(BOB, Q, "jobs", 0, 1)) == Done()


@pytest.mark.parametrize(
    ("extend_ms", "error", "message"),
    [
        (0, InvalidArgument, "extend_ms must be at least 1, got 0"),
        (
            limits.VISIBILITY_TIMEOUT_MS_MAX + 1,
            LimitExceeded,
            f"extend_ms of {limits.VISIBILITY_TIMEOUT_MS_MAX + 1} exceeds "
            f"visibility_timeout_ms_max {limits.VISIBILITY_TIMEOUT_MS_MAX}",
        ),
    ],
)
def test_extend_out_of_range_is_refused(
    broker: Broker, extend_ms: int, error: type[ChasquiError], message: str
) -> None:
    broker.queue()
    broker.publish()
    broker.consume()
    broker.refused(Extend(BOB, Q, "jobs", 0, 1, extend_ms), error, message)


def test_extend_at_the_limit_is_accepted(broker: Broker) -> None:
    broker.queue()
    broker.publish()
    broker.consume()
    assert broker.one(Extend(BOB, Q, "jobs", 0, 1, limits.VISIBILITY_TIMEOUT_MS_MAX)) == Done()


def test_extend_after_expiry_or_ack_is_refused(broker: Broker) -> None:
    broker.queue(visibility_timeout_ms=10)
    broker.publish()
    broker.publish()
    broker.consume(count=2)
    broker.ok(Ack(BOB, Q, "jobs", 1, 1))
    broker.advance(10)
    broker.refused(
        Extend(BOB, Q, "jobs", 0, 1, 100),
        FailedPrecondition,
        f'delivery 1 of message 0 on queue "jobs" is no longer leased: its lease expired at '
        f"{START_MS + 10} and it will be delivered again",
    )
    broker.refused(
        Extend(BOB, Q, "jobs", 1, 1, 100),
        FailedPrecondition,
        'message 1 on queue "jobs" is no longer stored: it was acked, expired or dead-lettered',
    )


# --- queues: dead letters, TTL ------------------------------------------------------------------


def test_message_moves_to_dead_letter_queue_after_max_deliveries(broker: Broker) -> None:
    broker.queue("dead")
    broker.queue(visibility_timeout_ms=10, max_deliveries=2, dead_letter_queue="dead")
    broker.publish(body=b"poison")
    for count in (1, 2):
        assert broker.consume().deliveries[0].delivery_count == count
        broker.advance(10)
    assert broker.consume() == Deliveries((), 0)
    [dead] = broker.consume("dead").deliveries
    assert (dead.body, dead.delivery_count) == (b"poison", 1)
    assert [q.depth for q in broker.machine.list_queues(broker.store, ALICE, False)] == [1, 0]


def test_message_is_dropped_after_max_deliveries_without_dead_letter_queue(
    broker: Broker,
) -> None:
    broker.queue(visibility_timeout_ms=10, max_deliveries=1)
    broker.publish()
    broker.consume()
    broker.advance(10)
    assert broker.consume() == Deliveries((), 0)
    assert keys_with_prefix(broker, b"Q") == []


def test_dead_letter_queue_must_exist_at_creation(broker: Broker) -> None:
    broker.refused(
        CreateQueue(ALICE, "jobs", dead_letter_queue="dead"),
        NotFound,
        'dead-letter queue "dead" does not exist; create it before the queue that uses it',
    )


def test_dead_letter_queue_deleted_later_means_drop(broker: Broker) -> None:
    broker.queue("dead")
    broker.queue(visibility_timeout_ms=10, max_deliveries=1, dead_letter_queue="dead")
    broker.publish()
    broker.consume()
    broker.ok(DeleteQueue(ALICE, "dead"))
    broker.advance(10)
    assert broker.consume() == Deliveries((), 0)
    assert broker.machine.list_queues(broker.store, ALICE, False)[0].depth == 0


def test_expired_message_is_never_consumed(broker: Broker) -> None:
    broker.queue(message_ttl_ms=100)
    broker.publish(body=b"stale")
    broker.advance(50)
    broker.publish(body=b"fresh")
    broker.advance(50)
    assert broker.bodies() == [b"fresh"]
    assert broker.machine.list_queues(broker.store, ALICE, False)[0].depth == 1


def test_expired_message_is_dead_lettered_when_the_queue_has_a_dlq(broker: Broker) -> None:
    broker.queue("dead")
    broker.queue(message_ttl_ms=100, dead_letter_queue="dead")
    broker.publish(body=b"stale")
    broker.advance(100)
    assert broker.consume() == Deliveries((), 0)
    assert broker.bodies("dead") == [b"stale"]


# --- dedup --------------------------------------------------------------------------------------


def test_duplicate_publish_returns_the_original_receipt_and_stores_nothing(
    broker: Broker,
) -> None:
    broker.queue()
    assert broker.one(Publish(ALICE, Q, "jobs", b"x", "p", 1)) == Receipt(Q, "jobs", 0, False)
    assert broker.one(Publish(ALICE, Q, "jobs", b"y", "p", 2)) == Receipt(Q, "jobs", 1, False)
    before = broker.store.items()
    assert broker.one(Publish(ALICE, Q, "jobs", b"x", "p", 1)) == Receipt(Q, "jobs", 0, True)
    assert broker.store.items() == before


def test_duplicate_inside_one_entry_is_detected(broker: Broker) -> None:
    broker.topic()
    publish = Publish(ALICE, T, "news", b"x", "p", 1)
    assert broker.run(publish, publish) == [
        Receipt(T, "news", 0, False),
        Receipt(T, "news", 0, True),
    ]


def test_duplicate_of_a_publish_to_a_full_queue_still_gets_its_receipt(broker: Broker) -> None:
    broker.queue(max_length=1)
    broker.one(Publish(ALICE, Q, "jobs", b"x", "p", 1))
    assert broker.one(Publish(ALICE, Q, "jobs", b"x", "p", 1)) == Receipt(Q, "jobs", 0, True)


def test_empty_producer_id_means_no_dedup(broker: Broker) -> None:
    broker.queue()
    assert broker.publish() == 0
    assert broker.publish() == 1


def test_dedup_is_per_destination(broker: Broker) -> None:
    broker.queue("one")
    broker.queue("two")
    assert broker.one(Publish(ALICE, Q, "one", b"x", "p", 1)) == Receipt(Q, "one", 0, False)
    assert broker.one(Publish(ALICE, Q, "two", b"x", "p", 1)) == Receipt(Q, "two", 0, False)


def test_dedup_window_under_at_over(broker: Broker) -> None:
    broker.queue()
    publish = Publish(ALICE, Q, "jobs", b"x", "p", 1)
    broker.one(publish)
    broker.advance(limits.DEDUP_WINDOW_MS - 1)
    assert broker.one(publish) == Receipt(Q, "jobs", 0, True)
    broker.advance(1)
    assert broker.one(publish) == Receipt(Q, "jobs", 1, False)
    assert broker.one(publish) == Receipt(Q, "jobs", 1, True)


def test_expired_dedup_entries_are_purged_in_bounded_batches(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "DEDUP_PURGE_PER_COMMAND", 2)
    broker.queue()
    broker.run(*[Publish(ALICE, Q, "jobs", b"x", "p", n) for n in range(5)])
    assert len(keys_with_prefix(broker, b"D")) == 5
    assert len(keys_with_prefix(broker, b"E")) == 5
    broker.advance(limits.DEDUP_WINDOW_MS)
    broker.run(CreateUser("k4"))
    assert len(keys_with_prefix(broker, b"D")) == 3
    broker.run(CreateUser("k5"), CreateUser("k6"))
    assert keys_with_prefix(broker, b"D") == keys_with_prefix(broker, b"E") == []


# --- topics -------------------------------------------------------------------------------------


def test_topic_fans_out_to_every_subscriber(broker: Broker) -> None:
    broker.topic()
    assert broker.one(Subscribe(ALICE, T, "news")) == Subscribed(T, "news", 0)
    assert broker.one(Subscribe(BOB, T, "news")) == Subscribed(T, "news", 0)
    assert broker.publish("news", b"1", T) == 0
    assert broker.publish("news", b"2", T) == 1
    assert broker.bodies("news", kind=T, key_hash=ALICE) == [b"1", b"2"]
    assert broker.bodies("news", kind=T, key_hash=BOB) == [b"1", b"2"]


def test_latest_subscription_sees_only_later_messages_earliest_sees_all(broker: Broker) -> None:
    broker.topic()
    broker.publish("news", b"before", T)
    assert broker.one(Subscribe(ALICE, T, "news")) == Subscribed(T, "news", 1)
    assert broker.one(Subscribe(BOB, T, "news", StartPosition.EARLIEST)) == Subscribed(T, "news", 0)
    broker.publish("news", b"after", T)
    assert broker.bodies("news", kind=T, key_hash=ALICE) == [b"after"]
    assert broker.bodies("news", kind=T, key_hash=BOB) == [b"before", b"after"]


@pytest.mark.parametrize(("asked", "given"), [(-5, 0), (0, 0), (2, 2), (3, 3), (4, 3), (99, 3)])
def test_offset_subscription_is_clamped_to_what_is_retained(
    broker: Broker, asked: int, given: int
) -> None:
    broker.topic()
    for _ in range(3):
        broker.publish("news", kind=T)
    result = broker.one(Subscribe(BOB, T, "news", StartPosition.OFFSET, asked))
    assert result == Subscribed(T, "news", given)


def test_subscribing_again_keeps_the_cursor(broker: Broker) -> None:
    broker.topic()
    broker.ok(Subscribe(BOB, T, "news"))
    broker.publish("news", kind=T)
    broker.consume("news", kind=T)
    broker.ok(Ack(BOB, T, "news", 0, 1))
    broker.publish("news", kind=T)
    before = broker.store.items()
    assert broker.one(Subscribe(BOB, T, "news", StartPosition.EARLIEST)) == Subscribed(T, "news", 1)
    assert broker.store.items() == before


def test_consume_without_subscription_names_topic_and_user(broker: Broker) -> None:
    broker.topic()
    broker.refused(
        Consume(BOB, T, "news"),
        NotFound,
        'user u2 has no subscription to topic "news"; subscribe first',
    )


def test_topic_ack_is_cumulative_and_idempotent(broker: Broker) -> None:
    broker.topic()
    broker.ok(Subscribe(BOB, T, "news"))
    for _ in range(4):
        broker.publish("news", kind=T)
    broker.consume("news", 3, T)
    assert broker.one(Ack(BOB, T, "news", 1, 1)) == Done()  # acks 0 and 1
    assert broker.one(Ack(BOB, T, "news", 0, 1)) == Done()  # already acked
    broker.advance(VISIBILITY_MS)  # the lease on offset 2 expires
    [again, fresh] = broker.consume("news", 5, T).deliveries
    assert (again.sequence, again.delivery_count) == (2, 2)
    assert (fresh.sequence, fresh.delivery_count) == (3, 1)


def test_topic_ack_may_not_skip_an_earlier_reply_that_was_never_acked(broker: Broker) -> None:
    """A consume reply lost in a leader change must not be skipped by acking the next one."""
    broker.topic()
    broker.ok(Subscribe(BOB, T, "news"))
    for _ in range(6):
        broker.publish("news", kind=T)
    broker.consume("news", 2, T)  # offsets 0-1: the reply never reached the client
    [_, _, last] = broker.consume("news", 3, T).deliveries  # offsets 2-4: received
    result = broker.one(Ack(BOB, T, "news", last.sequence, last.delivery_count))
    assert result == FailedPrecondition(
        'offsets 0 to 1 of topic "news" were handed out to user u2 by an earlier consume that '
        "was not acked; offset 4 was not acked past them, and every offset from 0 will be "
        "delivered again"
    )
    again = broker.consume("news", 10, T).deliveries
    assert [d.sequence for d in again] == [0, 1, 2, 3, 4, 5]
    assert [d.delivery_count for d in again] == [2, 2, 2, 2, 2, 1]


def test_topic_acks_of_consecutive_replies_in_order_succeed(broker: Broker) -> None:
    broker.topic()
    broker.ok(Subscribe(BOB, T, "news"))
    for _ in range(4):
        broker.publish("news", kind=T)
    first = broker.consume("news", 2, T).deliveries
    second = broker.consume("news", 2, T).deliveries
    assert broker.one(Ack(BOB, T, "news", first[-1].sequence, 1)) == Done()
    assert broker.one(Ack(BOB, T, "news", second[-1].sequence, 1)) == Done()
    assert broker.consume("news", 5, T).deliveries == ()


def test_too_many_unacked_topic_replies_rewind_the_subscription(broker: Broker) -> None:
    broker.topic()
    broker.ok(Subscribe(BOB, T, "news"))
    for _ in range(limits.TOPIC_WINDOWS_MAX + 1):
        broker.publish("news", kind=T)
    for offset in range(limits.TOPIC_WINDOWS_MAX):
        assert [d.sequence for d in broker.consume("news", 1, T).deliveries] == [offset]
    [rewound] = broker.consume("news", 1, T).deliveries
    assert (rewound.sequence, rewound.delivery_count) == (0, 2)


def test_topic_ack_of_an_offset_not_yet_delivered_is_refused(broker: Broker) -> None:
    broker.topic()
    broker.ok(Subscribe(BOB, T, "news"))
    broker.publish("news", kind=T)
    broker.publish("news", kind=T)
    broker.consume("news", 1, T)
    broker.refused(
        Ack(BOB, T, "news", 1, 1),
        FailedPrecondition,
        'offset 1 of topic "news" is not leased to user u2: the next offset to deliver is 1; '
        "consume it first",
    )


def test_topic_lease_expiry_redelivers_with_higher_count(broker: Broker) -> None:
    broker.topic()
    broker.ok(Subscribe(BOB, T, "news"))
    broker.publish("news", kind=T)
    assert broker.consume("news", kind=T).deliveries[0].delivery_count == 1
    empty = broker.consume("news", kind=T)
    assert empty == Deliveries((), START_MS + VISIBILITY_MS)
    broker.advance(VISIBILITY_MS)
    assert broker.consume("news", kind=T).deliveries[0].delivery_count == 2
    broker.advance(VISIBILITY_MS)
    assert broker.consume("news", kind=T).deliveries[0].delivery_count == 3


def test_topic_nack_redelivers_now(broker: Broker) -> None:
    broker.topic()
    broker.ok(Subscribe(BOB, T, "news"))
    broker.publish("news", kind=T)
    broker.consume("news", kind=T)
    assert broker.one(Nack(BOB, T, "news", 0, 1)) == Done()
    [again] = broker.consume("news", kind=T).deliveries
    assert (again.sequence, again.delivery_count) == (0, 2)


def test_topic_extend_keeps_the_window_leased(broker: Broker) -> None:
    broker.topic()
    broker.ok(Subscribe(BOB, T, "news"))
    broker.publish("news", kind=T)
    broker.consume("news", kind=T)
    broker.ok(Extend(BOB, T, "news", 0, 1, VISIBILITY_MS * 2))
    broker.advance(VISIBILITY_MS)
    assert broker.consume("news", kind=T).deliveries == ()


def test_topic_retention_by_age_drops_old_messages(broker: Broker) -> None:
    broker.topic(retention_ms=1000)
    broker.publish("news", b"old", T)
    broker.advance(600)
    broker.publish("news", b"new", T)
    broker.advance(400)
    broker.publish("news", b"newest", T)  # purges "old"
    [info] = broker.machine.list_topics(broker.store, ALICE, False)
    assert (info.first_offset, info.next_offset) == (1, 3)
    broker.ok(Subscribe(BOB, T, "news", StartPosition.EARLIEST))
    assert broker.bodies("news", kind=T) == [b"new", b"newest"]


def test_topic_retention_by_bytes_drops_from_the_head(broker: Broker) -> None:
    broker.topic(retention_bytes=10)
    for body in (b"aaaa", b"bbbb", b"cccc"):
        broker.publish("news", body, T)
    [info] = broker.machine.list_topics(broker.store, ALICE, False)
    assert (info.first_offset, info.next_offset) == (1, 3)


def test_subscription_behind_retention_skips_to_first_retained(broker: Broker) -> None:
    broker.topic(retention_bytes=4)
    broker.ok(Subscribe(BOB, T, "news"))
    for body in (b"aaaa", b"bbbb", b"cccc"):
        broker.publish("news", body, T)
    assert [d.sequence for d in broker.consume("news", 5, T).deliveries] == [2]


def test_unsubscribe_deletes_the_cursor(broker: Broker) -> None:
    broker.topic()
    broker.ok(Subscribe(BOB, T, "news", StartPosition.EARLIEST))
    broker.publish("news", kind=T)
    assert broker.one(Unsubscribe(BOB, T, "news")) == Unsubscribed(T, "news")
    assert keys_with_prefix(broker, b"S") == []
    broker.refused(
        Unsubscribe(BOB, T, "news"), NotFound, 'user u2 is not subscribed to topic "news"'
    )
    assert broker.one(Subscribe(BOB, T, "news")) == Subscribed(T, "news", 1)


def test_queue_subscription_is_recorded_but_not_needed_to_consume(broker: Broker) -> None:
    broker.queue()
    broker.publish()
    assert broker.bodies(key_hash=ALICE) == [b"m"]
    assert broker.one(Subscribe(BOB, Q, "jobs")) == Subscribed(Q, "jobs", 0)
    assert broker.one(Subscribe(BOB, Q, "jobs")) == Subscribed(Q, "jobs", 0)
    [info] = broker.machine.list_queues(broker.store, BOB, False)
    assert info.subscribed
    assert broker.one(Unsubscribe(BOB, Q, "jobs")) == Unsubscribed(Q, "jobs")
    broker.refused(
        Unsubscribe(BOB, Q, "jobs"), NotFound, 'user u2 is not subscribed to queue "jobs"'
    )


# --- listing ------------------------------------------------------------------------------------


def test_list_topics_sorted_with_owner_and_subscription(broker: Broker) -> None:
    broker.topic("zeta")
    broker.topic("alpha", key_hash=BOB)
    broker.ok(Subscribe(ALICE, T, "alpha"))
    broker.publish("zeta", kind=T)
    assert broker.machine.list_topics(broker.store, ALICE, owned_only=False) == [
        TopicInfo("alpha", "u2", True, 0, 0),
        TopicInfo("zeta", "u1", False, 0, 1),
    ]
    assert broker.machine.list_topics(broker.store, ALICE, owned_only=True) == [
        TopicInfo("zeta", "u1", False, 0, 1),
    ]


def test_list_queues_reports_depth_and_in_flight(broker: Broker) -> None:
    broker.queue("b-queue", key_hash=BOB)
    broker.queue("a-queue")
    for _ in range(3):
        broker.publish("a-queue")
    broker.publish("a-queue", delay_ms=1000)
    broker.consume("a-queue", count=2)
    assert broker.machine.list_queues(broker.store, ALICE, owned_only=False) == [
        QueueInfo("a-queue", "u1", False, 4, 2),
        QueueInfo("b-queue", "u2", False, 0, 0),
    ]
    assert [q.name for q in broker.machine.list_queues(broker.store, BOB, owned_only=True)] == [
        "b-queue"
    ]


# --- time and refusals --------------------------------------------------------------------------


def test_time_never_goes_backwards_when_now_decreases(broker: Broker) -> None:
    broker.queue(visibility_timeout_ms=1000)
    broker.publish()
    [delivery] = broker.consume().deliveries
    assert delivery.lease_deadline_ms == START_MS + 1000
    broker.now_ms = START_MS + 1000
    broker.publish(body=b"later")
    broker.now_ms = START_MS  # a new leader with a slower clock
    [redelivered, later] = broker.consume(count=2).deliveries
    assert (redelivered.sequence, redelivered.delivery_count) == (0, 2)
    assert redelivered.lease_deadline_ms == START_MS + 2000
    assert later.publish_time_ms == START_MS + 1000


REFUSED: list[tuple[Command, type[ChasquiError]]] = [
    (CreateQueue(BOB, "jobs"), AlreadyExists),
    (CreateQueue(ALICE, "new", dead_letter_queue="missing"), NotFound),
    (CreateTopic(ALICE, "bad name"), InvalidName),
    (DeleteQueue(BOB, "jobs"), PermissionDenied),
    (DeleteTopic(BOB, "news"), PermissionDenied),
    (Subscribe(BOB, T, "missing"), NotFound),
    (Unsubscribe(ADMIN, T, "news"), NotFound),
    (Publish(ALICE, Q, "full", b"x", "p", 99), QueueFull),
    (Publish(ALICE, Q, "jobs", b"x" * (limits.MESSAGE_BYTES_MAX + 1), "", 0), LimitExceeded),
    (Consume(ADMIN, T, "news"), NotFound),
    (Consume(BOB, Q, "jobs", 0), InvalidArgument),
    (Ack(BOB, Q, "jobs", 0, 7), FailedPrecondition),
    (Ack(BOB, Q, "jobs", 50, 1), NotFound),
    (Ack(BOB, T, "news", 5, 1), FailedPrecondition),
    (Nack(BOB, Q, "jobs", 0, 7), FailedPrecondition),
    (Extend(BOB, Q, "jobs", 0, 1, 0), InvalidArgument),
    (Extend(BOB, T, "news", 9, 1, 10), FailedPrecondition),
    (Publish(STRANGER, Q, "jobs", b"x", "", 0), Unauthenticated),
]


@pytest.mark.parametrize(("command", "error"), REFUSED, ids=lambda c: type(c).__name__)
def test_refused_command_leaves_the_store_byte_identical(
    broker: Broker, command: Command, error: type[ChasquiError]
) -> None:
    broker.queue()
    broker.queue("full", max_length=1)
    broker.topic()
    broker.publish("full")
    broker.ok(Subscribe(BOB, T, "news"))
    for _ in range(3):
        broker.one(Publish(ALICE, Q, "jobs", b"q", "p", broker.now_ms))
        broker.publish("news", kind=T)
        broker.advance(1)
    broker.consume(count=2)
    broker.consume("news", kind=T)
    before = broker.store.items()
    result = broker.one(command)
    assert type(result) is error, result
    assert broker.store.items() == before


def test_batch_results_come_back_in_order_and_one_refusal_does_not_stop_the_rest(
    broker: Broker,
) -> None:
    broker.queue()
    results = broker.run(
        Publish(ALICE, Q, "jobs", b"1", "", 0),
        Publish(ALICE, Q, "missing", b"2", "", 0),
        Publish(ALICE, Q, "jobs", b"3", "", 0),
    )
    assert results[0] == Receipt(Q, "jobs", 0, False)
    assert results[1] == NotFound('queue "missing" does not exist')
    assert results[2] == Receipt(Q, "jobs", 1, False)
