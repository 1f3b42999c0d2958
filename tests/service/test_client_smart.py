"""Iterators, `Message.process()`, streaming subscriptions and the pipelined publisher, against
the real service over a fake replicator (one in-process node on port 0; see conftest.py).

Proves: iterators long-poll and end cleanly on `close()`; `process()` acks on success and nacks
on an exception; a stream never holds more than its window of unacked deliveries and each ack
lets exactly one more through; a stream on a follower follows the leader hint; the publisher's
futures resolve in publish order with every message stored once; and the client back-reference
is not part of a message's value. Every wait is bounded.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from chasqui_client import Client, Message, errors, limits
from chasqui_client.models import Kind
from chasqui_node.replication import Member
from tests.harness import wait_until
from tests.service.conftest import Broker

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def client(broker: Broker) -> Iterator[Client]:
    with Client([f"127.0.0.1:{broker.port}"], call_timeout_s=5) as connected:
        yield connected


def drain(client: Client, name: str) -> list[bytes]:
    bodies: list[bytes] = []
    while batch := client.consume_many_queue(name, 500, timeout_s=0):
        bodies.extend(message.body for message in batch)
        client.ack(batch)
    return bodies


def test_message_value_excludes_the_client_back_reference(client: Client) -> None:
    client.create_queue("jobs")
    client.publish_queue("jobs", b"x")
    message = client.consume_queue("jobs", timeout_s=1)
    assert message is not None and message._client is client
    plain = Message(Kind.QUEUE, "jobs", message.sequence, b"x", 1, message.publish_time_ms,
                    message.producer_id, message.lease_deadline_ms)  # fmt: skip
    assert plain == message and hash(plain) == hash(message)
    assert "_client" not in repr(message)
    with pytest.raises(RuntimeError):
        plain.process()


def test_iter_queue_yields_published_messages_and_process_acks_them(client: Client) -> None:
    client.create_queue("jobs")
    client.publish_many_queue("jobs", [f"job-{i}" for i in range(25)])
    seen: list[str] = []
    for message in client.iter_queue("jobs", batch=10, wait_s=1):
        with message.process():
            seen.append(message.text)
        if len(seen) == 25:
            break
    assert seen == [f"job-{i}" for i in range(25)]
    assert client.consume_queue("jobs", timeout_s=0) is None  # every one was acked


def test_process_nacks_on_exception_and_reraises(client: Client) -> None:
    client.create_queue("jobs")
    client.publish_queue("jobs", b"poison")
    message = client.consume_queue("jobs", timeout_s=1)
    assert message is not None
    with pytest.raises(ValueError, match="boom"), message.process():
        raise ValueError("boom")
    again = client.consume_queue("jobs", timeout_s=1)  # nacked: ready again at once
    assert again is not None and again.body == b"poison" and again.delivery_count == 2


def test_iter_topic_yields_in_order_past_the_cursor(client: Client) -> None:
    client.create_topic("news")
    client.subscribe_topic("news")
    client.publish_many_topic("news", [f"n{i}" for i in range(7)])
    seen = []
    for message in client.iter_topic("news", batch=3, wait_s=1):
        with message.process():
            seen.append(message.text)
        if len(seen) == 7:
            break
    assert seen == [f"n{i}" for i in range(7)]


def test_iterator_long_polls_and_ends_cleanly_on_close(broker: Broker) -> None:
    client = Client([f"127.0.0.1:{broker.port}"], call_timeout_s=5)
    client.create_queue("jobs")
    received: list[bytes] = []
    acked = threading.Event()
    ended = threading.Event()

    def consume() -> None:
        for message in client.iter_queue("jobs", wait_s=30):
            received.append(message.body)
            client.ack(message)
            acked.set()
        ended.set()

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    wait_until(lambda: broker.replication.rides >= 1, 5, "the iterator to wait in its long-poll")
    publisher = Client([f"127.0.0.1:{broker.port}"], key=client.key)
    publisher.publish_queue("jobs", b"late")
    wait_until(lambda: received, 5, "the long-poll to hand out the late message")
    assert received == [b"late"]  # the long-poll woke up on the publish
    assert acked.wait(5)  # close while the iterator is back in its long-poll, not mid-ack
    started = time.monotonic()
    client.close()
    assert ended.wait(5), "the iterator did not stop on close()"
    assert time.monotonic() - started < 5
    publisher.close()


def test_iterator_checks_its_arguments_at_once(client: Client) -> None:
    with pytest.raises(errors.InvalidArgument):
        client.iter_queue("bad name")
    with pytest.raises(errors.InvalidArgument):
        client.iter_queue("jobs", batch=501)


def test_stream_holds_at_most_window_unacked_and_each_ack_lets_one_more_in(
    client: Client,
) -> None:
    client.create_queue("jobs")
    client.publish_many_queue("jobs", [f"j{i}" for i in range(20)])
    received: list[Message] = []
    with client.stream_queue("jobs", window=5) as stream:

        def pull() -> None:
            for message in stream:
                received.append(message)

        puller = threading.Thread(target=pull, daemon=True)
        puller.start()
        wait_until(lambda: len(received) >= 5, 10, "the first window of 5 deliveries")
        time.sleep(1.0)  # no sixth may arrive meanwhile: nothing was acked
        assert len(received) == 5
        assert stream.unacked == 5
        client.ack(received[:2])
        client.ack(received[0])  # acking twice grants nothing more
        wait_until(lambda: len(received) >= 7, 10, "2 more deliveries after 2 acks")
        time.sleep(1.0)  # and no eighth meanwhile
        assert len(received) == 7
        for message in list(received[2:]):
            client.ack(message)
        deadline = time.monotonic() + 10
        while len(received) < 20 and time.monotonic() < deadline:
            if stream.unacked:
                client.ack([m for m in received[-5:]])
            time.sleep(0.05)
        assert [m.text for m in received] == [f"j{i}" for i in range(20)]
    puller.join(5)
    assert not puller.is_alive(), "the stream did not end on close()"


def test_stream_process_nack_returns_credit_and_redelivers(client: Client) -> None:
    client.create_queue("jobs")
    client.publish_queue("jobs", b"once")
    with client.stream_queue("jobs", window=1) as stream:
        first = next(stream)
        with pytest.raises(KeyError), first.process():
            raise KeyError("fail")
        second = next(stream)  # the nack granted the credit back
        assert second.body == b"once" and second.delivery_count == 2
        with second.process():
            pass
        assert stream.unacked == 0


def test_stream_a_redelivery_takes_the_place_of_the_expired_delivery_in_the_window(
    broker: Broker, client: Client
) -> None:
    client.create_queue("jobs")
    client.publish_many_queue("jobs", [b"m0", b"m1"])
    with client.stream_queue("jobs", window=3, visibility_timeout_s=0.2) as stream:
        first = [next(stream), next(stream)]
        assert [(m.body, m.delivery_count) for m in first] == [(b"m0", 1), (b"m1", 1)]
        broker.clock.advance(200)  # both leases end; the stream has one credit left
        again = [next(stream), next(stream)]
        assert sorted((m.body, m.delivery_count) for m in again) == [(b"m0", 2), (b"m1", 2)]
        assert stream.unacked == 2  # each redelivery replaced its expired delivery
        with pytest.raises(errors.FailedPrecondition):
            client.ack(first[0])  # the expired delivery: refused, and nothing is freed
        assert stream.unacked == 2
        client.ack(again)
        assert stream.unacked == 0
        # All three credits are back: three new messages come without another ack.
        client.publish_many_queue("jobs", [b"m2", b"m3", b"m4"])
        taken: list[bytes] = []
        taker = threading.Thread(
            target=lambda: taken.extend(next(stream).body for _ in range(3)), daemon=True
        )
        taker.start()
        taker.join(10)
        assert taken == [b"m2", b"m3", b"m4"]


def test_stream_on_a_follower_follows_the_hint_then_raises_when_no_leader_answers(
    broker: Broker,
) -> None:
    with socket.socket() as probe:  # a loopback port nobody serves
        probe.bind(("127.0.0.1", 0))
        closed_address = f"127.0.0.1:{probe.getsockname()[1]}"
    leader = Member("n2", closed_address, "127.0.0.1:1")
    broker.replication.become_follower(leader)
    client = Client(
        [f"127.0.0.1:{broker.port}"], key="k", call_timeout_s=1.5, connect_timeout_s=0.3
    )
    try:
        with client.stream_topic("news") as stream:
            started = time.monotonic()
            with pytest.raises(errors.NoEndpointAvailable) as caught:
                next(stream)
            assert time.monotonic() - started < 5
        assert closed_address in caught.value.attempts
    finally:
        client.close()


def test_stream_raises_typed_errors_at_once(client: Client) -> None:
    with client.stream_queue("missing", window=3) as stream, pytest.raises(errors.NotFound):
        next(stream)
    with pytest.raises(errors.InvalidArgument):
        client.stream_queue("jobs", window=0)


def test_publisher_resolves_futures_in_order_and_stores_each_message_once(
    client: Client,
) -> None:
    client.create_queue("jobs")
    order: list[int] = []
    with client.publisher("jobs", window=300, linger_s=0.001) as publisher:
        futures = [publisher.publish(f"m{i}") for i in range(1200)]
        for index, future in enumerate(futures):
            future.add_done_callback(lambda _, index=index: order.append(index))
            assert publisher.unconfirmed <= 300
    receipts = [future.result(timeout=0) for future in futures]
    assert order == sorted(order)  # callbacks ran in publish order
    assert [receipt.sequence for receipt in receipts] == list(range(1200))
    assert not any(receipt.duplicate for receipt in receipts)
    assert drain(client, "jobs") == [f"m{i}".encode() for i in range(1200)]
    with pytest.raises(RuntimeError):
        publisher.publish(b"after close")


def test_publisher_sends_the_next_batch_while_a_callback_runs(client: Client) -> None:
    """Futures resolve on their own thread: a slow callback of one batch does not hold back
    the sending of the next (the sender used to resolve them itself)."""
    client.create_queue("jobs")
    release = threading.Event()
    with client.publisher("jobs", window=10, linger_s=0) as publisher:
        first = publisher.publish(b"first")
        first.add_done_callback(lambda _: release.wait(30))
        first_receipt = first.result(timeout=10)  # set just before its callback runs
        second = publisher.publish(b"second")
        stored: list[bytes] = []

        def second_stored() -> bool:
            stored.extend(drain(client, "jobs"))
            return b"second" in stored

        wait_until(second_stored, 10, "the second message to be stored", interval_s=0.01)
        assert stored == [b"first", b"second"]  # sent while the first callback still runs
        assert not second.done()  # its future waits its turn
        release.set()
        assert second.result(timeout=10).sequence == first_receipt.sequence + 1


def test_publisher_fails_futures_with_the_typed_error(client: Client) -> None:
    with client.publisher("missing") as publisher:
        futures = [publisher.publish(b"x") for _ in range(3)]
        assert publisher.flush(10)
    for future in futures:
        assert isinstance(future.exception(timeout=0), errors.NotFound)
    with pytest.raises(errors.InvalidArgument):
        client.publisher("jobs", window=0)


def test_publisher_window_bounds_unconfirmed_messages(broker: Broker, client: Client) -> None:
    client.create_queue("jobs")
    broker.replication.become_follower(None)  # nothing commits: the window fills up
    publisher = client.publisher("jobs", window=3, linger_s=0)
    for _ in range(3):
        publisher.publish(b"x")
    blocked = threading.Event()
    done = threading.Event()

    def fourth() -> None:
        blocked.set()
        publisher.publish(b"y")
        done.set()

    threading.Thread(target=fourth, daemon=True).start()
    assert blocked.wait(2)
    assert not done.wait(0.5), "publish did not block with the window full"
    broker.replication.become_leader()
    assert done.wait(15)
    publisher.close(15)


def test_topic_stream_delivers_in_order_and_a_cumulative_ack_returns_all_credit(
    client: Client,
) -> None:
    client.create_topic("news")
    client.subscribe_topic("news")
    client.publish_many_topic("news", [f"n{i}" for i in range(12)])
    with client.stream_topic("news", window=4) as stream:
        first = [next(stream) for _ in range(4)]
        assert [m.text for m in first] == ["n0", "n1", "n2", "n3"]
        assert stream.unacked == 4
        client.ack(first[-1])  # acks n0..n3 at once
        assert stream.unacked == 0
        rest = [next(stream) for _ in range(4)]
        assert [m.text for m in rest] == ["n4", "n5", "n6", "n7"]


def test_acker_acks_a_whole_stream_one_message_at_a_time(client: Client) -> None:
    client.create_queue("jobs")
    client.publish_many_queue("jobs", [f"j{i}" for i in range(1200)])
    seen: list[str] = []
    with client.stream_queue("jobs", window=100) as stream, client.acker() as acker:
        for message in stream:
            seen.append(message.text)
            acker.ack(message)  # returns at once; credit comes back as batches are sent
            if len(seen) == 1200:
                break
    # close() flushed: every ack is applied, so nothing is left to redeliver
    assert sorted(seen) == sorted(f"j{i}" for i in range(1200))
    assert acker.unconfirmed == 0 and acker.refused_batches == 0
    assert next(q.depth for q in client.list_queues() if q.name == "jobs") == 0


def test_acker_gives_stream_credit_back_as_the_acks_leave_not_when_confirmed(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While an Ack call waits for its Raft round, the stream already receives the next
    deliveries: the acked ones left the caller's hands when the acker sent them."""
    client.create_queue("jobs")
    client.publish_many_queue("jobs", [f"j{i}" for i in range(4)])
    release = threading.Event()
    run = client._run

    def held_run(call: Any) -> Any:
        if call.rpc == "Ack":
            assert release.wait(30), "the test never released the ack"
        return run(call)

    monkeypatch.setattr(client, "_run", held_run)
    with client.stream_queue("jobs", window=2) as stream, client.acker() as acker:
        first = [next(stream), next(stream)]
        assert stream.unacked == 2
        for message in first:
            acker.ack(message)
        later = [next(stream), next(stream)]  # would block for good if credit waited
        assert acker.unconfirmed == 2  # the first acks are still in their call
        assert [m.text for m in first + later] == ["j0", "j1", "j2", "j3"]
        release.set()
        for message in later:
            acker.ack(message)
    assert acker.unconfirmed == 0 and acker.refused_batches == 0
    assert next(q.depth for q in client.list_queues() if q.name == "jobs") == 0


def test_acker_overlaps_calls_only_for_a_large_backlog_of_acks(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a trickle one Ack call at a time carries what gathered meanwhile; a second call
    starts beside it only once ACKER_OVERLAP_ACKS_MIN acks wait (or a flush asks).

    Overlap is seen where a call enters `_run`, after the acker took its batch: in the burst a
    small batch taken while nothing was in flight can enter `_run` just after a large one taken
    later (a descheduled thread; it failed so once in a full suite run). So the trickle must
    never overlap, and the burst must overlap with a large batch."""
    client.create_queue("jobs")
    client.publish_many_queue("jobs", [f"j{i}" for i in range(600)])
    messages = client.consume_many_queue("jobs", 500) + client.consume_many_queue("jobs", 100)
    calls: list[tuple[int, int, float]] = []  # (Ack calls in flight before, acks, start)
    in_flight = 0
    lock = threading.Lock()
    run = client._run

    def slow_run(call: Any) -> Any:
        nonlocal in_flight
        if call.rpc != "Ack":
            return run(call)
        with lock:
            calls.append((in_flight, len(call.request.deliveries), time.monotonic()))
            in_flight += 1
        try:
            time.sleep(0.05)  # a slow Raft round: acks pile up behind it
            return run(call)
        finally:
            with lock:
                in_flight -= 1

    monkeypatch.setattr(client, "_run", slow_run)
    with client.acker() as acker:
        for message in messages[:50]:  # a trickle
            acker.ack(message)
            time.sleep(0.002)
        burst_from = time.monotonic()
        for message in messages[50:]:  # a burst
            acker.ack(message)
        wait_until(  # the senders take the burst before the flush at the end
            lambda: sum(count for _, count, _ in list(calls)) == 600, 10, "the burst to be sent"
        )
        flushing_from = time.monotonic()  # leaving the block flushes: small calls may overlap
    assert sum(count for _, count, _ in calls) == 600
    assert len(calls) < 50, f"{len(calls)} calls for 50 trickled acks and a burst"
    trickle = [(beside, count) for beside, count, start in calls if start < burst_from]
    assert trickle and not any(beside for beside, _ in trickle), trickle
    burst = [count for beside, count, start in calls if beside and start < flushing_from]
    assert burst, "the burst never overlapped calls"
    assert max(burst) >= limits.ACKER_OVERLAP_ACKS_MIN
    assert next(q.depth for q in client.list_queues() if q.name == "jobs") == 0


def test_acker_moves_past_an_expired_lease_and_the_message_comes_again(
    broker: Broker, client: Client
) -> None:
    client.create_queue("jobs", visibility_timeout_s=1)
    client.publish_queue("jobs", b"slow")
    message = client.consume_queue("jobs", timeout_s=1)
    assert message is not None
    broker.clock.advance(2000)  # the lease ends before the ack
    with client.acker() as acker:
        acker.ack(message)
        assert acker.flush(timeout_s=10)
        assert acker.refused_batches == 1
    again = client.consume_queue("jobs", timeout_s=2)
    assert again is not None and again.body == b"slow" and again.delivery_count == 2


def test_acker_raises_a_failure_at_flush_and_refuses_after_close(broker: Broker) -> None:
    client = Client([f"127.0.0.1:{broker.port}"], call_timeout_s=1)
    client.create_queue("jobs")
    client.publish_queue("jobs", b"x")
    message = client.consume_queue("jobs", timeout_s=1)
    assert message is not None
    acker = client.acker()
    broker.replication.become_follower(None)  # no leader: the ack cannot land
    acker.ack(message)
    with pytest.raises(errors.ChasquiError):
        acker.flush(timeout_s=30)
    broker.replication.become_leader()
    acker.close(timeout_s=10)
    with pytest.raises(RuntimeError):
        acker.ack(message)
    client.close()
