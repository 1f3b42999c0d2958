"""The asyncio client against the real service over a fake replicator (see conftest.py).

Proves the async methods mirror the sync ones: a user is registered on `async with`, publish,
consume, `async for` with `async with message.process()` (ack on success, nack on an
exception), a follower's refusal followed to the hinted leader, typed errors, and an iterator
that ends cleanly on `close()`. Each test runs its own event loop with a bounded timeout.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import grpc
import pytest

from chasqui_client import aio, errors
from chasqui_node.replication import Member
from tests.service.conftest import Broker

pytestmark = pytest.mark.timeout(60)


def run(coroutine: object) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 30))  # type: ignore[arg-type]


@pytest.fixture
def address(broker: Broker) -> Iterator[str]:
    yield f"127.0.0.1:{broker.port}"


def test_publish_consume_and_process_round_trip(address: str) -> None:
    async def scenario() -> None:
        async with aio.Client([address], call_timeout_s=5) as client:
            assert client.key is not None
            assert (await client.whoami()).user_id == client.user_id
            assert await client.create_queue("jobs")
            receipt = await client.publish_queue("jobs", "one")
            assert (receipt.sequence, receipt.duplicate) == (0, False)
            receipts = await client.publish_many_queue("jobs", [b"two", b"three"])
            assert [r.sequence for r in receipts] == [1, 2]
            message = await client.consume_queue("jobs", timeout_s=1)
            assert message is not None and message.text == "one"
            async with message.process():
                pass
            seen = []
            async for message in client.iter_queue("jobs", batch=5, wait_s=1):
                if message.text == "two" and message.delivery_count == 1:
                    with pytest.raises(RuntimeError):
                        async with message.process():
                            raise RuntimeError("retry me")
                    continue
                async with message.process():
                    seen.append((message.text, message.delivery_count))
                if len(seen) == 2:
                    break
            assert sorted(seen) == [("three", 1), ("two", 2)]
            assert await client.consume_queue("jobs", timeout_s=0) is None
            with pytest.raises(TypeError), message.process():  # asyncio needs `async with`
                pass

    run(scenario())


def test_topics_and_typed_errors(address: str) -> None:
    async def scenario() -> None:
        async with aio.Client([address], call_timeout_s=5) as client:
            await client.create_topic("news")
            with pytest.raises(errors.AlreadyExists):
                await client.create_topic("news")
            assert not await client.create_topic("news", exist_ok=True)
            await client.subscribe_topic("news")
            await client.publish_many_topic("news", [f"n{i}" for i in range(5)])
            got = []
            async for message in client.iter_topic("news", batch=2, wait_s=1):
                got.append(message.text)
                await client.ack(message)
                if len(got) == 5:
                    break
            assert got == [f"n{i}" for i in range(5)]
            assert [t.name for t in await client.list_topics()] == ["news"]
            with pytest.raises(errors.NotFound):
                await client.consume_queue("missing")
            with pytest.raises(errors.InvalidArgument):
                await client.publish_queue("bad name", b"x")

    run(scenario())


def test_follower_refusal_is_followed_to_the_hinted_leader(broker: Broker, address: str) -> None:
    # A second real server stands in for the leader; the broker under test is the follower.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_address = f"127.0.0.1:{probe.getsockname()[1]}"

    async def scenario() -> None:
        async with aio.Client([address], call_timeout_s=5) as client:
            await client.create_queue("jobs")
            broker.replication.become_follower(Member("n2", closed_address, "127.0.0.1:1"))
            short = aio.Client([address], key=client.key, call_timeout_s=1.5, connect_timeout_s=0.3)
            try:
                with pytest.raises(errors.NoEndpointAvailable) as caught:
                    await short.publish_queue("jobs", b"x")
                assert closed_address in caught.value.attempts  # the hint was followed
                assert address in caught.value.attempts
            finally:
                await short.close()
            broker.replication.become_leader()
            await client.publish_queue("jobs", b"y")  # the same client carries on

    run(scenario())


def test_iterator_ends_cleanly_when_the_client_closes(address: str) -> None:
    async def scenario() -> None:
        client = aio.Client([address], call_timeout_s=5)
        await client.connect()
        await client.create_queue("jobs")
        received = []

        async def consume() -> None:
            async for message in client.iter_queue("jobs", wait_s=30):
                received.append(message)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        await client.close()
        await asyncio.wait_for(task, 5)
        assert received == []
        with pytest.raises(RuntimeError):
            await client.list_queues()

    run(scenario())


def test_status_code_mapping_is_shared_with_the_sync_client() -> None:
    from chasqui_client import routing

    assert (
        routing.classify(grpc.StatusCode.ABORTED, hint=None, connected=True, idempotent=False)
        is routing.Action.RAISE_AMBIGUOUS
    )
    assert (
        routing.classify(grpc.StatusCode.UNAVAILABLE, hint="h:1", connected=True, idempotent=False)
        is routing.Action.REDIRECT
    )
