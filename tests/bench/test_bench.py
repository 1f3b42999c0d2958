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
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
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

    counts = [0] * W2_THREADS

    def produce(thread: int, stop_at: float) -> None:
        while time.monotonic() < stop_at:
            client.publish_many_queue("bench", [BODY] * BATCH)
            counts[thread] += BATCH

    stop_at = time.monotonic() + W2_SECONDS
    started = time.monotonic()
    threads = [threading.Thread(target=produce, args=(i, stop_at)) for i in range(W2_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=W2_SECONDS + 60)
    elapsed = time.monotonic() - started
    record(fsync, f"W2 batched publish x{W2_THREADS}", f"{sum(counts) / elapsed:8.0f} msg/s")

    total = len(latencies) + 1 + sum(counts)
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
