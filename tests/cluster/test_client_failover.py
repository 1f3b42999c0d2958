"""The client across leader kills, on three real node processes.

A publisher sends 2,000 messages one call at a time, each to a queue and to a topic, while a
background thread SIGKILLs the leader twice (after about 600 and 1,300 publishes) and restarts
it so a majority stays up. Two topic subscribers (separate users) iterate meanwhile. Afterwards:
every publish call either returned or raised; every confirmed message is consumed from the
queue exactly once and nothing else is; publishes that raised `OutcomeUnknown` appear at most
once; and each subscriber received every confirmed topic message once, in publish order.
"""

from __future__ import annotations

import threading
import time

import pytest

from chasqui_client import Client, Message, errors
from tests.harness import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

TOTAL = 2000
KILL_AFTER = (600, 1300)


class Killer(threading.Thread):
    """SIGKILLs the leader once the publisher passes each mark, then restarts it."""

    def __init__(self, cluster: Cluster, progress: list[int]) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.progress = progress
        self.killed: list[str] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            for mark in KILL_AFTER:
                while self.progress[0] < mark:
                    if self.stop.wait(0.01):
                        return
                leader = self.cluster.wait_for_leader()
                self.cluster.kill(leader)
                self.killed.append(leader)
                self.cluster.wait_for_leader(exclude=leader)
                self.cluster.start_node(leader)
        except BaseException as error:  # reported by the test
            self.error = error


class TopicReader(threading.Thread):
    def __init__(self, client: Client, name: str) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.name = name
        self.received: list[Message] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for message in self.client.iter_topic(self.name, batch=50, wait_s=1):
                self.received.append(message)
                self.client.ack(message)
        except BaseException as error:
            self.error = error


def test_publishes_across_two_leader_kills_are_consumed_exactly_once(cluster: Cluster) -> None:
    options = {"call_timeout_s": 20.0, "attempt_timeout_s": 3.0}
    publisher = cluster.client(**options)
    publisher.create_queue("jobs")
    publisher.create_topic("news")
    readers = []
    for _ in range(2):
        reader_client = cluster.client(**options)
        reader_client.subscribe_topic("news")
        readers.append(TopicReader(reader_client, "news"))
    for reader in readers:
        reader.start()

    progress = [0]
    killer = Killer(cluster, progress)
    killer.start()
    confirmed_queue: list[bytes] = []
    unknown_queue: list[bytes] = []
    confirmed_topic: list[bytes] = []
    unknown_topic: list[bytes] = []
    started = time.monotonic()
    for index in range(TOTAL):
        body = f"m-{index}".encode()
        for publish, confirmed, unknown in (
            (publisher.publish_queue, confirmed_queue, unknown_queue),
            (publisher.publish_topic, confirmed_topic, unknown_topic),
        ):
            try:
                publish("jobs" if confirmed is confirmed_queue else "news", body)
            except errors.OutcomeUnknown:
                unknown.append(body)
            except errors.ChasquiError:
                pass  # refused: must not appear
            else:
                confirmed.append(body)
        progress[0] = index + 1
    killer.stop.set()
    killer.join(60)
    publish_s = time.monotonic() - started
    assert killer.error is None, killer.error
    assert len(killer.killed) == 2, f"only {killer.killed} killed in {publish_s:.1f} s"
    assert len(confirmed_queue) >= TOTAL - 50, "too few publishes confirmed to mean anything"

    # The queue: every confirmed message exactly once, nothing unconfirmed, unknowns at most once.
    drained: list[bytes] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        batch = publisher.consume_many_queue("jobs", 500, timeout_s=1)
        if not batch:
            break
        drained.extend(message.body for message in batch)
        publisher.ack(batch)
    counts: dict[bytes, int] = {}
    for body in drained:
        counts[body] = counts.get(body, 0) + 1
    assert all(counts.get(body) == 1 for body in confirmed_queue), "a confirmed publish is lost"
    assert all(counts[body] == 1 for body in counts), "a message was consumed twice"
    assert set(counts) <= set(confirmed_queue) | set(unknown_queue), "an unpublished message"

    # Each topic reader: every confirmed message once, in publish order.
    topic_published = set(confirmed_topic) | set(unknown_topic)

    def caught_up() -> bool:
        return all(set(confirmed_topic) <= {m.body for m in reader.received} for reader in readers)

    deadline = time.monotonic() + 30
    while not caught_up() and time.monotonic() < deadline:
        assert all(reader.error is None for reader in readers), [r.error for r in readers]
        time.sleep(0.1)
    for reader in readers:
        reader.client.close()
        reader.join(10)
    for reader in readers:
        bodies = [message.body for message in reader.received]
        assert len(bodies) == len(set(bodies)), "a topic message was received twice"
        assert set(confirmed_topic) <= set(bodies), "a confirmed topic message was missed"
        assert set(bodies) <= topic_published
        order = {body: index for index, body in enumerate(b for b in bodies)}
        assert [order[body] for body in confirmed_topic] == sorted(
            order[body] for body in confirmed_topic
        ), "topic messages out of publish order"
    print(
        f"published {TOTAL}x2 in {publish_s:.1f} s; queue unknown {len(unknown_queue)}, "
        f"topic unknown {len(unknown_topic)}"
    )
