"""Proves a consume reply stays within `limits.CONSUME_BYTES_MAX`, for queues and topics, and
still hands out one message when that message alone is larger.

Each delivery counts its body, name, producer id and `DELIVERY_ENVELOPE_BYTES`. The limit is
lowered with monkeypatch (the state machine reads it at call time) so that three deliveries
are just under, exactly at or just over it; one test keeps the real limit with real sizes.
Messages left out of a reply must stay ready: not leased, and next in line.
"""

from __future__ import annotations

import pytest

from chasqui_node import limits
from chasqui_node.commands import Kind, Subscribe
from tests.unit.test_state_machine import ALICE, BOB, Broker, Q, T

BODY_BYTES = 100
NAME = "jobs"


def delivery_bytes(body_bytes: int = BODY_BYTES, producer_id: str = "") -> int:
    return body_bytes + len(NAME) + len(producer_id) + limits.DELIVERY_ENVELOPE_BYTES


@pytest.fixture
def broker() -> Broker:
    return Broker()


def fill(broker: Broker, kind: Kind, count: int, body_bytes: int = BODY_BYTES) -> None:
    if kind is Q:
        broker.queue(NAME)
    else:
        broker.topic(NAME)
        broker.ok(Subscribe(BOB, T, NAME))
    for index in range(count):
        broker.publish(NAME, bytes([65 + index]) * body_bytes, kind=kind)


@pytest.mark.parametrize("kind", [Q, T])
@pytest.mark.parametrize(("limit_offset", "delivered"), [(-1, 2), (0, 3), (1, 3)])
def test_reply_stops_before_the_message_that_would_pass_consume_bytes_max(
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
    kind: Kind,
    limit_offset: int,
    delivered: int,
) -> None:
    monkeypatch.setattr(limits, "CONSUME_BYTES_MAX", 3 * delivery_bytes() + limit_offset)
    fill(broker, kind, 5)
    first = broker.consume(NAME, 10, kind).deliveries
    assert [delivery.body[:1] for delivery in first] == [b"A", b"B", b"C"][:delivered]
    # What was left out is next in line, and delivered for the first time.
    second = broker.consume(NAME, 1, kind).deliveries
    assert [(delivery.body[:1], delivery.delivery_count) for delivery in second] == [
        (bytes([65 + delivered]), 1)
    ]


def test_messages_left_out_of_a_queue_reply_are_not_leased(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "CONSUME_BYTES_MAX", 2 * delivery_bytes())
    fill(broker, Q, 5)
    assert len(broker.consume(NAME, 10).deliveries) == 2
    [info] = broker.machine.list_queues(broker.store, ALICE, owned_only=False)
    assert (info.depth, info.in_flight) == (5, 2)


@pytest.mark.parametrize("kind", [Q, T])
def test_one_message_larger_than_the_limit_is_still_delivered_alone(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, kind: Kind
) -> None:
    monkeypatch.setattr(limits, "CONSUME_BYTES_MAX", delivery_bytes() - 1)
    fill(broker, kind, 2)
    assert [delivery.body[:1] for delivery in broker.consume(NAME, 10, kind).deliveries] == [b"A"]
    assert [delivery.body[:1] for delivery in broker.consume(NAME, 10, kind).deliveries] == [b"B"]


def test_producer_id_counts_towards_the_reply(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "CONSUME_BYTES_MAX", 2 * delivery_bytes(producer_id="p1"))
    broker.queue(NAME)
    for index in range(2):
        broker.publish(NAME, b"x" * BODY_BYTES, producer_id="p1", sequence=index)
    assert len(broker.consume(NAME, 10).deliveries) == 2
    monkeypatch.setattr(limits, "CONSUME_BYTES_MAX", 2 * delivery_bytes(producer_id="p1") - 1)
    broker.advance(limits.VISIBILITY_TIMEOUT_MS_DEFAULT)  # both leases expire
    assert len(broker.consume(NAME, 10).deliveries) == 1


@pytest.mark.parametrize("kind", [Q, T])
def test_messages_of_message_bytes_max_fill_a_reply_up_to_the_real_limit(
    broker: Broker, kind: Kind
) -> None:
    fits = limits.CONSUME_BYTES_MAX // delivery_bytes(limits.MESSAGE_BYTES_MAX)
    fill(broker, kind, fits + 1, limits.MESSAGE_BYTES_MAX)
    deliveries = broker.consume(NAME, limits.CONSUME_MESSAGES_MAX, kind).deliveries
    assert len(deliveries) == fits
    reply = sum(delivery_bytes(len(delivery.body)) for delivery in deliveries)
    assert reply <= limits.CONSUME_BYTES_MAX < limits.GRPC_MESSAGE_BYTES_MAX


def test_topic_consume_reads_past_one_page_of_messages(broker: Broker) -> None:
    fill(broker, T, 40, body_bytes=1)
    first = broker.consume(NAME, 35, T).deliveries
    assert [delivery.sequence for delivery in first] == list(range(35))
    second = broker.consume(NAME, 35, T).deliveries
    assert [delivery.sequence for delivery in second] == list(range(35, 40))
