"""Consume long-polls: it waits for a message, wakes as soon as one is published, and ends
empty-handed and without error when its wait runs out.

Timing bounds are generous (a wake must come well before the timeout, not within a tight
window) so the tests hold on a loaded machine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from chasqui_proto import chasqui_pb2 as pb
from tests.harness import wait_until
from tests.service.conftest import Broker
from tests.service.support import Metadata, consume, create_queue, create_topic, publish


@contextmanager
def _publish_later(
    broker: Broker, user: Metadata, name: str, kind: int, delay_s: float
) -> Iterator[None]:
    """Publishes b"late" after `delay_s` while the block runs; waits for that call on leaving
    (a consumer may get the message before the publisher gets its answer)."""

    def run() -> None:
        time.sleep(delay_s)
        publish(broker.stub, user, name, b"late", kind=kind)

    publisher = threading.Thread(target=run, daemon=True)
    publisher.start()
    try:
        yield
    finally:
        publisher.join(timeout=10)


def test_consume_wakes_when_a_message_is_published(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    with _publish_later(broker, user, "orders", pb.QUEUE, delay_s=0.2):
        started = time.monotonic()
        deliveries = consume(broker.stub, user, "orders", timeout_s=2.0)
        elapsed = time.monotonic() - started
    assert [d.body for d in deliveries] == [b"late"]
    assert 0.15 <= elapsed < 1.5


def test_topic_consume_wakes_when_a_message_is_published(broker: Broker, user: Metadata) -> None:
    create_topic(broker.stub, user, "news")
    broker.stub.Subscribe(pb.SubscribeRequest(kind=pb.TOPIC, name="news"), metadata=user)
    with _publish_later(broker, user, "news", pb.TOPIC, delay_s=0.2):
        started = time.monotonic()
        deliveries = consume(broker.stub, user, "news", kind=pb.TOPIC, timeout_s=2.0)
        elapsed = time.monotonic() - started
    assert [d.body for d in deliveries] == [b"late"]
    assert elapsed < 1.5


def test_a_waiting_consume_rides_in_the_entry_of_the_next_publish(
    broker: Broker, user: Metadata
) -> None:
    create_queue(broker.stub, user, "orders")
    received: list[bytes] = []
    waiter = threading.Thread(
        target=lambda: received.extend(
            d.body for d in consume(broker.stub, user, "orders", timeout_s=5.0)
        ),
        daemon=True,
    )
    waiter.start()
    wait_until(lambda: broker.replication.rides >= 1, 5, "the consume to wait for a publish")
    assert broker.replication.rides == 1, "the consume waited more than once"
    applied_before = len(broker.replication.entries)
    publish(broker.stub, user, "orders", b"now")
    waiter.join(timeout=5)
    assert received == [b"now"]
    # One entry carried both: the publish, then the waiting consume, which leased the message.
    carried = broker.replication.entries[applied_before:]
    assert [[type(c).__name__ for c in entry.commands] for entry in carried] == [
        ["Publish", "Consume"]
    ]


def test_consume_wakes_when_a_batch_is_published(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    items = [{"body": b"late-1"}, {"body": b"late-2"}]
    request = pb.PublishBatchRequest(kind=pb.QUEUE, name="orders", items=items)

    def run() -> None:
        time.sleep(0.2)
        broker.stub.PublishBatch(request, metadata=user, timeout=5)

    publisher = threading.Thread(target=run, daemon=True)
    publisher.start()
    started = time.monotonic()
    deliveries = consume(broker.stub, user, "orders", max_messages=10, timeout_s=3.0)
    elapsed = time.monotonic() - started
    publisher.join(timeout=10)  # it may get its answer after the consumer got the messages
    assert [d.body for d in deliveries] == [b"late-1", b"late-2"]
    assert elapsed < 2.0


def test_consume_is_not_woken_by_another_queue(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    create_queue(broker.stub, user, "returns")
    with _publish_later(broker, user, "returns", pb.QUEUE, delay_s=0.05):
        started = time.monotonic()
        assert consume(broker.stub, user, "orders", timeout_s=0.4) == []
        assert time.monotonic() - started >= 0.35


def test_consume_on_empty_queue_returns_empty_after_timeout(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    started = time.monotonic()
    assert consume(broker.stub, user, "orders", timeout_s=0.3) == []
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 1.5


def test_consume_without_timeout_returns_at_once(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    started = time.monotonic()
    assert consume(broker.stub, user, "orders") == []
    assert time.monotonic() - started < 0.25


def test_consume_ends_by_the_client_deadline(broker: Broker, user: Metadata) -> None:
    """A client deadline shorter than timeout_s ends the wait early with an empty answer,
    not DEADLINE_EXCEEDED: the service keeps a margin to send the reply."""
    create_queue(broker.stub, user, "orders")
    request = pb.ConsumeRequest(kind=pb.QUEUE, name="orders", timeout_s=5.0)
    started = time.monotonic()
    response = broker.stub.Consume(request, metadata=user, timeout=0.8)
    assert list(response.deliveries) == []
    assert time.monotonic() - started < 0.8


def test_consume_wakes_when_a_lease_is_given_back(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    publish(broker.stub, user, "orders", b"retry me")
    [delivery] = consume(broker.stub, user, "orders")
    reference = pb.DeliveryRef(
        kind=pb.QUEUE,
        name="orders",
        sequence=delivery.sequence,
        delivery_count=delivery.delivery_count,
    )

    def nack_later() -> None:
        time.sleep(0.2)
        broker.stub.Nack(pb.NackRequest(delivery=reference), metadata=user, timeout=5)

    threading.Thread(target=nack_later, daemon=True).start()
    started = time.monotonic()
    deliveries = consume(broker.stub, user, "orders", timeout_s=2.0)
    assert [(d.body, d.delivery_count) for d in deliveries] == [(b"retry me", 2)]
    assert time.monotonic() - started < 1.5
