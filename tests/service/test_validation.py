"""Stateless limits and malformed fields are refused at the service edge.

Proves that every name rule and size limit is checked before anything is proposed: each bad
value gets INVALID_ARGUMENT (never INTERNAL) with a message naming the value and the limit, and
the store is left as it was (checked by listing queues and their depth afterwards). Every limit
gets three cases: just under, exactly at, just over. The one value the service never sees, a
request larger than the gRPC channel limit, is refused by gRPC itself with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import math

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

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MESSAGE_MAX = limits.MESSAGE_BYTES_MAX


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [limits.NAME_BYTES_MAX - 1, limits.NAME_BYTES_MAX])
def test_queue_name_up_to_name_bytes_max_is_accepted(
    broker: Broker, user: Metadata, size: int
) -> None:
    name = "q" * size
    create_queue(broker.stub, user, name)
    assert name in queues(broker.stub, user)


def test_queue_name_over_name_bytes_max_is_refused(broker: Broker, user: Metadata) -> None:
    name = "q" * (limits.NAME_BYTES_MAX + 1)
    error = refusal(broker.stub.CreateQueue, pb.CreateQueueRequest(name=name), user, INVALID)
    # Long names are shortened in the message; the prefix still identifies the name.
    assert name[:40] in error.details()
    assert str(limits.NAME_BYTES_MAX + 1) in error.details()
    assert f"name_bytes_max {limits.NAME_BYTES_MAX}" in error.details()
    assert queues(broker.stub, user) == {}


def test_topic_name_over_name_bytes_max_is_refused(broker: Broker, user: Metadata) -> None:
    name = "t" * (limits.NAME_BYTES_MAX + 1)
    error = refusal(broker.stub.CreateTopic, pb.CreateTopicRequest(name=name), user, INVALID)
    assert f"name_bytes_max {limits.NAME_BYTES_MAX}" in error.details()
    assert topics(broker.stub, user) == {}


def test_empty_queue_name_is_refused(broker: Broker, user: Metadata) -> None:
    error = refusal(broker.stub.CreateQueue, pb.CreateQueueRequest(name=""), user, INVALID)
    assert "queue name '' is invalid" in error.details()
    assert queues(broker.stub, user) == {}


@pytest.mark.parametrize(
    ("name", "character"),
    [("orders/eu", "/"), ("orders eu", " "), ("pedidos-ñ", "ñ"), ("a:b", ":")],
)
def test_queue_name_with_bad_character_is_refused(
    broker: Broker, user: Metadata, name: str, character: str
) -> None:
    error = refusal(broker.stub.CreateQueue, pb.CreateQueueRequest(name=name), user, INVALID)
    assert repr(name) in error.details()
    assert repr(character) in error.details()
    assert "[A-Za-z0-9._-]" in error.details()
    assert queues(broker.stub, user) == {}


def test_topic_name_with_bad_character_is_refused(broker: Broker, user: Metadata) -> None:
    error = refusal(broker.stub.CreateTopic, pb.CreateTopicRequest(name="a/b"), user, INVALID)
    assert "topic name 'a/b'" in error.details()
    assert topics(broker.stub, user) == {}


def test_bad_name_is_refused_on_publish_consume_and_delete(broker: Broker, user: Metadata) -> None:
    stub = broker.stub
    name = "bad/name"
    for method, request in [
        (stub.Publish, pb.PublishRequest(kind=pb.QUEUE, name=name, body=b"x")),
        (stub.Consume, pb.ConsumeRequest(kind=pb.QUEUE, name=name)),
        (stub.DeleteQueue, pb.DeleteQueueRequest(name=name)),
        (stub.DeleteTopic, pb.DeleteTopicRequest(name=name)),
        (stub.Subscribe, pb.SubscribeRequest(kind=pb.TOPIC, name=name)),
    ]:
        error = refusal(method, request, user, INVALID)
        assert repr(name) in error.details()


@pytest.mark.parametrize("size", [limits.NAME_BYTES_MAX - 1, limits.NAME_BYTES_MAX])
def test_dead_letter_queue_name_up_to_name_bytes_max_is_accepted(
    broker: Broker, user: Metadata, size: int
) -> None:
    dead_letters = "d" * size
    create_queue(broker.stub, user, dead_letters)
    create_queue(broker.stub, user, "orders", dead_letter_queue=dead_letters)
    assert set(queues(broker.stub, user)) == {dead_letters, "orders"}


def test_dead_letter_queue_name_over_name_bytes_max_is_refused(
    broker: Broker, user: Metadata
) -> None:
    dead_letters = "d" * (limits.NAME_BYTES_MAX + 1)
    request = pb.CreateQueueRequest(name="orders", dead_letter_queue=dead_letters)
    error = refusal(broker.stub.CreateQueue, request, user, INVALID)
    assert dead_letters[:40] in error.details()
    assert f"name_bytes_max {limits.NAME_BYTES_MAX}" in error.details()
    assert queues(broker.stub, user) == {}


def test_dead_letter_queue_name_with_bad_character_is_refused(
    broker: Broker, user: Metadata
) -> None:
    request = pb.CreateQueueRequest(name="orders", dead_letter_queue="dead letters")
    error = refusal(broker.stub.CreateQueue, request, user, INVALID)
    assert "'dead letters'" in error.details()
    assert queues(broker.stub, user) == {}


def test_queue_cannot_be_its_own_dead_letter_queue(broker: Broker, user: Metadata) -> None:
    request = pb.CreateQueueRequest(name="orders", dead_letter_queue="orders")
    error = refusal(broker.stub.CreateQueue, request, user, INVALID)
    assert '"orders"' in error.details()
    assert queues(broker.stub, user) == {}


# -- message sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [MESSAGE_MAX - 1, MESSAGE_MAX])
def test_message_up_to_message_bytes_max_is_accepted(
    broker: Broker, user: Metadata, size: int
) -> None:
    create_queue(broker.stub, user, "orders")
    publish(broker.stub, user, "orders", b"m" * size)
    [delivery] = consume(broker.stub, user, "orders")
    assert len(delivery.body) == size


def test_message_over_message_bytes_max_is_refused(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    request = pb.PublishRequest(kind=pb.QUEUE, name="orders", body=b"m" * (MESSAGE_MAX + 1))
    error = refusal(broker.stub.Publish, request, user, INVALID)
    assert str(MESSAGE_MAX + 1) in error.details()
    assert f"message_bytes_max {MESSAGE_MAX}" in error.details()
    assert depth(broker.stub, user, "orders") == 0


def test_message_over_message_bytes_max_names_its_size_in_bytes(
    broker: Broker, user: Metadata
) -> None:
    create_queue(broker.stub, user, "orders")
    request = pb.PublishRequest(kind=pb.QUEUE, name="orders", body=b"m" * (MESSAGE_MAX + 1))
    error = refusal(broker.stub.Publish, request, user, INVALID)
    assert error.details() == (
        f"message of {MESSAGE_MAX + 1} bytes exceeds message_bytes_max {MESSAGE_MAX}"
    )


def test_message_over_grpc_limit_is_refused_by_grpc(broker: Broker, user: Metadata) -> None:
    """Above GRPC_MESSAGE_BYTES_MAX the server's channel drops the request before the service
    runs, so the answer is gRPC's own RESOURCE_EXHAUSTED rather than our INVALID_ARGUMENT. The
    client never sends this: it checks message_bytes_max first."""
    create_queue(broker.stub, user, "orders")
    body = b"m" * (limits.GRPC_MESSAGE_BYTES_MAX + 1)
    request = pb.PublishRequest(kind=pb.QUEUE, name="orders", body=body)
    error = refusal(broker.stub.Publish, request, user, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert str(limits.GRPC_MESSAGE_BYTES_MAX) in error.details()
    assert depth(broker.stub, user, "orders") == 0


def test_producer_id_over_limit_is_refused(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    producer_id = "p" * (limits.PRODUCER_ID_BYTES_MAX + 1)
    request = pb.PublishRequest(kind=pb.QUEUE, name="orders", body=b"x", producer_id=producer_id)
    error = refusal(broker.stub.Publish, request, user, INVALID)
    assert str(limits.PRODUCER_ID_BYTES_MAX + 1) in error.details()
    assert f"producer_id_bytes_max {limits.PRODUCER_ID_BYTES_MAX}" in error.details()
    assert depth(broker.stub, user, "orders") == 0


def test_delay_on_a_topic_is_refused(broker: Broker, user: Metadata) -> None:
    create_topic(broker.stub, user, "news")
    request = pb.PublishRequest(kind=pb.TOPIC, name="news", body=b"x", delay_ms=10)
    error = refusal(broker.stub.Publish, request, user, INVALID)
    assert "delay_ms" in error.details()
    assert topics(broker.stub, user)["news"].next_offset == 0


def test_delay_over_delay_ms_max_is_refused(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    delay_ms = limits.DELAY_MS_MAX + 1
    request = pb.PublishRequest(kind=pb.QUEUE, name="orders", body=b"x", delay_ms=delay_ms)
    error = refusal(broker.stub.Publish, request, user, INVALID)
    assert f"{delay_ms} exceeds delay_ms_max {limits.DELAY_MS_MAX}" in error.details()
    assert depth(broker.stub, user, "orders") == 0


# -- batches -----------------------------------------------------------------------------------


def _batch(count: int, body: bytes = b"x") -> pb.PublishBatchRequest:
    items = [pb.PublishBatchRequest.Item(body=body, sequence=index) for index in range(count)]
    return pb.PublishBatchRequest(kind=pb.QUEUE, name="orders", producer_id="p1", items=items)


@pytest.mark.parametrize(
    "count", [limits.PUBLISH_BATCH_MESSAGES_MAX - 1, limits.PUBLISH_BATCH_MESSAGES_MAX]
)
def test_batch_up_to_publish_batch_messages_max_is_accepted(
    broker: Broker, user: Metadata, count: int
) -> None:
    create_queue(broker.stub, user, "orders")
    response = broker.stub.PublishBatch(_batch(count), metadata=user, timeout=10)
    assert [receipt.sequence for receipt in response.receipts] == list(range(count))
    assert depth(broker.stub, user, "orders") == count


def test_batch_over_publish_batch_messages_max_is_refused(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    count = limits.PUBLISH_BATCH_MESSAGES_MAX + 1
    error = refusal(broker.stub.PublishBatch, _batch(count), user, INVALID)
    assert str(count) in error.details()
    assert f"publish_batch_messages_max {limits.PUBLISH_BATCH_MESSAGES_MAX}" in error.details()
    assert depth(broker.stub, user, "orders") == 0


def test_batch_at_publish_batch_bytes_max_is_accepted(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    count = limits.PUBLISH_BATCH_BYTES_MAX // MESSAGE_MAX
    broker.stub.PublishBatch(_batch(count, b"m" * MESSAGE_MAX), metadata=user, timeout=10)
    assert depth(broker.stub, user, "orders") == count


def test_batch_over_publish_batch_bytes_max_is_refused(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    request = _batch(limits.PUBLISH_BATCH_BYTES_MAX // MESSAGE_MAX, b"m" * MESSAGE_MAX)
    request.items.add(body=b"m", sequence=999)
    error = refusal(broker.stub.PublishBatch, request, user, INVALID)
    assert str(limits.PUBLISH_BATCH_BYTES_MAX + 1) in error.details()
    assert f"publish_batch_bytes_max {limits.PUBLISH_BATCH_BYTES_MAX}" in error.details()
    assert depth(broker.stub, user, "orders") == 0


def test_batch_with_one_oversized_message_is_refused_whole(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    request = _batch(3)
    request.items.add(body=b"m" * (MESSAGE_MAX + 1), sequence=3)
    error = refusal(broker.stub.PublishBatch, request, user, INVALID)
    assert f"message_bytes_max {MESSAGE_MAX}" in error.details()
    assert depth(broker.stub, user, "orders") == 0


# -- consume parameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "max_messages", [limits.CONSUME_MESSAGES_MAX - 1, limits.CONSUME_MESSAGES_MAX]
)
def test_consume_up_to_consume_messages_max_is_accepted(
    broker: Broker, user: Metadata, max_messages: int
) -> None:
    create_queue(broker.stub, user, "orders")
    broker.stub.PublishBatch(_batch(3), metadata=user, timeout=10)
    assert len(consume(broker.stub, user, "orders", max_messages=max_messages)) == 3


def test_consume_over_consume_messages_max_is_refused(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    publish(broker.stub, user, "orders")
    count = limits.CONSUME_MESSAGES_MAX + 1
    request = pb.ConsumeRequest(kind=pb.QUEUE, name="orders", max_messages=count)
    error = refusal(broker.stub.Consume, request, user, INVALID)
    assert f"{count} exceeds consume_messages_max {limits.CONSUME_MESSAGES_MAX}" in (
        error.details()
    )
    assert queues(broker.stub, user)["orders"].in_flight == 0


@pytest.mark.parametrize("timeout_s", [-0.001, -1.0, limits.CONSUME_WAIT_S_MAX + 0.001, math.nan])
def test_consume_timeout_outside_range_is_refused(
    broker: Broker, user: Metadata, timeout_s: float
) -> None:
    create_queue(broker.stub, user, "orders")
    publish(broker.stub, user, "orders")
    request = pb.ConsumeRequest(kind=pb.QUEUE, name="orders", timeout_s=timeout_s)
    error = refusal(broker.stub.Consume, request, user, INVALID)
    assert f"timeout_s {timeout_s}" in error.details()
    assert f"consume_wait_s_max {limits.CONSUME_WAIT_S_MAX}" in error.details()
    assert queues(broker.stub, user)["orders"].in_flight == 0


def test_consume_timeout_at_consume_wait_s_max_is_accepted(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    publish(broker.stub, user, "orders")
    # A message is ready, so the longest allowed wait returns at once.
    [delivery] = consume(broker.stub, user, "orders", timeout_s=limits.CONSUME_WAIT_S_MAX)
    assert delivery.body == b"hello"


def test_consume_visibility_timeout_over_limit_is_refused(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    publish(broker.stub, user, "orders")
    too_long = limits.VISIBILITY_TIMEOUT_MS_MAX + 1
    request = pb.ConsumeRequest(kind=pb.QUEUE, name="orders", visibility_timeout_ms=too_long)
    error = refusal(broker.stub.Consume, request, user, INVALID)
    assert f"visibility_timeout_ms_max {limits.VISIBILITY_TIMEOUT_MS_MAX}" in error.details()
    assert queues(broker.stub, user)["orders"].in_flight == 0


# -- kinds and enums ---------------------------------------------------------------------------


def test_unspecified_kind_is_refused_everywhere(broker: Broker, user: Metadata) -> None:
    stub = broker.stub
    create_queue(stub, user, "orders")
    reference = pb.DeliveryRef(kind=pb.KIND_UNSPECIFIED, name="orders", delivery_count=1)
    for method, request in [
        (stub.Publish, pb.PublishRequest(name="orders", body=b"x")),
        (stub.PublishBatch, pb.PublishBatchRequest(name="orders", items=[{"body": b"x"}])),
        (stub.Consume, pb.ConsumeRequest(name="orders")),
        (stub.Subscribe, pb.SubscribeRequest(name="orders")),
        (stub.Unsubscribe, pb.UnsubscribeRequest(name="orders")),
        (stub.Ack, pb.AckRequest(deliveries=[reference])),
        (stub.Nack, pb.NackRequest(delivery=reference)),
        (stub.Extend, pb.ExtendRequest(delivery=reference, extend_ms=1000)),
    ]:
        error = refusal(method, request, user, INVALID)
        assert "kind 0 is not TOPIC (1) or QUEUE (2)" in error.details()
    assert depth(stub, user, "orders") == 0


def test_unknown_kind_number_is_refused(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    request = pb.PublishRequest(kind=7, name="orders", body=b"x")  # type: ignore[arg-type]
    error = refusal(broker.stub.Publish, request, user, INVALID)
    assert "kind 7" in error.details()
    assert depth(broker.stub, user, "orders") == 0


def test_unknown_overflow_and_start_are_refused(broker: Broker, user: Metadata) -> None:
    request = pb.CreateQueueRequest(name="orders", overflow=9)  # type: ignore[arg-type]
    error = refusal(broker.stub.CreateQueue, request, user, INVALID)
    assert "overflow 9" in error.details()
    assert queues(broker.stub, user) == {}
    create_topic(broker.stub, user, "news")
    subscribe = pb.SubscribeRequest(kind=pb.TOPIC, name="news", start=9)  # type: ignore[arg-type]
    error = refusal(broker.stub.Subscribe, subscribe, user, INVALID)
    assert "start 9" in error.details()
    assert not topics(broker.stub, user)["news"].subscribed


# -- queue settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "limit_name", "limit"),
    [
        ("visibility_timeout_ms", "visibility_timeout_ms_max", limits.VISIBILITY_TIMEOUT_MS_MAX),
        ("max_deliveries", "max_deliveries_max", limits.MAX_DELIVERIES_MAX),
        ("max_length", "queue_depth_max", limits.QUEUE_DEPTH_MAX),
        ("message_ttl_ms", "message_ttl_ms_max", limits.MESSAGE_TTL_MS_MAX),
    ],
)
def test_queue_setting_limits_under_at_and_over(
    broker: Broker, user: Metadata, field: str, limit_name: str, limit: int
) -> None:
    stub = broker.stub
    create_queue(stub, user, "under", **{field: limit - 1})
    create_queue(stub, user, "at", **{field: limit})
    request = pb.CreateQueueRequest(name="over", **{field: limit + 1})
    error = refusal(stub.CreateQueue, request, user, INVALID)
    assert f"{limit + 1} exceeds {limit_name} {limit}" in error.details()
    assert set(queues(stub, user)) == {"under", "at"}
