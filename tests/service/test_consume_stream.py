"""ConsumeStream pushes deliveries as they become ready and never more than the credit the
client granted; unknown names and bad requests end the stream with the right status."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc
import pytest

from chasqui_proto import chasqui_pb2 as pb
from tests.service.conftest import Broker
from tests.service.support import Metadata, create_queue, publish


class Grants:
    """The client's side of the request stream: put credit in, close to end it."""

    def __init__(self, name: str, credit: int, kind: int = pb.QUEUE) -> None:
        self._queue: queue.Queue[pb.ConsumeStreamRequest | None] = queue.Queue()
        self._queue.put(pb.ConsumeStreamRequest(kind=kind, name=name, credit=credit))

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
        deadline = threading.Event()
        for _ in range(100):
            if len(received) >= 3:
                break
            deadline.wait(0.05)
        assert received == [b"m0", b"m1", b"m2"]
        deadline.wait(0.5)  # no credit left: nothing more may arrive
        assert len(received) == 3
        grants.grant(10)
        publish(broker.stub, user, "jobs", b"m5")  # pushed as soon as it is published
        for _ in range(100):
            if len(received) >= 6:
                break
            deadline.wait(0.05)
        assert received == [b"m0", b"m1", b"m2", b"m3", b"m4", b"m5"]
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
