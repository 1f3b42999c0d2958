"""ConsumeStream pushes deliveries as they become ready and never more than the credit the
client granted; unknown names and bad requests end the stream with the right status."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import suppress

import grpc
import pytest

from chasqui_node import limits
from chasqui_proto import chasqui_pb2 as pb
from tests.harness import wait_until
from tests.service.conftest import Broker
from tests.service.support import Metadata, create_queue, publish


class Grants:
    """The client's side of the request stream: put credit in, close to end it."""

    def __init__(
        self, name: str, credit: int, kind: int = pb.QUEUE, visibility_timeout_ms: int = 0
    ) -> None:
        self._queue: queue.Queue[pb.ConsumeStreamRequest | None] = queue.Queue()
        self._queue.put(
            pb.ConsumeStreamRequest(
                kind=kind, name=name, credit=credit, visibility_timeout_ms=visibility_timeout_ms
            )
        )

    def grant(self, credit: int) -> None:
        self._queue.put(pb.ConsumeStreamRequest(credit=credit))

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[pb.ConsumeStreamRequest]:
        while (request := self._queue.get()) is not None:
            yield request


def collect(responses: Iterator[pb.ConsumeResponse], into: list[bytes]) -> None:
    try:
        for response in responses:
            into.extend(d.body for d in response.deliveries)
    except grpc.RpcError:
        pass


def test_stream_pushes_up_to_its_credit_and_more_after_a_grant(
    broker: Broker, user: Metadata
) -> None:
    create_queue(broker.stub, user, "jobs")
    for number in range(5):
        publish(broker.stub, user, "jobs", f"m{number}".encode())
    grants = Grants("jobs", credit=3)
    responses = broker.stub.ConsumeStream(iter(grants), metadata=user, timeout=20)
    received: list[bytes] = []
    reader = threading.Thread(target=collect, args=(responses, received))
    reader.start()
    try:
        wait_until(lambda: len(received) >= 3, 5, "the 3 deliveries of the first credit")
        assert received == [b"m0", b"m1", b"m2"]
        time.sleep(0.5)  # no credit left: nothing more may arrive meanwhile
        assert len(received) == 3
        grants.grant(10)
        publish(broker.stub, user, "jobs", b"m5")  # pushed as soon as it is published
        wait_until(lambda: len(received) >= 6, 5, "3 more deliveries after a grant of 10")
        assert received == [b"m0", b"m1", b"m2", b"m3", b"m4", b"m5"]
    finally:
        grants.close()
        responses.cancel()
        reader.join(timeout=10)


def test_a_stream_that_took_all_there_was_rides_the_next_publish_without_asking(
    broker: Broker, user: Metadata, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No periodic re-check during the test: every consume in the log is the stream's choice.
    monkeypatch.setattr(limits, "STREAM_RECHECK_S", 60.0)
    create_queue(broker.stub, user, "jobs")
    grants = Grants("jobs", credit=100)
    responses = broker.stub.ConsumeStream(iter(grants), metadata=user, timeout=30)
    received: list[bytes] = []
    reader = threading.Thread(target=collect, args=(responses, received))
    reader.start()
    replication = broker.replication
    try:
        for number in range(3):
            wait_until(lambda n=number: replication.rides == n + 1, 10, "the stream waits to ride")
            publish(broker.stub, user, "jobs", f"m{number}".encode())
            wait_until(lambda n=number: len(received) == n + 1, 10, "the message arrives")
        assert received == [b"m0", b"m1", b"m2"]
        kinds = [[type(c).__name__ for c in entry.commands] for entry in replication.entries]
        consumes = [names for names in kinds if "Consume" in names]
        # One look when the stream opened; then each message came in its publish's entry.
        assert consumes == [["Consume"]] + [["Publish", "Consume"]] * 3
    finally:
        grants.close()
        responses.cancel()
        reader.join(timeout=10)


def test_a_waiting_stream_delivers_again_what_it_was_given_once_the_lease_ends(
    broker: Broker, user: Metadata
) -> None:
    create_queue(broker.stub, user, "jobs")
    grants = Grants("jobs", credit=10, visibility_timeout_ms=200)
    responses = broker.stub.ConsumeStream(iter(grants), metadata=user, timeout=30)
    counts: list[int] = []

    def read() -> None:
        with suppress(grpc.RpcError):
            for response in responses:
                counts.extend(d.delivery_count for d in response.deliveries)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        publish(broker.stub, user, "jobs", b"m")
        wait_until(lambda: counts == [1], 10, "the first delivery")
        broker.clock.advance(200)  # the lease ends; no publish follows to ride
        wait_until(lambda: counts == [1, 2], 10, "the second delivery")
    finally:
        grants.close()
        responses.cancel()
        reader.join(timeout=10)


def test_a_waiting_stream_ends_when_its_queue_is_deleted(broker: Broker, user: Metadata) -> None:
    # Deleting a queue makes nothing ready, so no publish wakes the stream: it still looks
    # once per STREAM_RECHECK_S and ends with NOT_FOUND.
    create_queue(broker.stub, user, "jobs")
    grants = Grants("jobs", credit=10)
    responses = broker.stub.ConsumeStream(iter(grants), metadata=user, timeout=30)
    outcome: list[grpc.StatusCode] = []

    def read() -> None:
        try:
            for _ in responses:
                pass
        except grpc.RpcError as error:
            outcome.append(error.code())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        wait_until(lambda: broker.replication.rides >= 1, 10, "the stream waits to ride")
        broker.stub.DeleteQueue(pb.DeleteQueueRequest(name="jobs"), metadata=user, timeout=10)
        wait_until(lambda: outcome, 10 * limits.STREAM_RECHECK_S, "the stream ends")
        assert outcome == [grpc.StatusCode.NOT_FOUND]
    finally:
        grants.close()
        responses.cancel()
        reader.join(timeout=10)


@pytest.mark.parametrize(
    ("name", "code"),
    [("missing", grpc.StatusCode.NOT_FOUND), ("bad name!", grpc.StatusCode.INVALID_ARGUMENT)],
)
def test_stream_on_a_bad_name_ends_with_its_status(
    broker: Broker, user: Metadata, name: str, code: grpc.StatusCode
) -> None:
    grants = Grants(name, credit=1)
    grants.close()
    with pytest.raises(grpc.RpcError) as raised:
        list(broker.stub.ConsumeStream(iter(grants), metadata=user, timeout=10))
    assert raised.value.code() == code
    assert name in raised.value.details()


def test_stream_without_a_key_is_unauthenticated(broker: Broker) -> None:
    grants = Grants("jobs", credit=1)
    grants.close()
    with pytest.raises(grpc.RpcError) as raised:
        list(broker.stub.ConsumeStream(iter(grants), timeout=10))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
