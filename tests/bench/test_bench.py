"""Throughput and latency figures of a local 3-node cluster (`make bench`); not part of `make test`.

Each figure comes from real node processes on loopback through `chasqui_client`, printed as one
table at the end. Benchmarks assert nothing about speed (the machine is shared and noisy); they
only check that what they measured was confirmed. Compare ratios measured in the same run.

- W1 sync publish: one message per call, one caller: confirmed msgs/s and p50/p99 latency.
- W2 batched publish: `publish_many_queue` of 100 messages per call from 4 threads.
- W3 consume+ack: `consume_many_queue` of 100 then one ack call for them.
- failover: SIGKILL of the leader, time until the client's next publish is confirmed (p50 and
  p99 over 8 kills; the target is p99 under 1.5 s).
Each runs with `--fsync always` and `--fsync never` so the price of durability is visible.
With `--fsync always` only:
- producers: 1, 4 and 16 concurrent producers (one client each), one confirmed publish per call.
- 1 MiB messages: sync publishes of 1 MiB bodies (MB/s, p50), read back and compared.
- backlog: 1,000,000 messages of 1 KiB into one queue (publish_many, 500 per call), the publish
  rate over the first and the last 100,000, and each node's RSS at the end.
The shared peer harness (W1-W4 beside NATS JetStream and RabbitMQ) is `make bench-peers`.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chasqui_client import Client
from tests.harness import Cluster

pytestmark = [pytest.mark.bench, pytest.mark.timeout(900)]

BODY = b"x" * 256
W1_SECONDS = 5.0
W2_SECONDS = 5.0
W2_THREADS = 4
BATCH = 100
FAILOVER_KILLS = 8

RESULTS: list[tuple[str, str, str]] = []


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def for_seconds(seconds: float, threads: int, step: Callable[[int], int]) -> tuple[int, float]:
    """Run `step(thread)` in a loop on `threads` threads for `seconds`; each call returns the
    messages it moved. Returns (messages, messages per second)."""
    counts = [0] * threads
    stop_at = time.monotonic() + seconds

    def loop(thread: int) -> None:
        while time.monotonic() < stop_at:
            counts[thread] += step(thread)

    started = time.monotonic()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=seconds + 60)
    return sum(counts), sum(counts) / (time.monotonic() - started)


def record(fsync: str, workload: str, figure: str) -> None:
    RESULTS.append((fsync, workload, figure))
    print(f"  {fsync:6} {workload:28} {figure}")


@pytest.fixture(scope="module", autouse=True)
def print_table() -> Iterator[None]:
    yield
    print("\n\nChasqui, 3 nodes on loopback, 256-byte messages")
    print(f"{'fsync':6}  {'workload':28}  figure")
    for fsync, workload, figure in RESULTS:
        print(f"{fsync:6}  {workload:28}  {figure}")


@pytest.fixture(params=["always", "never"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Cluster]]:
    fsync: str = request.param
    running = Cluster(tmp_path, extra_args=["--fsync", fsync])
    try:
        running.start()
        yield fsync, running
    finally:
        running.close()


def test_publish_and_consume_throughput(cluster: tuple[str, Cluster]) -> None:
    fsync, nodes = cluster
    client = nodes.client()
    client.create_queue("bench")
    client.publish_queue("bench", BODY)  # warm up channels and the leader cache

    latencies: list[float] = []
    deadline = time.monotonic() + W1_SECONDS
    started = time.monotonic()
    while time.monotonic() < deadline:
        sent = time.perf_counter()
        client.publish_queue("bench", BODY)
        latencies.append(time.perf_counter() - sent)
    elapsed = time.monotonic() - started
    record(
        fsync,
        "W1 sync publish",
        f"{len(latencies) / elapsed:8.0f} msg/s  p50 {percentile(latencies, 0.5) * 1000:.2f} ms"
        f"  p99 {percentile(latencies, 0.99) * 1000:.2f} ms",
    )

    def publish_batch(_thread: int) -> int:
        client.publish_many_queue("bench", [BODY] * BATCH)
        return BATCH

    published, rate = for_seconds(W2_SECONDS, W2_THREADS, publish_batch)
    record(fsync, f"W2 batched publish x{W2_THREADS}", f"{rate:8.0f} msg/s")

    total = len(latencies) + 1 + published
    consumed = 0
    started = time.monotonic()
    while consumed < total:
        batch = client.consume_many_queue("bench", BATCH, timeout_s=1)
        assert batch, f"queue ran dry after {consumed} of {total}"
        client.ack(batch)
        consumed += len(batch)
    elapsed = time.monotonic() - started
    record(fsync, "W3 consume+ack (100/call)", f"{consumed / elapsed:8.0f} msg/s")


def test_failover_time(cluster: tuple[str, Cluster]) -> None:
    fsync, nodes = cluster
    client: Client = nodes.client(call_timeout_s=10)
    client.create_queue("bench")
    gaps: list[float] = []
    for _ in range(FAILOVER_KILLS):
        client.publish_queue("bench", BODY)
        leader = nodes.wait_for_leader()
        killed_at = time.monotonic()
        nodes.kill(leader)
        client.publish_queue("bench", BODY)
        gaps.append(time.monotonic() - killed_at)
        nodes.start_node(leader)
        nodes.wait_converged(timeout_s=60)
    record(
        fsync,
        f"failover ({FAILOVER_KILLS} leader kills)",
        f"p50 {statistics.median(gaps):.2f} s  p99 {percentile(gaps, 0.99):.2f} s",
    )


@pytest.fixture
def durable(tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(tmp_path, extra_args=["--fsync", "always"])
    try:
        running.start()
        yield running
    finally:
        running.close()


PRODUCER_SECONDS = 5.0


@pytest.mark.parametrize("producers", [1, 4, 16])
def test_concurrent_producers(durable: Cluster, producers: int) -> None:
    clients = [durable.client() for _ in range(producers)]
    clients[0].create_queue("bench")
    for client in clients:
        client.publish_queue("bench", BODY)  # warm up

    def publish_one(thread: int) -> int:
        clients[thread].publish_queue("bench", BODY)
        return 1

    _published, rate = for_seconds(PRODUCER_SECONDS, producers, publish_one)
    record("always", f"producers x{producers} (sync)", f"{rate:8.0f} msg/s")


LARGE_COUNT = 40


@pytest.mark.parametrize("bodies_kind", ["repeated", "random"])
def test_one_mib_messages(durable: Cluster, bodies_kind: str) -> None:
    """Bodies of one repeated byte (they deflate to almost nothing on the Raft wire), or
    random ones (nothing to deflate: the cost of moving, sealing and storing every byte)."""
    client = durable.client(call_timeout_s=60)
    client.create_queue("large")
    size = 1024 * 1024
    if bodies_kind == "repeated":
        bodies = [bytes([i]) * size for i in range(LARGE_COUNT)]
    else:
        bodies = [random.Random(i).randbytes(size) for i in range(LARGE_COUNT)]
    latencies = []
    started = time.monotonic()
    for body in bodies:
        sent = time.perf_counter()
        client.publish_queue("large", body)
        latencies.append(time.perf_counter() - sent)
    elapsed = time.monotonic() - started
    received = []
    while len(received) < LARGE_COUNT:
        batch = client.consume_many_queue("large", 4, timeout_s=5)
        assert batch, f"queue ran dry after {len(received)} of {LARGE_COUNT}"
        received.extend(batch)
        client.ack(batch)
    assert sorted(m.body for m in received) == sorted(bodies)
    record(
        "always",
        f"1 MiB messages, {bodies_kind} (sync)",
        f"{LARGE_COUNT / elapsed:6.1f} msg/s = {LARGE_COUNT / elapsed:.1f} MiB/s"
        f"  p50 {percentile(latencies, 0.5) * 1000:.0f} ms",
    )


BACKLOG = 1_000_000
BACKLOG_BODY = b"b" * 1024
BACKLOG_BATCH = 500
BACKLOG_THREADS = 4


def rss_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process in MB: total, anonymous (heap: what it needs) and
    file-backed (LMDB's memory map: page cache the kernel reclaims under pressure)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def test_million_message_backlog(durable: Cluster) -> None:
    client = durable.client(call_timeout_s=60)
    client.create_queue("backlog")
    lock = threading.Lock()
    published = 0
    marks: dict[int, float] = {}  # messages published -> when

    def produce() -> None:
        nonlocal published
        while True:
            with lock:
                if published >= BACKLOG:
                    return
                published += BACKLOG_BATCH
            client.publish_many_queue("backlog", [BACKLOG_BODY] * BACKLOG_BATCH)
            with lock:
                marks[len(marks) * BACKLOG_BATCH] = time.monotonic()

    started = time.monotonic()
    threads = [threading.Thread(target=produce) for _ in range(BACKLOG_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=3600)
    elapsed = time.monotonic() - started
    depth = next(q.depth for q in client.list_queues() if q.name == "backlog")
    assert depth == BACKLOG
    window = 100_000
    first = window / (marks[window] - started)
    last = window / (marks[BACKLOG - BACKLOG_BATCH] - marks[BACKLOG - BACKLOG_BATCH - window])
    rss = [rss_mb(node.process.pid) for node in durable.nodes.values() if node.process]
    total = ", ".join(f"{memory['VmRSS']:.0f}" for memory in rss)
    anonymous = ", ".join(f"{memory['RssAnon']:.0f}" for memory in rss)
    record(
        "always",
        "1M x 1 KiB backlog",
        f"{BACKLOG / elapsed:8.0f} msg/s; first 100k {first:.0f}, last 100k {last:.0f} msg/s;"
        f" node RSS {total} MB, of which anonymous {anonymous} MB (the rest: LMDB's map)",
    )
