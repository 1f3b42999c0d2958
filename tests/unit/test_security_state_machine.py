"""Security decisions of the state machine: admins, revoked keys, access lists, per-user limits.

Every test drives a `StateMachine` over a `MemoryStore` through `apply_entry`, as the node does.
A refusal is checked by error type and full message (UNAUTHENTICATED vs PERMISSION_DENIED is
decided by the type), and a refused command must leave the store byte-identical. Per-user limits
are lowered with monkeypatch (the state machine reads `limits.NAME` at call time) and checked
just under, exactly at and just over. New commands survive the log encoding unchanged.
"""

from __future__ import annotations

from typing import Any

import pytest

from chasqui_node import limits
from chasqui_node.commands import (
    RULES_ORIGINAL,
    Ack,
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
    Done,
    EnsureAdmin,
    Entry,
    Extend,
    Kind,
    Nack,
    Publish,
    Receipt,
    Result,
    RevokeUser,
    SetAccess,
    Subscribe,
    Subscribed,
    UserCreated,
    UserInfo,
    UserSummary,
)
from chasqui_node.entries import (
    decode_entry,
    encode_entry,
)
from chasqui_node.errors import (
    ChasquiError,
    FailedPrecondition,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from chasqui_node.state import MemoryStore, StateMachine

ALICE = "a" * 64  # u1, owns what the tests create
BOB = "b" * 64  # u2
ADMIN = "c" * 64  # u3, admin
CAROL = "e" * 64  # u4
STRANGER = "d" * 64  # never registered
Q = Kind.QUEUE
T = Kind.TOPIC


class Broker:
    def __init__(self) -> None:
        self.machine = StateMachine()
        self.store = MemoryStore()
        self.now_ms = 1_000_000
        created = self.run(
            CreateUser(ALICE), CreateUser(BOB), CreateUser(ADMIN, admin=True), CreateUser(CAROL)
        )
        assert created == [UserCreated(f"u{n}") for n in (1, 2, 3, 4)]

    def run(self, *commands: Command) -> list[Result]:
        return self.machine.apply_entry(self.store, Entry(self.now_ms, commands))

    def one(self, command: Command) -> Result:
        [result] = self.run(command)
        return result

    def ok(self, command: Command) -> Result:
        result = self.one(command)
        assert not isinstance(result, ChasquiError), result
        return result

    def refused(self, command: Command, error: type[ChasquiError], message: str) -> None:
        self.run()
        before = self.store.items()
        result = self.one(command)
        assert type(result) is error, result
        assert result.message == message
        assert self.store.items() == before

    def restricted(self, kind: Kind = Q, name: str = "jobs") -> None:
        """ALICE owns `name`; only BOB may publish, only CAROL may consume."""
        create = CreateQueue(ALICE, name) if kind is Q else CreateTopic(ALICE, name)
        assert self.one(create) == Created(kind, name, True)
        assert self.one(SetAccess(ALICE, kind, name, ("u2",), ("u4",))) == Done()


@pytest.fixture
def broker() -> Broker:
    return Broker()


# -- admins and keys --------------------------------------------------------------------------


def test_ensure_admin_creates_the_admin_once(broker: Broker) -> None:
    boot = "f" * 64
    assert broker.one(EnsureAdmin(boot)) == UserCreated("u5")
    assert broker.one(EnsureAdmin(boot)) == UserCreated("u5")  # every new leader repeats it
    assert broker.machine.authenticate(broker.store, boot) == UserInfo("u5", admin=True)


def test_ensure_admin_promotes_an_existing_user(broker: Broker) -> None:
    assert broker.one(EnsureAdmin(BOB)) == UserCreated("u2")
    assert broker.machine.authenticate(broker.store, BOB).admin


def test_ensure_admin_does_not_bring_back_a_revoked_key(broker: Broker) -> None:
    boot = "f" * 64
    broker.ok(EnsureAdmin(boot))
    broker.ok(RevokeUser(ADMIN, "u5"))
    broker.refused(
        EnsureAdmin(boot),
        FailedPrecondition,
        "the configured admin key (user u5) has been revoked; configure a new admin key",
    )


def test_revoked_key_is_unauthenticated_everywhere(broker: Broker) -> None:
    broker.ok(CreateQueue(BOB, "bobs"))
    assert broker.one(RevokeUser(ADMIN, "u2")) == Done()
    message = "the key of user u2 has been revoked"
    broker.refused(CreateQueue(BOB, "more"), Unauthenticated, message)
    broker.refused(Publish(BOB, Q, "bobs", b"x", "", 0), Unauthenticated, message)
    with pytest.raises(Unauthenticated, match="revoked"):
        broker.machine.list_queues(broker.store, BOB, owned_only=False)
    # The revoked user's queue stays, still owned by its id; only an admin can remove it.
    [queue] = broker.machine.list_queues(broker.store, ALICE, owned_only=False)
    assert (queue.name, queue.owner) == ("bobs", "u2")
    broker.refused(
        DeleteQueue(ALICE, "bobs"),
        PermissionDenied,
        'queue "bobs" belongs to u2; only its owner or an admin may delete it',
    )
    assert broker.one(DeleteQueue(ADMIN, "bobs")) == Deleted(Q, "bobs")


def test_revoke_is_idempotent_and_listed(broker: Broker) -> None:
    broker.ok(RevokeUser(ADMIN, "u2"))
    assert broker.one(RevokeUser(ADMIN, "u2")) == Done()
    users = broker.machine.list_users(broker.store, ADMIN)
    assert [(u.user_id, u.admin, u.revoked) for u in users] == [
        ("u1", False, False),
        ("u2", False, True),
        ("u3", True, False),
        ("u4", False, False),
    ]


def test_only_admins_revoke(broker: Broker) -> None:
    broker.refused(
        RevokeUser(ALICE, "u2"),
        PermissionDenied,
        "user u1 is not an admin; only an admin may revoke keys",
    )
    broker.refused(RevokeUser(STRANGER, "u2"), Unauthenticated, "unknown key")


def test_revoke_of_unknown_user_or_self_is_refused(broker: Broker) -> None:
    broker.refused(RevokeUser(ADMIN, "u99"), NotFound, "user 'u99' does not exist")
    broker.refused(RevokeUser(ADMIN, "u01"), NotFound, "user 'u01' does not exist")
    broker.refused(
        RevokeUser(ADMIN, "u3"),
        FailedPrecondition,
        "user u3 cannot revoke its own key; ask another admin",
    )


def test_revoke_finds_users_created_before_the_index(broker: Broker) -> None:
    broker.store.delete(b"i:u2")  # as a store written before the user-id index existed
    broker.ok(RevokeUser(ADMIN, "u2"))
    with pytest.raises(Unauthenticated):
        broker.machine.authenticate(broker.store, BOB)


def test_list_users_is_for_admins_only(broker: Broker) -> None:
    with pytest.raises(PermissionDenied, match="user u1 is not an admin"):
        broker.machine.list_users(broker.store, ALICE)
    with pytest.raises(Unauthenticated):
        broker.machine.list_users(broker.store, STRANGER)


def test_list_users_counts_what_each_owns(broker: Broker) -> None:
    broker.ok(CreateQueue(ALICE, "a1"))
    broker.ok(CreateQueue(ALICE, "a2"))
    broker.ok(CreateTopic(ALICE, "t1"))
    users = broker.machine.list_users(broker.store, ADMIN)
    assert users[0] == UserSummary("u1", False, False, topics_owned=1, queues_owned=2)


def test_only_an_admin_creates_users_as_admin(broker: Broker) -> None:
    broker.refused(
        CreateUserAsAdmin(ALICE, "9" * 64),
        PermissionDenied,
        "user u1 is not an admin; only an admin may create users on this cluster",
    )
    broker.refused(
        CreateUserAsAdmin(ALICE, "9" * 64, admin=True),
        PermissionDenied,
        "user u1 is not an admin; only an admin may create admin users",
    )
    assert broker.one(CreateUserAsAdmin(ADMIN, "9" * 64, admin=True)) == UserCreated("u5")
    assert broker.machine.authenticate(broker.store, "9" * 64).admin


# -- access lists -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [Q, T])
def test_only_owner_or_admin_sets_access(broker: Broker, kind: Kind) -> None:
    broker.restricted(kind)
    broker.refused(
        SetAccess(BOB, kind, "jobs", (), ()),
        PermissionDenied,
        f'{kind.value} "jobs" belongs to u1; only its owner or an admin may change its '
        "access lists",
    )
    assert broker.one(SetAccess(ADMIN, kind, "jobs", (), ())) == Done()


def test_publisher_not_on_the_list_is_denied(broker: Broker) -> None:
    broker.restricted()
    broker.refused(
        Publish(CAROL, Q, "jobs", b"x", "", 0),
        PermissionDenied,
        'user u4 may not publish to queue "jobs": not on its publishers list (owner u1)',
    )
    assert isinstance(broker.one(Publish(BOB, Q, "jobs", b"x", "", 0)), Receipt)
    assert isinstance(broker.one(Publish(ALICE, Q, "jobs", b"x", "", 0)), Receipt)  # owner
    assert isinstance(broker.one(Publish(ADMIN, Q, "jobs", b"x", "", 0)), Receipt)  # admin


def test_consumer_not_on_the_list_is_denied_every_consuming_call(broker: Broker) -> None:
    broker.restricted()
    broker.ok(Publish(BOB, Q, "jobs", b"x", "", 0))
    denied = 'user u2 may not {} queue "jobs": not on its consumers list (owner u1)'
    broker.refused(Consume(BOB, Q, "jobs"), PermissionDenied, denied.format("consume from"))
    broker.refused(Subscribe(BOB, Q, "jobs"), PermissionDenied, denied.format("subscribe to"))
    delivery = broker.one(Consume(CAROL, Q, "jobs"))
    assert isinstance(delivery, Deliveries) and len(delivery.deliveries) == 1
    # Ack, nack and extend by someone not on the list are consuming too.
    for command in (
        Ack(BOB, Q, "jobs", 0, 1),
        Nack(BOB, Q, "jobs", 0, 1),
        Extend(BOB, Q, "jobs", 0, 1, 1000),
    ):
        broker.refused(command, PermissionDenied, denied.format("consume from"))
    assert broker.one(Extend(CAROL, Q, "jobs", 0, 1, 1000)) == Done()
    assert broker.one(Ack(CAROL, Q, "jobs", 0, 1)) == Done()


def test_topic_consumer_list_covers_subscribe_consume_and_ack(broker: Broker) -> None:
    broker.ok(CreateTopic(ALICE, "news"))
    assert isinstance(broker.one(Subscribe(BOB, T, "news")), Subscribed)
    broker.ok(Publish(ALICE, T, "news", b"x", "", 0))
    delivered = broker.one(Consume(BOB, T, "news"))
    assert isinstance(delivered, Deliveries) and len(delivered.deliveries) == 1
    # BOB subscribed while the topic was open; once the owner restricts it, he is out.
    broker.ok(SetAccess(ALICE, T, "news", (), ("u4",)))
    denied = 'user u2 may not consume from topic "news": not on its consumers list (owner u1)'
    broker.refused(Ack(BOB, T, "news", 0, 1), PermissionDenied, denied)
    broker.refused(Consume(BOB, T, "news"), PermissionDenied, denied)
    broker.refused(
        Subscribe(BOB, T, "news"),
        PermissionDenied,
        'user u2 may not subscribe to topic "news": not on its consumers list (owner u1)',
    )
    assert isinstance(broker.one(Subscribe(CAROL, T, "news")), Subscribed)


def test_empty_lists_let_everyone_in_again(broker: Broker) -> None:
    broker.restricted()
    broker.ok(SetAccess(ALICE, Q, "jobs", (), ()))
    assert isinstance(broker.one(Publish(CAROL, Q, "jobs", b"x", "", 0)), Receipt)
    assert isinstance(broker.one(Consume(BOB, Q, "jobs")), Deliveries)


def test_access_lists_are_shown_to_owner_and_admins_only(broker: Broker) -> None:
    broker.ok(CreateQueue(ALICE, "jobs"))
    broker.ok(SetAccess(ALICE, Q, "jobs", ("u4", "u2", "u2"), ("u2",)))
    for key_hash in (ALICE, ADMIN):
        [queue] = broker.machine.list_queues(broker.store, key_hash, owned_only=False)
        assert (queue.publishers, queue.consumers) == (("u2", "u4"), ("u2",))
    [queue] = broker.machine.list_queues(broker.store, BOB, owned_only=False)
    assert (queue.publishers, queue.consumers) == ((), ())
    broker.ok(CreateTopic(ALICE, "news"))
    broker.ok(SetAccess(ALICE, T, "news", ("u2",), ()))
    [topic] = broker.machine.list_topics(broker.store, ALICE, owned_only=False)
    assert (topic.publishers, topic.consumers) == (("u2",), ())
    [topic] = broker.machine.list_topics(broker.store, CAROL, owned_only=False)
    assert topic.publishers == ()


def test_access_list_names_existing_users_only(broker: Broker) -> None:
    broker.ok(CreateQueue(ALICE, "jobs"))
    broker.refused(
        SetAccess(ALICE, Q, "jobs", ("u2", "u9"), ()), NotFound, "user 'u9' does not exist"
    )
    broker.refused(SetAccess(ALICE, Q, "gone", (), ()), NotFound, 'queue "gone" does not exist')


def test_access_list_length_under_at_and_over_the_limit(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "ACCESS_LIST_USERS_MAX", 3)
    broker.ok(CreateQueue(ALICE, "jobs"))
    assert broker.one(SetAccess(ALICE, Q, "jobs", ("u1", "u2"), ())) == Done()
    assert broker.one(SetAccess(ALICE, Q, "jobs", ("u1", "u2", "u3"), ())) == Done()
    broker.refused(
        SetAccess(ALICE, Q, "jobs", (), ("u1", "u2", "u3", "u4")),
        LimitExceeded,
        "consumers of 4 exceeds access_list_users_max 3",
    )


def test_delete_and_recreate_forgets_the_access_lists(broker: Broker) -> None:
    broker.restricted()
    broker.ok(DeleteQueue(ALICE, "jobs"))
    broker.ok(CreateQueue(ALICE, "jobs"))
    assert isinstance(broker.one(Publish(CAROL, Q, "jobs", b"x", "", 0)), Receipt)


# -- per-user limits --------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "limit_name"), [(Q, "USER_QUEUES_MAX"), (T, "USER_TOPICS_MAX")])
def test_owned_count_under_at_and_over_the_limit(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, kind: Kind, limit_name: str
) -> None:
    monkeypatch.setattr(limits, limit_name, 3)

    def create(key_hash: str, name: str) -> Command:
        return CreateQueue(key_hash, name) if kind is Q else CreateTopic(key_hash, name)

    def delete(key_hash: str, name: str) -> Command:
        return DeleteQueue(key_hash, name) if kind is Q else DeleteTopic(key_hash, name)

    assert broker.one(create(ALICE, "n1")) == Created(kind, "n1", True)
    assert broker.one(create(ALICE, "n2")) == Created(kind, "n2", True)  # just under: 2 of 3
    assert broker.one(create(ALICE, "n3")) == Created(kind, "n3", True)  # reaches the limit
    broker.refused(
        create(ALICE, "n4"),
        ResourceExhausted,
        f"user u1 owns 3 {kind.value}s, at {limit_name.lower()} 3; delete one before "
        "creating another",
    )
    assert broker.one(create(BOB, "b1")) == Created(kind, "b1", True)  # the limit is per user
    assert broker.one(create(ADMIN, "x1")) == Created(kind, "x1", True)
    broker.ok(delete(ALICE, "n1"))
    assert broker.one(create(ALICE, "n4")) == Created(kind, "n4", True)
    # An admin deleting the user's queue or topic gives the owner its room back.
    broker.ok(delete(ADMIN, "n2"))
    assert broker.one(create(ALICE, "n5")) == Created(kind, "n5", True)


def test_admins_are_exempt_from_owned_limits(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "USER_QUEUES_MAX", 1)
    for index in range(3):
        broker.ok(CreateQueue(ADMIN, f"q{index}"))


# -- encoding ---------------------------------------------------------------------------------


def test_new_commands_survive_the_log_encoding() -> None:
    commands: tuple[Command, ...] = (
        EnsureAdmin("f" * 64),
        CreateUserAsAdmin(ADMIN, "9" * 64, admin=True),
        RevokeUser(ADMIN, "u2"),
        SetAccess(ALICE, Q, "jobs", ("u2", "u3", "u4"), ()),
        SetAccess(ALICE, T, "news", (), ("u2",)),
    )
    entry = Entry(5, commands)
    assert decode_entry(encode_entry(entry)) == entry


def test_replicas_agree_on_security_commands() -> None:
    first, second = Broker(), Broker()
    script: list[Command] = [
        CreateQueue(ALICE, "jobs"),
        SetAccess(ALICE, Q, "jobs", ("u2",), ("u4",)),
        Publish(CAROL, Q, "jobs", b"x", "", 0),
        Publish(BOB, Q, "jobs", b"y", "", 0),
        RevokeUser(ADMIN, "u2"),
        Publish(BOB, Q, "jobs", b"z", "", 0),
        EnsureAdmin("f" * 64),
    ]
    for broker in (first, second):
        for command in script:
            broker.one(decode_entry(encode_entry(Entry(broker.now_ms, (command,)))).commands[0])
    assert first.store.items() == second.store.items()


# -- dead-letter queues -----------------------------------------------------------------------


def _expiring_queue(broker: Broker, owner: str, name: str, dead_letter_queue: str) -> None:
    """A queue whose messages expire after 1 ms into `dead_letter_queue`."""
    created = broker.one(
        CreateQueue(owner, name, message_ttl_ms=1, dead_letter_queue=dead_letter_queue)
    )
    assert created == Created(Q, name, True)


def _expire_into_dead_letters(broker: Broker, owner: str, name: str) -> None:
    """Publish one message to `name`, let it expire, and consume so the expiry is applied."""
    assert isinstance(broker.one(Publish(owner, Q, name, b"dead letter", "", 0)), Receipt)
    broker.now_ms += 10
    assert broker.one(Consume(owner, Q, name, 10)) == Deliveries(())


def _depth(broker: Broker, name: str) -> int:
    [info] = [q for q in broker.machine.list_queues(broker.store, ALICE, False) if q.name == name]
    return info.depth


def test_a_dead_letter_queue_must_take_the_creators_publishes(broker: Broker) -> None:
    broker.restricted()  # ALICE's "jobs": only BOB may publish
    broker.refused(
        CreateQueue(CAROL, "carols", dead_letter_queue="jobs"),
        PermissionDenied,
        'user u4 may not use queue "jobs" as a dead-letter queue: not on its publishers list '
        "(owner u1)",
    )
    assert broker.one(CreateQueue(BOB, "bobs", dead_letter_queue="jobs")) == Created(
        Q, "bobs", True
    )


def test_dead_letters_stop_when_the_owner_is_taken_off_the_publishers_list(
    broker: Broker,
) -> None:
    broker.restricted()  # only BOB may publish to ALICE's "jobs"
    _expiring_queue(broker, BOB, "bobs", "jobs")
    _expire_into_dead_letters(broker, BOB, "bobs")
    assert _depth(broker, "jobs") == 1  # allowed: moved
    assert broker.one(SetAccess(ALICE, Q, "jobs", ("u4",), ())) == Done()
    _expire_into_dead_letters(broker, BOB, "bobs")
    assert _depth(broker, "jobs") == 1  # no longer allowed: dropped, not moved
    assert _depth(broker, "bobs") == 0


def test_a_re_created_dead_letter_queue_does_not_get_the_old_ones_letters(
    broker: Broker,
) -> None:
    assert broker.one(CreateQueue(ALICE, "dead")) == Created(Q, "dead", True)
    _expiring_queue(broker, ALICE, "work", "dead")
    assert broker.one(DeleteQueue(ALICE, "dead")) == Deleted(Q, "dead")
    assert broker.one(CreateQueue(BOB, "dead")) == Created(Q, "dead", True)  # someone else's
    _expire_into_dead_letters(broker, ALICE, "work")
    assert _depth(broker, "dead") == 0
    assert broker.ok(Consume(BOB, Q, "dead", 10)) == Deliveries(())


def test_own_dead_letter_queues_still_receive(broker: Broker) -> None:
    assert broker.one(CreateQueue(ALICE, "dead")) == Created(Q, "dead", True)
    assert broker.one(SetAccess(ALICE, Q, "dead", ("u2",), ())) == Done()  # owner is exempt
    _expiring_queue(broker, ALICE, "work", "dead")
    _expire_into_dead_letters(broker, ALICE, "work")
    delivered = broker.ok(Consume(ALICE, Q, "dead", 10))
    assert isinstance(delivered, Deliveries)
    assert [delivery.body for delivery in delivered.deliveries] == [b"dead letter"]


def test_entries_of_the_original_rules_still_move_dead_letters_unchecked(
    broker: Broker,
) -> None:
    """A follower upgraded before its leader applies the old leader's entries as the old
    nodes do, so the replicas stay identical during a rolling upgrade."""
    assert broker.one(CreateQueue(ALICE, "dead")) == Created(Q, "dead", True)
    _expiring_queue(broker, ALICE, "work", "dead")
    assert broker.one(DeleteQueue(ALICE, "dead")) == Deleted(Q, "dead")
    assert broker.one(CreateQueue(BOB, "dead")) == Created(Q, "dead", True)
    assert isinstance(broker.one(Publish(ALICE, Q, "work", b"old rules", "", 0)), Receipt)
    broker.now_ms += 10
    old_rules = Entry(broker.now_ms, (Consume(ALICE, Q, "work", 10),), rules=RULES_ORIGINAL)
    assert broker.machine.apply_entry(broker.store, old_rules) == [Deliveries(())]
    assert _depth(broker, "dead") == 1


# -- leases belong to their consumer ----------------------------------------------------------


def _leased_to_bob(broker: Broker) -> tuple[int, int]:
    """An open queue of ALICE's with one message BOB consumed: (sequence, delivery_count)."""
    assert broker.one(CreateQueue(ALICE, "open")) == Created(Q, "open", True)
    assert isinstance(broker.one(Publish(ALICE, Q, "open", b"x", "", 0)), Receipt)
    delivered = broker.ok(Consume(BOB, Q, "open", 1))
    assert isinstance(delivered, Deliveries)
    [delivery] = delivered.deliveries
    return delivery.sequence, delivery.delivery_count


@pytest.mark.parametrize(
    "settle",
    [
        lambda sequence, count: Ack(CAROL, Q, "open", sequence, count),
        lambda sequence, count: Nack(CAROL, Q, "open", sequence, count, 0),
        lambda sequence, count: Extend(CAROL, Q, "open", sequence, count, 60_000),
    ],
    ids=["ack", "nack", "extend"],
)
def test_another_user_cannot_settle_a_lease(broker: Broker, settle: Any) -> None:
    sequence, count = _leased_to_bob(broker)
    broker.refused(
        settle(sequence, count),
        PermissionDenied,
        f'delivery {count} of message {sequence} on queue "open" is leased to another user, '
        "not to user u4; only the consumer that received it may ack, nack or extend it",
    )
    assert broker.one(Extend(BOB, Q, "open", sequence, count, 60_000)) == Done()
    assert broker.one(Ack(BOB, Q, "open", sequence, count)) == Done()


def test_the_lessee_survives_an_extend_and_an_admin_may_settle(broker: Broker) -> None:
    sequence, count = _leased_to_bob(broker)
    assert broker.one(Extend(BOB, Q, "open", sequence, count, 60_000)) == Done()
    assert isinstance(broker.one(Ack(CAROL, Q, "open", sequence, count)), PermissionDenied)
    assert broker.one(Ack(ADMIN, Q, "open", sequence, count)) == Done()


def test_a_redelivered_message_belongs_to_its_new_consumer(broker: Broker) -> None:
    sequence, count = _leased_to_bob(broker)
    assert broker.one(Nack(BOB, Q, "open", sequence, count, 0)) == Done()
    delivered = broker.ok(Consume(CAROL, Q, "open", 1))
    assert isinstance(delivered, Deliveries)
    [again] = delivered.deliveries
    assert isinstance(broker.one(Ack(BOB, Q, "open", sequence, again.delivery_count)), ChasquiError)
    assert broker.one(Ack(CAROL, Q, "open", sequence, again.delivery_count)) == Done()


def test_a_lease_of_the_original_rules_may_be_settled_by_any_consumer(broker: Broker) -> None:
    assert broker.one(CreateQueue(ALICE, "open")) == Created(Q, "open", True)
    assert isinstance(broker.one(Publish(ALICE, Q, "open", b"x", "", 0)), Receipt)
    old_rules = Entry(broker.now_ms, (Consume(BOB, Q, "open", 1),), rules=RULES_ORIGINAL)
    [delivered] = broker.machine.apply_entry(broker.store, old_rules)
    assert isinstance(delivered, Deliveries)
    [delivery] = delivered.deliveries
    ack = Ack(CAROL, Q, "open", delivery.sequence, delivery.delivery_count)
    assert broker.one(ack) == Done()
