"""Proves that what `apply_entry` caches for the length of one entry changes nothing.

Within an entry the state machine keeps decoded users and topic/queue metadata, writes changed
metadata once after the last command, and skips housekeeping scans it knows would find nothing.
Batching commands into entries must stay invisible, so the reference is the same commands applied
one per entry at the same clock (the stored clock is then the same, and housekeeping runs before
every command either way): results and the final store must be identical. Hypothesis draws the
commands from the property tests' alphabet plus the user and access commands (whose writes the
user cache must see at once); table cases cover what random histories rarely reach: a hundred
successful acks in one entry, refusals in between, a queue deleted and re-created in one entry.

A last property runs the same histories over `LmdbStore` (a real `Storage`) and `MemoryStore`,
which must agree byte for byte.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from chasqui_node.commands import (
    Ack,
    Command,
    Consume,
    CreateQueue,
    CreateTopic,
    CreateUserAsAdmin,
    DeleteQueue,
    Deliveries,
    EnsureAdmin,
    Entry,
    Kind,
    Nack,
    Publish,
    PublishBatch,
    Result,
    RevokeUser,
    SetAccess,
    Subscribe,
)
from chasqui_node.errors import FailedPrecondition, QueueFull, Unauthenticated
from chasqui_node.state import MemoryStore, StateMachine
from chasqui_node.storage import Storage
from tests.unit.test_state_machine_properties import (
    COMMANDS,
    KEYS,
    KINDS,
    NAMES,
    PROPERTY_SETTINGS,
    SETUP,
    USERS,
    apply_all,
    fresh,
)

USER_IDS = st.sampled_from(["u1", "u2", "u3", "u9"])
USER_COMMANDS: st.SearchStrategy[Command] = st.one_of(
    st.builds(RevokeUser, KEYS, USER_IDS),
    st.builds(CreateUserAsAdmin, KEYS, st.sampled_from(["new-1", USERS[1]]), st.booleans()),
    st.builds(EnsureAdmin, KEYS),
    st.builds(
        SetAccess,
        KEYS,
        KINDS,
        NAMES,
        st.lists(USER_IDS, max_size=2).map(tuple),
        st.lists(USER_IDS, max_size=2).map(tuple),
    ),
)
ENTRY_COMMANDS = st.lists(st.one_of(COMMANDS, COMMANDS, COMMANDS, USER_COMMANDS), max_size=25)


def one_entry_equals_one_per_entry(now_ms: int, commands: list[Command]) -> list[Result]:
    """Apply `commands` after SETUP both ways; assert they agree and return the results."""
    machine, together = fresh()
    results = machine.apply_entry(together, Entry(now_ms, tuple(commands)))
    machine, apart = fresh()
    separate = apply_all(machine, apart, [Entry(now_ms, (command,)) for command in commands])
    assert results == separate
    assert together.items() == apart.items()
    return results


@PROPERTY_SETTINGS
@given(st.lists(st.tuples(st.sampled_from([0, 60, 400, 2500]), ENTRY_COMMANDS), max_size=5))
def test_commands_in_one_entry_equal_one_entry_each(
    steps: list[tuple[int, list[Command]]],
) -> None:
    machine, together = fresh()
    machine, apart = fresh()
    now_ms = 1000
    for advance_ms, commands in steps:
        now_ms += advance_ms
        results = machine.apply_entry(together, Entry(now_ms, tuple(commands)))
        # An empty entry first, so that even no commands store the same clock.
        entries = [Entry(now_ms, ()), *(Entry(now_ms, (command,)) for command in commands)]
        assert results == apply_all(machine, apart, entries)
        assert together.items() == apart.items()


def test_a_hundred_acks_with_refusals_between_equal_one_entry_each() -> None:
    owner = USERS[0]
    machine, store = fresh()
    machine.apply_entry(store, Entry(1000, (CreateQueue(owner, "orders", max_length=150),)))
    batch = PublishBatch(
        owner, Kind.QUEUE, "orders", "p", (b"body",) * 100, tuple(range(100)), (0,) * 100
    )
    [deliveries] = machine.apply_entry(
        store, Entry(1001, (batch, Consume(owner, Kind.QUEUE, "orders", 100, 60_000)))
    )[1:]
    assert isinstance(deliveries, Deliveries)
    commands: list[Command] = []
    for delivery in deliveries.deliveries:
        commands.append(Ack(owner, Kind.QUEUE, "orders", delivery.sequence, 1))
        if delivery.sequence % 10 == 0:
            commands.append(Ack(owner, Kind.QUEUE, "orders", delivery.sequence + 1, 2))
        if delivery.sequence == 50:
            # 49 stored by now: 102 more overflow max_length 150, one more fits.
            too_many = PublishBatch(
                owner, Kind.QUEUE, "orders", "", (b"x",) * 102, (0,) * 102, (0,) * 102
            )
            commands += [too_many, Publish(owner, Kind.QUEUE, "orders", b"one", "", 0)]
    reference = store.copy()

    results = machine.apply_entry(store, Entry(1002, tuple(commands)))
    separate = apply_all(
        StateMachine(), reference, [Entry(1002, (command,)) for command in commands]
    )
    assert results == separate
    assert store.items() == reference.items()
    assert sum(isinstance(result, FailedPrecondition) for result in results) == 10
    assert sum(isinstance(result, QueueFull) for result in results) == 1
    [queue] = [info for info in machine.list_queues(store, owner, True) if info.name == "orders"]
    assert queue.depth == 1  # every message acked; the single publish after the refusal kept


def test_delete_and_recreate_in_one_entry_equals_one_entry_each() -> None:
    owner, other = USERS[0], USERS[1]
    commands: list[Command] = [
        Publish(owner, Kind.QUEUE, "a", b"old", "p", 1),
        DeleteQueue(owner, "a"),
        Publish(owner, Kind.QUEUE, "a", b"gone", "p", 2),
        CreateQueue(other, "a"),
        Publish(owner, Kind.QUEUE, "a", b"new", "p", 1),
        Consume(other, Kind.QUEUE, "a", 5),
        Nack(other, Kind.QUEUE, "a", 0, 1),
        Consume(other, Kind.QUEUE, "a", 5),
        CreateTopic(owner, "c"),
        Subscribe(other, Kind.TOPIC, "c"),
        Publish(owner, Kind.TOPIC, "c", b"t", "p", 1),
        Consume(other, Kind.TOPIC, "c", 5),
        Ack(other, Kind.TOPIC, "c", 0, 1),
    ]
    results = one_entry_equals_one_per_entry(5000, commands)
    assert [delivery.body for delivery in results[-2].deliveries] == [b"t"]  # type: ignore[union-attr]


def test_a_key_revoked_earlier_in_the_entry_is_refused_later_in_it() -> None:
    admin, user = USERS[2], USERS[0]
    results = one_entry_equals_one_per_entry(
        5000,
        [
            Publish(user, Kind.QUEUE, "a", b"before", "", 0),
            RevokeUser(admin, "u1"),
            Publish(user, Kind.QUEUE, "a", b"after", "", 0),
        ],
    )
    assert isinstance(results[2], Unauthenticated)


@PROPERTY_SETTINGS
@given(st.lists(st.tuples(st.sampled_from([0, 60, 400, 2500]), ENTRY_COMMANDS), max_size=4))
def test_lmdb_and_memory_stores_agree(steps: list[tuple[int, list[Command]]]) -> None:
    entries = [SETUP]
    now_ms = 1000
    for advance_ms, commands in steps:
        now_ms += advance_ms
        entries.append(Entry(now_ms, tuple(commands)))
    memory = MemoryStore()
    expected = apply_all(StateMachine(), memory, entries)
    with tempfile.TemporaryDirectory() as directory:
        storage = Storage(Path(directory), fsync=False, map_size_bytes=64 * 1024**2)
        try:
            machine = StateMachine()
            results: list[Result] = []
            for index, entry in enumerate(entries, start=1):
                applied = storage.apply(index, partial(machine.apply_entry, entry=entry))
                assert applied is not None
                results += applied
            assert results == expected
            assert storage.dump_state() == memory.items()
        finally:
            storage.close()
