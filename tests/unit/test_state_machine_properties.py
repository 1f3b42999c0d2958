"""Property tests of the state machine, with hypothesis generating command histories.

They prove three things over random, mostly valid and partly invalid histories drawn from a
small alphabet (three users plus an unknown key, two names, small numbers, a clock that jumps
forwards and sometimes backwards):

1. Determinism: two replicas fed the same entries return the same results and end with
   byte-identical stores.
2. Snapshots: applying a prefix, copying the store (a snapshot) and applying the rest to the copy
   with a fresh `StateMachine` (a restarted node) gives the same results and state as never
   having snapshotted.
3. No loss, no duplication: on a queue that never drops messages, every message published and
   not acked is still there, and draining the queue at the end (acking everything) returns each
   of them exactly once.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chasqui_node import limits
from chasqui_node.commands import (
    Ack,
    AckBatch,
    Command,
    Consume,
    CreateQueue,
    CreateTopic,
    CreateUser,
    DeleteQueue,
    DeleteTopic,
    Deliveries,
    Done,
    Entry,
    Extend,
    Kind,
    Nack,
    Overflow,
    Publish,
    PublishBatch,
    Receipt,
    Result,
    StartPosition,
    Subscribe,
    Unsubscribe,
)
from chasqui_node.errors import ChasquiError, Unauthenticated
from chasqui_node.state import MemoryStore, StateMachine

USERS = ["a" * 64, "b" * 64, "c" * 64]
KEYS = st.sampled_from([*USERS, *USERS, *USERS, "unknown"])
NAMES = st.sampled_from(["a", "b"])
KINDS = st.sampled_from([Kind.QUEUE, Kind.TOPIC])
SMALL = st.integers(min_value=0, max_value=4)
# Users, and queues and topics for both names, so that most random commands find something.
SETUP = Entry(
    0,
    (
        CreateUser(USERS[0]),
        CreateUser(USERS[1]),
        CreateUser(USERS[2], admin=True),
        CreateQueue(USERS[0], "a", visibility_timeout_ms=100, message_ttl_ms=3000),
        CreateQueue(USERS[1], "b", max_deliveries=2, dead_letter_queue="a", max_length=3),
        CreateTopic(USERS[0], "a"),
        CreateTopic(USERS[1], "b", retention_ms=500, retention_bytes=4),
        Subscribe(USERS[0], Kind.TOPIC, "a"),
        Subscribe(USERS[1], Kind.TOPIC, "a", StartPosition.EARLIEST),
        Subscribe(USERS[1], Kind.TOPIC, "b"),
    ),
)
PROPERTY_SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

PUBLISH = st.builds(
    Publish,
    KEYS,
    KINDS,
    NAMES,
    st.binary(max_size=3),
    st.sampled_from(["", "p", "q"]),
    SMALL,
    st.sampled_from([0, 0, 200]),
)
PUBLISH_BATCH = st.builds(
    lambda key_hash, kind, name, producer_id, items: PublishBatch(
        key_hash,
        kind,
        name,
        producer_id,
        tuple(body for body, _, _ in items),
        tuple(sequence for _, sequence, _ in items),
        tuple(delay_ms for _, _, delay_ms in items),
    ),
    KEYS,
    KINDS,
    NAMES,
    st.sampled_from(["", "p", "q"]),
    st.lists(st.tuples(st.binary(max_size=3), SMALL, st.sampled_from([0, 0, 200])), max_size=4),
)
CONSUME = st.builds(
    Consume, KEYS, KINDS, NAMES, st.sampled_from([0, 1, 2, 3, 3]), st.sampled_from([0, 50, 2000])
)
ACK = st.builds(Ack, KEYS, KINDS, NAMES, SMALL, st.integers(1, 3))
ACK_BATCH = st.builds(
    lambda key, kind, name, items: AckBatch(
        key, kind, name, tuple(s for s, _ in items), tuple(c for _, c in items)
    ),
    KEYS,
    KINDS,
    NAMES,
    st.lists(st.tuples(SMALL, st.integers(1, 3)), max_size=4),
)
OTHER_COMMANDS: st.SearchStrategy[Command] = st.one_of(
    st.builds(CreateUser, st.sampled_from(["new-1", "new-2", USERS[0]]), st.booleans()),
    st.builds(
        CreateTopic,
        KEYS,
        NAMES,
        st.booleans(),
        st.sampled_from([0, 500, 5000]),
        st.sampled_from([0, 3, 100]),
    ),
    st.builds(DeleteTopic, KEYS, NAMES),
    st.builds(
        CreateQueue,
        KEYS,
        NAMES,
        st.booleans(),
        st.sampled_from([0, 100, 1000]),
        st.sampled_from([0, 1, 2]),
        st.sampled_from(["", "a", "b"]),
        st.sampled_from([0, 1, 3]),
        st.sampled_from(list(Overflow)),
        st.sampled_from([0, 500, 3000]),
    ),
    st.builds(DeleteQueue, KEYS, NAMES),
    st.builds(Subscribe, KEYS, KINDS, NAMES, st.sampled_from(list(StartPosition)), SMALL),
    st.builds(Unsubscribe, KEYS, KINDS, NAMES),
    st.builds(Nack, KEYS, KINDS, NAMES, SMALL, SMALL, st.sampled_from([0, 100])),
    st.builds(Extend, KEYS, KINDS, NAMES, SMALL, SMALL, st.sampled_from([0, 100, 5000])),
)
# Weighted so that histories mostly move messages: hypothesis picks one_of branches about
# evenly, so the choice of branch is drawn first.
_WEIGHTED = (
    [PUBLISH] * 4 + [PUBLISH_BATCH] * 2 + [CONSUME] * 3 + [ACK, ACK_BATCH] + [OTHER_COMMANDS] * 3
)
COMMANDS: st.SearchStrategy[Command] = st.integers(0, len(_WEIGHTED) - 1).flatmap(
    lambda index: _WEIGHTED[index]
)


@st.composite
def histories(draw: st.DrawFn) -> list[Entry]:
    """Entries whose clock mostly moves forward, sometimes jumps far, sometimes goes back."""
    now_ms = 1000
    entries = []
    for _ in range(draw(st.integers(1, 15))):
        now_ms = max(0, now_ms + draw(st.sampled_from([-300, 0, 10, 60, 400, 2500, 40_000])))
        commands = draw(st.lists(COMMANDS, min_size=0, max_size=6))
        entries.append(Entry(now_ms, tuple(commands)))
    return entries


def apply_all(machine: StateMachine, store: MemoryStore, entries: list[Entry]) -> list[Result]:
    results: list[Result] = []
    for entry in entries:
        results.extend(machine.apply_entry(store, entry))
    return results


def fresh() -> tuple[StateMachine, MemoryStore]:
    machine, store = StateMachine(), MemoryStore()
    machine.apply_entry(store, SETUP)
    return machine, store


@PROPERTY_SETTINGS
@given(histories())
def test_two_replicas_fed_the_same_entries_agree(entries: list[Entry]) -> None:
    machine_one, store_one = fresh()
    machine_two, store_two = fresh()
    assert apply_all(machine_one, store_one, entries) == apply_all(machine_two, store_two, entries)
    assert store_one.items() == store_two.items()
    for key_hash in USERS:
        for owned_only in (False, True):
            assert machine_one.list_queues(store_one, key_hash, owned_only) == (
                machine_two.list_queues(store_two, key_hash, owned_only)
            )
            assert machine_one.list_topics(store_one, key_hash, owned_only) == (
                machine_two.list_topics(store_two, key_hash, owned_only)
            )


@PROPERTY_SETTINGS
@given(histories(), st.data())
def test_snapshot_then_restore_then_continue_equals_never_snapshotting(
    entries: list[Entry], data: st.DataObject
) -> None:
    split = data.draw(st.integers(0, len(entries)))
    machine, store = fresh()
    expected = apply_all(machine, store, entries)

    machine, original = fresh()
    results = apply_all(machine, original, entries[:split])
    snapshot = original.copy()
    results += apply_all(StateMachine(), snapshot, entries[split:])
    assert results == expected
    assert snapshot.items() == store.items()


@PROPERTY_SETTINGS
@given(histories(), ACK_BATCH)
def test_an_ack_batch_is_its_acks_one_by_one(entries: list[Entry], batch: AckBatch) -> None:
    """Same store after it; its result is the first refusal among the single acks, or Done.

    Housekeeping (purging deleted queues' records, expired dedup records) runs before every
    command, so one batch and its acks one by one do different amounts of it: the history's
    housekeeping is finished first, with commands that change nothing themselves."""
    machine, batched = fresh()
    apply_all(machine, batched, entries)
    idle = Entry(50_000, (Consume(USERS[0], Kind.QUEUE, "zz", 1, 0),) * 10)  # no such queue
    for _ in range(100):
        before = batched.items()
        machine.apply_entry(batched, idle)
        if batched.items() == before:
            break
    else:
        raise AssertionError("housekeeping never finished")
    one_by_one = batched.copy()
    (result,) = machine.apply_entry(batched, Entry(50_000, (batch,)))
    singles = [
        Ack(batch.key_hash, batch.kind, batch.name, sequence, count)
        for sequence, count in zip(batch.sequences, batch.delivery_counts, strict=True)
    ]
    results = machine.apply_entry(one_by_one, Entry(50_000, tuple(singles)))
    refusals = [r for r in results if isinstance(r, ChasquiError)]
    if batch.key_hash not in USERS:  # refused before any item, even in an empty batch
        assert isinstance(result, Unauthenticated)
    else:
        assert result == (refusals[0] if refusals else Done())
    assert batched.items() == one_by_one.items()


# Queue-only operations for the no-loss property: (kind of step, small numbers).
QUEUE_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.sampled_from(["", "p"]), SMALL, st.sampled_from([0, 300])),
        st.tuples(st.just("consume"), st.integers(1, 3), st.sampled_from([0, 100]), st.just(0)),
        st.tuples(st.just("ack"), st.integers(0, 20), st.just(0), st.just(0)),
        st.tuples(st.just("nack"), st.integers(0, 20), st.sampled_from([0, 200]), st.just(0)),
        st.tuples(st.just("extend"), st.integers(0, 20), st.sampled_from([50, 1000]), st.just(0)),
        st.tuples(st.just("wait"), st.sampled_from([0, 50, 150, 1000]), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@PROPERTY_SETTINGS
@given(QUEUE_STEPS)
def test_every_unacked_message_is_drained_exactly_once(
    steps: list[tuple[str, object, int, int]],
) -> None:
    machine, store = fresh()
    consumer = USERS[1]
    now_ms = 1000

    def run(command: Command) -> Result:
        [result] = machine.apply_entry(store, Entry(now_ms, (command,)))
        return result

    assert not isinstance(run(CreateQueue(USERS[0], "q", visibility_timeout_ms=100)), Exception)
    published: set[int] = set()
    acked: set[int] = set()
    seen: list[tuple[int, int]] = []  # (sequence, delivery_count) of every delivery handed out
    for step, first, second, third in steps:
        if step == "publish":
            assert isinstance(first, str)
            receipt = run(Publish(USERS[0], Kind.QUEUE, "q", b"x", first, second, third))
            assert isinstance(receipt, Receipt)
            if receipt.duplicate:
                assert receipt.sequence in published
            else:
                assert receipt.sequence not in published
                published.add(receipt.sequence)
        elif step == "consume":
            assert isinstance(first, int)
            result = run(Consume(consumer, Kind.QUEUE, "q", first, second))
            assert isinstance(result, Deliveries)
            for delivery in result.deliveries:
                assert delivery.sequence in published and delivery.sequence not in acked
                seen.append((delivery.sequence, delivery.delivery_count))
        elif step == "wait":
            assert isinstance(first, int)
            now_ms += first
        elif seen:
            assert isinstance(first, int)
            sequence, count = seen[first % len(seen)]
            if step == "ack":
                if run(Ack(consumer, Kind.QUEUE, "q", sequence, count)) == Done():
                    acked.add(sequence)
            elif step == "nack":
                run(Nack(consumer, Kind.QUEUE, "q", sequence, count, second))
            else:
                run(Extend(consumer, Kind.QUEUE, "q", sequence, count, second))

    [info] = [q for q in machine.list_queues(store, consumer, owned_only=False) if q.name == "q"]
    assert info.depth == len(published - acked)

    now_ms += limits.VISIBILITY_TIMEOUT_MS_MAX + limits.DELAY_MS_MAX + 1
    drained: list[int] = []
    while True:
        result = run(Consume(consumer, Kind.QUEUE, "q", limits.CONSUME_MESSAGES_MAX))
        assert isinstance(result, Deliveries)
        if not result.deliveries:
            break
        for delivery in result.deliveries:
            drained.append(delivery.sequence)
            ack = Ack(consumer, Kind.QUEUE, "q", delivery.sequence, delivery.delivery_count)
            assert run(ack) == Done()
    assert sorted(drained) == sorted(published - acked)
    assert [key for key, _ in store.items() if key[:1] in (b"Q", b"V")] == []
