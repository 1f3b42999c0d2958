"""Proves `PublishBatch` is all or nothing (ARCHITECTURE promise 5) and shares every rule of a
single `Publish`.

Drives the state machine over a `MemoryStore` through `apply_entry`, as the node does (the
`Broker` helper of `test_state_machine`). A refused batch must leave the store byte-identical;
an accepted one answers one receipt per item, in order, with duplicates (from earlier publishes
or from earlier items of the same batch) answered by their original receipt and taking no room.
"""

from __future__ import annotations

import pytest

from chasqui_node import limits
from chasqui_node.commands import (
    Kind,
    Overflow,
    Publish,
    PublishBatch,
    Receipt,
    Receipts,
    Result,
)
from chasqui_node.errors import (
    InvalidArgument,
    LimitExceeded,
    NotFound,
    QueueFull,
    Unauthenticated,
)
from tests.unit.test_state_machine import ALICE, STRANGER, Broker, Q, T


@pytest.fixture
def broker() -> Broker:
    return Broker()


def batch(
    bodies: list[bytes],
    sequences: list[int] | None = None,
    delays_ms: list[int] | None = None,
    name: str = "jobs",
    producer_id: str = "p1",
    kind: Kind = Q,
    key_hash: str = ALICE,
) -> PublishBatch:
    return PublishBatch(
        key_hash,
        kind,
        name,
        producer_id,
        tuple(bodies),
        tuple(range(len(bodies)) if sequences is None else sequences),
        tuple([0] * len(bodies) if delays_ms is None else delays_ms),
    )


def receipts(result: Result) -> list[tuple[int, bool]]:
    assert isinstance(result, Receipts), result
    return [(receipt.sequence, receipt.duplicate) for receipt in result.receipts]


def test_batch_is_stored_in_order_with_one_receipt_per_item(broker: Broker) -> None:
    broker.queue()
    result = broker.one(batch([b"a", b"b", b"c"]))
    assert result == Receipts(
        (Receipt(Q, "jobs", 0, False), Receipt(Q, "jobs", 1, False), Receipt(Q, "jobs", 2, False))
    )
    assert broker.bodies() == [b"a", b"b", b"c"]


def test_batch_to_a_topic_gets_consecutive_offsets(broker: Broker) -> None:
    broker.topic()
    broker.publish("news", kind=T)
    assert receipts(broker.one(batch([b"a", b"b"], name="news", kind=T))) == [
        (1, False),
        (2, False),
    ]


def test_empty_batch_still_checks_the_destination(broker: Broker) -> None:
    broker.refused(batch([]), NotFound, 'queue "jobs" does not exist')
    broker.queue()
    assert broker.one(batch([])) == Receipts(())


def test_batch_from_an_unknown_key_is_unauthenticated(broker: Broker) -> None:
    broker.queue()
    broker.refused(batch([b"a"], key_hash=STRANGER), Unauthenticated, "unknown key")


def test_batch_that_overflows_reject_publish_is_refused_whole(broker: Broker) -> None:
    broker.queue(max_length=3)
    broker.publish(body=b"old")
    broker.refused(
        batch([b"a", b"b", b"c"]),
        QueueFull,
        'queue "jobs" is full for a batch of 3 new messages (1 of queue_depth_max 3)',
    )
    assert broker.bodies() == [b"old"]


def test_batch_that_exactly_fills_the_queue_is_accepted(broker: Broker) -> None:
    broker.queue(max_length=3)
    broker.publish(body=b"old")
    assert receipts(broker.one(batch([b"a", b"b"]))) == [(1, False), (2, False)]


def test_single_publish_to_a_full_queue_keeps_its_message(broker: Broker) -> None:
    broker.queue(max_length=1)
    broker.publish()
    broker.refused(
        Publish(ALICE, Q, "jobs", b"x", "", 0),
        QueueFull,
        'queue "jobs" is full (1 of queue_depth_max 1)',
    )


def test_one_invalid_item_refuses_the_whole_batch(broker: Broker) -> None:
    broker.queue()
    too_big = b"x" * (limits.MESSAGE_BYTES_MAX + 1)
    broker.refused(
        batch([b"a", too_big]),
        LimitExceeded,
        f"message of {len(too_big)} bytes exceeds message_bytes_max {limits.MESSAGE_BYTES_MAX}",
    )
    broker.refused(
        batch([b"a", b"b"], delays_ms=[0, limits.DELAY_MS_MAX + 1]),
        LimitExceeded,
        f"delay_ms of {limits.DELAY_MS_MAX + 1} exceeds delay_ms_max {limits.DELAY_MS_MAX}",
    )
    broker.refused(
        batch([b"a", b"b"], sequences=[0, -1]),
        InvalidArgument,
        f"sequence must be between 0 and {2**63 - 1}, got -1",
    )


def test_delay_in_a_topic_batch_is_invalid(broker: Broker) -> None:
    broker.topic()
    broker.refused(
        batch([b"a", b"b"], delays_ms=[0, 5], name="news", kind=T),
        InvalidArgument,
        "delay_ms applies to queues only; topic messages are visible at once",
    )


def test_batch_with_unequal_item_lists_is_invalid(broker: Broker) -> None:
    broker.queue()
    broker.refused(
        batch([b"a", b"b"], sequences=[0]),
        InvalidArgument,
        "a publish batch needs one sequence and one delay per body: got 2 bodies, 1 sequences "
        "and 2 delays",
    )


@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_batch_message_count_under_at_over(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, extra: int
) -> None:
    monkeypatch.setattr(limits, "PUBLISH_BATCH_MESSAGES_MAX", 5)
    broker.queue()
    command = batch([b"m"] * (5 + extra))
    if extra <= 0:
        assert len(receipts(broker.one(command))) == 5 + extra
    else:
        broker.refused(
            command, LimitExceeded, "batch of 6 messages exceeds publish_batch_messages_max 5"
        )


@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_batch_bytes_under_at_over(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, extra: int
) -> None:
    monkeypatch.setattr(limits, "PUBLISH_BATCH_BYTES_MAX", 10)
    broker.queue()
    command = batch([b"12345", b"1234" + b"5" * (1 + extra)])
    if extra <= 0:
        assert len(receipts(broker.one(command))) == 2
    else:
        broker.refused(
            command, LimitExceeded, "batch of 11 bytes exceeds publish_batch_bytes_max 10"
        )


def test_retried_batch_returns_every_receipt_as_duplicate(broker: Broker) -> None:
    broker.queue()
    first = receipts(broker.one(batch([b"a", b"b", b"c"], sequences=[10, 11, 12])))
    before = broker.store.items()
    retry = receipts(broker.one(batch([b"a", b"b", b"c"], sequences=[10, 11, 12])))
    assert retry == [(sequence, True) for sequence, _ in first]
    assert broker.store.items() == before  # nothing written, not even dedup records
    assert broker.bodies() == [b"a", b"b", b"c"]


def test_duplicates_inside_a_batch_get_the_first_items_receipt(broker: Broker) -> None:
    broker.queue()
    result = broker.one(batch([b"a", b"b", b"a-again"], sequences=[7, 8, 7]))
    assert receipts(result) == [(0, False), (1, False), (0, True)]
    assert broker.bodies() == [b"a", b"b"]


def test_without_producer_id_repeated_sequences_are_not_duplicates(broker: Broker) -> None:
    broker.queue()
    result = broker.one(batch([b"a", b"b"], sequences=[1, 1], producer_id=""))
    assert receipts(result) == [(0, False), (1, False)]


def test_partly_retried_batch_needs_room_only_for_its_new_items(broker: Broker) -> None:
    broker.queue(max_length=3)
    broker.one(batch([b"a", b"b"], sequences=[1, 2]))
    # Items 1 and 2 are duplicates and take no room; only item 3 must fit, and it does.
    assert receipts(broker.one(batch([b"a", b"b", b"c"], sequences=[1, 2, 3]))) == [
        (0, True),
        (1, True),
        (2, False),
    ]
    # Now full: a batch of one duplicate and two new items is refused whole, duplicate too.
    broker.refused(
        batch([b"c", b"d", b"e"], sequences=[3, 4, 5]),
        QueueFull,
        'queue "jobs" is full for a batch of 2 new messages (3 of queue_depth_max 3)',
    )


def test_drop_head_makes_room_for_a_batch_by_dropping_the_oldest(broker: Broker) -> None:
    broker.queue(max_length=3, overflow=Overflow.DROP_HEAD)
    broker.one(batch([b"old1", b"old2", b"old3"], sequences=[1, 2, 3]))
    assert receipts(broker.one(batch([b"new1", b"new2"], sequences=[4, 5]))) == [
        (3, False),
        (4, False),
    ]
    assert broker.bodies() == [b"old3", b"new1", b"new2"]


def test_drop_head_batch_longer_than_the_queue_keeps_its_newest(broker: Broker) -> None:
    broker.queue(max_length=2, overflow=Overflow.DROP_HEAD)
    broker.publish(body=b"old")
    result = broker.one(batch([b"a", b"b", b"c"]))
    assert receipts(result) == [(1, False), (2, False), (3, False)]
    assert broker.bodies() == [b"b", b"c"]


def test_single_publish_and_batch_of_one_change_the_store_alike(broker: Broker) -> None:
    other = Broker()
    broker.queue()
    other.queue()
    single = broker.one(Publish(ALICE, Q, "jobs", b"x", "p1", 5, 100))
    batched = other.one(batch([b"x"], sequences=[5], delays_ms=[100]))
    assert single == Receipt(Q, "jobs", 0, False)
    assert batched == Receipts((Receipt(Q, "jobs", 0, False),))
    assert broker.store.items() == other.store.items()
