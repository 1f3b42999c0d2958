"""Refusals that depend on state: the state machine's verdicts reach the client intact.

Proves that the service maps each domain error to its status code with the state machine's
message (which names the queue or topic): NOT_FOUND for unknown names, subscriptions and
deliveries, ALREADY_EXISTS for a second create, PERMISSION_DENIED for deleting another user's
queue or topic, FAILED_PRECONDITION for acking an expired lease, RESOURCE_EXHAUSTED for a full
queue. After each refusal the state is checked (listing, depth) to be unchanged. Also proves the
successes that look like errors: exist_ok, a repeated ack and a duplicate publish are all OK.
"""

from __future__ import annotations

import grpc
import pytest

from chasqui_node import limits
from chasqui_proto import chasqui_pb2 as pb
from tests.service.conftest import Broker
from tests.service.support import (
    Metadata,
    consume,
    create_queue,
    create_topic,
    depth,
    publish,
    queues,
    refusal,
    topics,
)

NOT_FOUND = grpc.StatusCode.NOT_FOUND


# -- unknown names -----------------------------------------------------------------------------


def test_unknown_queue_is_not_found_on_every_call(broker: Broker, user: Metadata) -> None:
    stub = broker.stub
    create_queue(stub, user, "orders")
    reference = pb.DeliveryRef(kind=pb.QUEUE, name="missing", sequence=0, delivery_count=1)
    batch = pb.PublishBatchRequest(kind=pb.QUEUE, name="missing", items=[{"body": b"x"}])
    for method, request in [
        (stub.Publish, pb.PublishRequest(kind=pb.QUEUE, name="missing", body=b"x")),
        (stub.PublishBatch, batch),
        (stub.Consume, pb.ConsumeRequest(kind=pb.QUEUE, name="missing")),
        (stub.DeleteQueue, pb.DeleteQueueRequest(name="missing")),
        (stub.Subscribe, pb.SubscribeRequest(kind=pb.QUEUE, name="missing")),
        (stub.Unsubscribe, pb.UnsubscribeRequest(kind=pb.QUEUE, name="missing")),
        (stub.Ack, pb.AckRequest(deliveries=[reference])),
        (stub.Nack, pb.NackRequest(delivery=reference)),
        (stub.Extend, pb.ExtendRequest(delivery=reference, extend_ms=1000)),
    ]:
        error = refusal(method, request, user, NOT_FOUND)
        assert error.details() == 'queue "missing" does not exist'
    assert set(queues(stub, user)) == {"orders"}


def test_unknown_topic_is_not_found_on_every_call(broker: Broker, user: Metadata) -> None:
    stub = broker.stub
    create_topic(stub, user, "news")
    for method, request in [
        (stub.Publish, pb.PublishRequest(kind=pb.TOPIC, name="missing", body=b"x")),
        (stub.Consume, pb.ConsumeRequest(kind=pb.TOPIC, name="missing")),
        (stub.DeleteTopic, pb.DeleteTopicRequest(name="missing")),
        (stub.Subscribe, pb.SubscribeRequest(kind=pb.TOPIC, name="missing")),
        (stub.Unsubscribe, pb.UnsubscribeRequest(kind=pb.TOPIC, name="missing")),
    ]:
        error = refusal(method, request, user, NOT_FOUND)
        assert error.details() == 'topic "missing" does not exist'
    assert set(topics(stub, user)) == {"news"}


def test_queue_and_topic_names_are_separate(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    request = pb.PublishRequest(kind=pb.TOPIC, name="orders", body=b"x")
    refusal(broker.stub.Publish, request, user, NOT_FOUND)
    assert depth(broker.stub, user, "orders") == 0


def test_unknown_dead_letter_queue_is_not_found(broker: Broker, user: Metadata) -> None:
    request = pb.CreateQueueRequest(name="orders", dead_letter_queue="graveyard")
    error = refusal(broker.stub.CreateQueue, request, user, NOT_FOUND)
    assert '"graveyard"' in error.details()
    assert queues(broker.stub, user) == {}


def test_consuming_a_topic_without_subscription_is_not_found(
    broker: Broker, user: Metadata
) -> None:
    create_topic(broker.stub, user, "news")
    publish(broker.stub, user, "news", kind=pb.TOPIC)
    request = pb.ConsumeRequest(kind=pb.TOPIC, name="news")
    error = refusal(broker.stub.Consume, request, user, NOT_FOUND)
    assert 'no subscription to topic "news"' in error.details()
    assert not topics(broker.stub, user)["news"].subscribed


def test_unsubscribing_without_subscription_is_not_found(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    request = pb.UnsubscribeRequest(kind=pb.QUEUE, name="orders")
    error = refusal(broker.stub.Unsubscribe, request, user, NOT_FOUND)
    assert 'not subscribed to queue "orders"' in error.details()


# -- create twice ------------------------------------------------------------------------------


def test_creating_a_queue_twice_is_already_exists(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders", max_length=5)
    request = pb.CreateQueueRequest(name="orders")
    error = refusal(broker.stub.CreateQueue, request, user, grpc.StatusCode.ALREADY_EXISTS)
    assert error.details() == 'queue "orders" already exists'
    assert set(queues(broker.stub, user)) == {"orders"}


def test_creating_a_topic_twice_is_already_exists(broker: Broker, user: Metadata) -> None:
    create_topic(broker.stub, user, "news")
    request = pb.CreateTopicRequest(name="news")
    error = refusal(broker.stub.CreateTopic, request, user, grpc.StatusCode.ALREADY_EXISTS)
    assert error.details() == 'topic "news" already exists'
    assert set(topics(broker.stub, user)) == {"news"}


def test_exist_ok_create_of_own_queue_reports_not_created(broker: Broker, user: Metadata) -> None:
    stub = broker.stub
    assert stub.CreateQueue(pb.CreateQueueRequest(name="orders"), metadata=user).created
    publish(stub, user, "orders")
    again = stub.CreateQueue(pb.CreateQueueRequest(name="orders", exist_ok=True), metadata=user)
    assert again.created is False
    assert depth(stub, user, "orders") == 1  # the existing queue was kept, not replaced


def test_exist_ok_create_of_own_topic_reports_not_created(broker: Broker, user: Metadata) -> None:
    stub = broker.stub
    assert stub.CreateTopic(pb.CreateTopicRequest(name="news"), metadata=user).created
    again = stub.CreateTopic(pb.CreateTopicRequest(name="news", exist_ok=True), metadata=user)
    assert again.created is False
    assert set(topics(stub, user)) == {"news"}


def test_exist_ok_does_not_cover_another_users_queue(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    other = broker.new_user()
    request = pb.CreateQueueRequest(name="orders", exist_ok=True)
    refusal(broker.stub.CreateQueue, request, other, grpc.StatusCode.ALREADY_EXISTS)


# -- ownership ---------------------------------------------------------------------------------


def test_deleting_another_users_queue_is_permission_denied(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    publish(broker.stub, user, "orders")
    other = broker.new_user()
    request = pb.DeleteQueueRequest(name="orders")
    error = refusal(broker.stub.DeleteQueue, request, other, grpc.StatusCode.PERMISSION_DENIED)
    assert 'queue "orders" belongs to u1' in error.details()
    assert depth(broker.stub, user, "orders") == 1


def test_deleting_another_users_topic_is_permission_denied(broker: Broker, user: Metadata) -> None:
    create_topic(broker.stub, user, "news")
    other = broker.new_user()
    request = pb.DeleteTopicRequest(name="news")
    error = refusal(broker.stub.DeleteTopic, request, other, grpc.StatusCode.PERMISSION_DENIED)
    assert 'topic "news" belongs to u1' in error.details()
    assert set(topics(broker.stub, user)) == {"news"}


def test_owner_may_delete_own_queue(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    broker.stub.DeleteQueue(pb.DeleteQueueRequest(name="orders"), metadata=user)
    assert queues(broker.stub, user) == {}


# -- acks --------------------------------------------------------------------------------------


def _ack(broker: Broker, user: Metadata, sequence: int, delivery_count: int = 1) -> None:
    reference = pb.DeliveryRef(
        kind=pb.QUEUE, name="orders", sequence=sequence, delivery_count=delivery_count
    )
    broker.stub.Ack(pb.AckRequest(deliveries=[reference]), metadata=user, timeout=5)


def test_ack_of_never_assigned_sequence_is_not_found(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    publish(broker.stub, user, "orders")
    with pytest.raises(grpc.RpcError) as caught:
        _ack(broker, user, sequence=7)
    assert caught.value.code() is NOT_FOUND
    assert caught.value.details() == 'message 7 was never published to queue "orders"'
    assert depth(broker.stub, user, "orders") == 1


def test_ack_of_expired_delivery_is_failed_precondition(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders", visibility_timeout_ms=5_000)
    publish(broker.stub, user, "orders")
    [delivery] = consume(broker.stub, user, "orders")
    broker.clock.advance(5_001)
    with pytest.raises(grpc.RpcError) as caught:
        _ack(broker, user, delivery.sequence, delivery.delivery_count)
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert f"lease expired at {delivery.lease_deadline_ms}" in caught.value.details()
    assert 'queue "orders"' in caught.value.details()
    assert depth(broker.stub, user, "orders") == 1
    # The message is handed out again, as the refusal promised.
    [again] = consume(broker.stub, user, "orders")
    assert (again.sequence, again.delivery_count) == (delivery.sequence, 2)


def test_ack_just_before_lease_expiry_is_accepted(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders", visibility_timeout_ms=5_000)
    publish(broker.stub, user, "orders")
    [delivery] = consume(broker.stub, user, "orders")
    broker.clock.advance(4_999)
    _ack(broker, user, delivery.sequence, delivery.delivery_count)
    assert depth(broker.stub, user, "orders") == 0


def test_ack_twice_is_ok(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    publish(broker.stub, user, "orders")
    publish(broker.stub, user, "orders", b"second")
    [delivery] = consume(broker.stub, user, "orders")
    _ack(broker, user, delivery.sequence, delivery.delivery_count)
    _ack(broker, user, delivery.sequence, delivery.delivery_count)
    assert depth(broker.stub, user, "orders") == 1


def test_ack_batch_over_ack_batch_max_is_refused(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    publish(broker.stub, user, "orders")
    [delivery] = consume(broker.stub, user, "orders")
    reference = pb.DeliveryRef(
        kind=pb.QUEUE, name="orders", sequence=delivery.sequence, delivery_count=1
    )
    request = pb.AckRequest(deliveries=[reference] * (limits.ACK_BATCH_MAX + 1))
    error = refusal(broker.stub.Ack, request, user, grpc.StatusCode.INVALID_ARGUMENT)
    assert f"{limits.ACK_BATCH_MAX + 1} exceeds ack_batch_max {limits.ACK_BATCH_MAX}" in (
        error.details()
    )
    assert depth(broker.stub, user, "orders") == 1


# -- queue full --------------------------------------------------------------------------------


def test_publish_to_full_queue_is_resource_exhausted(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders", max_length=2)
    publish(broker.stub, user, "orders", b"one")
    publish(broker.stub, user, "orders", b"two")
    request = pb.PublishRequest(kind=pb.QUEUE, name="orders", body=b"three")
    error = refusal(broker.stub.Publish, request, user, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert error.details() == 'queue "orders" is full (2 of queue_depth_max 2)'
    assert depth(broker.stub, user, "orders") == 2
    bodies = [d.body for d in consume(broker.stub, user, "orders", max_messages=10)]
    assert bodies == [b"one", b"two"]


def test_drop_head_queue_at_max_length_accepts_and_drops_oldest(
    broker: Broker, user: Metadata
) -> None:
    create_queue(broker.stub, user, "orders", max_length=2, overflow=pb.DROP_HEAD)
    for body in (b"one", b"two", b"three"):
        publish(broker.stub, user, "orders", body)
    bodies = [d.body for d in consume(broker.stub, user, "orders", max_messages=10)]
    assert bodies == [b"two", b"three"]


# -- duplicates --------------------------------------------------------------------------------


def test_duplicate_publish_returns_original_receipt_and_stores_once(
    broker: Broker, user: Metadata
) -> None:
    create_queue(broker.stub, user, "orders")
    publish(broker.stub, user, "orders", b"first", producer_id="p1", sequence=1)
    original = publish(broker.stub, user, "orders", b"second", producer_id="p1", sequence=2)
    retry = publish(broker.stub, user, "orders", b"second", producer_id="p1", sequence=2)
    assert original.duplicate is False
    assert (retry.sequence, retry.duplicate) == (original.sequence, True)
    assert depth(broker.stub, user, "orders") == 2
    bodies = [d.body for d in consume(broker.stub, user, "orders", max_messages=10)]
    assert bodies == [b"first", b"second"]


def test_duplicate_topic_publish_returns_original_offset(broker: Broker, user: Metadata) -> None:
    create_topic(broker.stub, user, "news")
    original = publish(broker.stub, user, "news", kind=pb.TOPIC, producer_id="p1", sequence=9)
    retry = publish(broker.stub, user, "news", kind=pb.TOPIC, producer_id="p1", sequence=9)
    assert (retry.sequence, retry.duplicate) == (original.sequence, True)
    assert topics(broker.stub, user)["news"].next_offset == 1


def test_duplicate_batch_returns_original_receipts(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    items = [{"body": b"a", "sequence": 1}, {"body": b"b", "sequence": 2}]
    request = pb.PublishBatchRequest(kind=pb.QUEUE, name="orders", producer_id="p1", items=items)
    first = broker.stub.PublishBatch(request, metadata=user).receipts
    retry = broker.stub.PublishBatch(request, metadata=user).receipts
    assert [r.sequence for r in retry] == [r.sequence for r in first]
    assert all(r.duplicate for r in retry)
    assert depth(broker.stub, user, "orders") == 2


# -- whole refusals ------------------------------------------------------------------------------


def test_batch_that_overflows_a_queue_is_refused_whole(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders", max_length=2)
    items = [{"body": body, "sequence": n} for n, body in enumerate([b"a", b"b", b"c"])]
    request = pb.PublishBatchRequest(kind=pb.QUEUE, name="orders", producer_id="p1", items=items)
    error = refusal(broker.stub.PublishBatch, request, user, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert '"orders" is full' in error.details()
    assert depth(broker.stub, user, "orders") == 0


# -- responses within the channel limit ----------------------------------------------------------


def test_consume_of_large_messages_stays_under_the_grpc_limit(
    broker: Broker, user: Metadata
) -> None:
    create_queue(broker.stub, user, "orders")
    count = limits.GRPC_MESSAGE_BYTES_MAX // limits.MESSAGE_BYTES_MAX + 1
    for _ in range(count):
        publish(broker.stub, user, "orders", b"m" * limits.MESSAGE_BYTES_MAX)
    deliveries = consume(broker.stub, user, "orders", max_messages=count)
    assert 1 <= len(deliveries) < count
    assert queues(broker.stub, user)["orders"].in_flight == len(deliveries)
