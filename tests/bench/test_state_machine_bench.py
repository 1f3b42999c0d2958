"""State-machine CPU per message, with no network and no Raft (`pytest -m bench -s`).

Every replica applies every entry on pysyncobj's single tick thread, so the time `apply_entry`
spends per message caps the whole cluster's throughput. This drives `StateMachine.apply_entry`
directly, over a real `LmdbStore` (a `Storage` in a temporary directory, one write transaction
per entry exactly as the node applies it, fsync off so the figure is CPU) and over `MemoryStore`.

Workloads, 256-byte messages, 100 per entry, each measured with the queue or topic holding 0 and
100,000 messages beforehand:

- publish: one `PublishBatch` of 100 with a producer id (so deduplication records are written).
- consume: one queue `Consume` of at most 100.
- ack: one queue `AckBatch` of 100 (what the service makes of an Ack call).
- topic: a topic `PublishBatch` of 100, then a `Consume` of 100, then one cumulative `Ack`.

It prints microseconds per message, from the median entry of each workload (the machine is
shared and noisy; a median shrugs off the entries another process interrupted), and asserts only
that every entry did what it should: speed is compared by reading, not by assertion.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chasqui_node.commands import (
    Ack,
    AckBatch,
    Command,
    Consume,
    CreateQueue,
    CreateTopic,
    CreateUser,
    Deliveries,
    Done,
    Entry,
    Kind,
    PublishBatch,
    Receipts,
    Result,
    StartPosition,
    Subscribe,
)
from chasqui_node.state import MemoryStore, StateMachine
from chasqui_node.storage import Storage

pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]

KEY = "k" * 64
BODY = b"x" * 256
BATCH = 100
ROUNDS = 40  # measured entries per workload
DEPTHS = (0, 100_000)
VISIBILITY_MS = 3_600_000  # leases outlive the run, so nothing is redelivered behind our back

FIGURES: list[tuple[str, int, str, float]] = []


class Rig:
    """One state machine over one store, with a clock that moves 1 ms per entry."""

    def __init__(self, apply: Callable[[Entry], list[Result]]) -> None:
        self.apply_raw = apply
        self.now_ms = 1_000_000
        self.sequence = 0

    def apply(self, *commands: Command) -> list[Result]:
        self.now_ms += 1
        results = self.apply_raw(Entry(self.now_ms, commands))
        assert len(results) == len(commands)
        return results

    def batch(self, kind: Kind, name: str) -> PublishBatch:
        first = self.sequence
        self.sequence += BATCH
        return PublishBatch(
            KEY,
            kind,
            name,
            "producer-1",
            (BODY,) * BATCH,
            tuple(range(first, first + BATCH)),
            (0,) * BATCH,
        )


@pytest.fixture(params=["lmdb", "memory"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    machine = StateMachine()
    if request.param == "memory":
        store = MemoryStore()
        yield Rig(lambda entry: machine.apply_entry(store, entry))
        return
    storage = Storage(tmp_path / "node", fsync=False)
    index = 0

    def apply(entry: Entry) -> list[Result]:
        nonlocal index
        index += 1
        results = storage.apply(index, lambda store: machine.apply_entry(store, entry))
        assert results is not None
        return results

    try:
        yield Rig(apply)
    finally:
        storage.close()


def record(store_kind: str, depth: int, workload: str, seconds: list[float]) -> None:
    per_message_us = statistics.median(seconds) / BATCH * 1e6
    FIGURES.append((store_kind, depth, workload, per_message_us))
    print(f"  {store_kind:6} depth {depth:>7}  {workload:8} {per_message_us:8.2f} us/msg")


@pytest.fixture(scope="module", autouse=True)
def print_table() -> Iterator[None]:
    yield
    print(f"\n\napply_entry, {BATCH} x {len(BODY)}-byte messages per entry, us per message")
    print(f"{'store':6}  {'depth':>7}  {'workload':8}  us/msg")
    for store_kind, depth, workload, per_message_us in FIGURES:
        print(f"{store_kind:6}  {depth:>7}  {workload:8}  {per_message_us:7.2f}")


def check_receipts(result: Result) -> None:
    assert isinstance(result, Receipts), result
    assert len(result.receipts) == BATCH
    assert not any(receipt.duplicate for receipt in result.receipts)


def fill(rig: Rig, kind: Kind, name: str, depth: int) -> None:
    for _ in range(depth // BATCH):
        check_receipts(rig.apply(rig.batch(kind, name))[0])


@pytest.mark.parametrize("depth", DEPTHS)
def test_queue_publish_consume_ack(rig: Rig, depth: int, request: pytest.FixtureRequest) -> None:
    store_kind = request.node.callspec.params["rig"]
    assert rig.apply(CreateUser(KEY, admin=True), CreateQueue(KEY, "q"))[1] is not None
    fill(rig, Kind.QUEUE, "q", depth)
    publish_s: list[float] = []
    consume_s: list[float] = []
    ack_s: list[float] = []
    for _ in range(ROUNDS):
        batch = rig.batch(Kind.QUEUE, "q")
        started = time.perf_counter()
        [receipts] = rig.apply(batch)
        publish_s.append(time.perf_counter() - started)
        check_receipts(receipts)

        consume = Consume(KEY, Kind.QUEUE, "q", BATCH, VISIBILITY_MS)
        started = time.perf_counter()
        [deliveries] = rig.apply(consume)
        consume_s.append(time.perf_counter() - started)
        assert isinstance(deliveries, Deliveries), deliveries
        assert len(deliveries.deliveries) == BATCH

        acks = AckBatch(  # what the service makes of one Ack call
            KEY,
            Kind.QUEUE,
            "q",
            tuple(delivery.sequence for delivery in deliveries.deliveries),
            tuple(delivery.delivery_count for delivery in deliveries.deliveries),
        )
        started = time.perf_counter()
        [result] = rig.apply(acks)
        ack_s.append(time.perf_counter() - started)
        assert isinstance(result, Done), result
    record(store_kind, depth, "publish", publish_s)
    record(store_kind, depth, "consume", consume_s)
    record(store_kind, depth, "ack", ack_s)
    # Everything published during the rounds was consumed and acked: the backlog is intact.
    [empty_or_backlog] = rig.apply(Consume(KEY, Kind.QUEUE, "q", 1, VISIBILITY_MS))
    assert isinstance(empty_or_backlog, Deliveries)
    assert len(empty_or_backlog.deliveries) == (1 if depth else 0)


@pytest.mark.parametrize("depth", DEPTHS)
def test_topic_publish_consume_ack(rig: Rig, depth: int, request: pytest.FixtureRequest) -> None:
    store_kind = request.node.callspec.params["rig"]
    rig.apply(CreateUser(KEY, admin=True), CreateTopic(KEY, "t"))
    fill(rig, Kind.TOPIC, "t", depth)
    # The subscriber starts at the oldest retained message, so it reads `depth` behind the head.
    rig.apply(Subscribe(KEY, Kind.TOPIC, "t", StartPosition.EARLIEST))
    publish_s: list[float] = []
    consume_s: list[float] = []
    ack_s: list[float] = []
    expected_offset = 0
    for _ in range(ROUNDS):
        batch = rig.batch(Kind.TOPIC, "t")
        started = time.perf_counter()
        [receipts] = rig.apply(batch)
        publish_s.append(time.perf_counter() - started)
        check_receipts(receipts)

        consume = Consume(KEY, Kind.TOPIC, "t", BATCH, VISIBILITY_MS, expected_offset)
        started = time.perf_counter()
        [deliveries] = rig.apply(consume)
        consume_s.append(time.perf_counter() - started)
        assert isinstance(deliveries, Deliveries), deliveries
        offsets = [delivery.sequence for delivery in deliveries.deliveries]
        assert offsets == list(range(expected_offset, expected_offset + BATCH))
        expected_offset += BATCH

        ack = Ack(KEY, Kind.TOPIC, "t", offsets[-1], 1)
        started = time.perf_counter()
        [done] = rig.apply(ack)
        ack_s.append(time.perf_counter() - started)
        assert isinstance(done, Done), done
    record(store_kind, depth, "t-pub", publish_s)
    record(store_kind, depth, "t-cons", consume_s)
    record(store_kind, depth, "t-ack", ack_s)
    rounds = [sum(parts) for parts in zip(publish_s, consume_s, ack_s, strict=True)]
    record(store_kind, depth, "topic", rounds)
