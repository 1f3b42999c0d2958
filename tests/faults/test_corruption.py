"""Damaged files on one node: the cluster loses nothing, and the damaged node never serves or
votes with bad data.

- A journal whose last record was torn by a crash is cut back to the last whole record; the
  node restarts and catches up from the leader.
- A flipped byte in the middle of the journal, or anywhere in a snapshot, makes the node refuse
  to start (exit code 3, a log line naming the file) instead of serving from it. The operator's
  fix is to empty that node's data directory and start it again: it resyncs from its peers.
Throughout, the two healthy nodes keep serving, and at the end every confirmed message is
there exactly once and all three nodes hold identical state.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from chasqui_client import Client
from tests.harness import Cluster, dump_states, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(tmp_path, extra_args=["--raft-compaction-entries", "40"])
    try:
        running.start()
        yield running
    finally:
        running.close()


def publish(client: Client, prefix: str, count: int) -> list[bytes]:
    bodies = [f"{prefix}-{i}".encode() for i in range(count)]
    for body in bodies:
        client.publish_queue("jobs", body)
    return bodies


def finish(cluster: Cluster, client: Client, expected: list[bytes]) -> None:
    found: list[bytes] = []
    for _ in range(100):
        batch = client.consume_many_queue("jobs", 100, timeout_s=0.5)
        if not batch:
            break
        found.extend(m.body for m in batch)
        client.ack(batch)
    assert sorted(found) == sorted(expected), "confirmed messages lost or duplicated"
    cluster.wait_converged(timeout_s=60)
    cluster.close()
    states = list(dump_states(cluster).values())
    assert all(state == states[0] for state in states), "replicas differ"


def last_segment(node_dir: Path) -> Path:
    return sorted((node_dir / "journal").glob("segment-*.log"))[-1]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def wait_for_exit(cluster: Cluster, node_id: str) -> int:
    process = cluster.nodes[node_id].process
    assert process is not None
    code = wait_until(lambda: process.poll(), 30, f"{node_id} to refuse to start")
    return int(code)


def test_a_torn_journal_tail_is_cut_back_and_the_node_catches_up(cluster: Cluster) -> None:
    client = cluster.client()
    client.create_queue("jobs")
    sent = publish(client, "a", 30)
    victim = cluster.followers()[0]
    cluster.kill(victim, signal.SIGKILL)
    segment = last_segment(cluster.nodes[victim].data_dir)
    with open(segment, "r+b") as file:  # a crash in mid-append leaves half a record
        file.truncate(segment.stat().st_size - 7)
    sent += publish(client, "b", 30)
    cluster.start_node(victim)
    cluster.wait_converged(timeout_s=60)
    assert "cutting the tail back" in cluster.nodes[victim].log_path.read_text()
    finish(cluster, client, sent)


@pytest.mark.parametrize("damage", ["journal-middle", "snapshot"])
def test_a_node_with_corrupt_files_refuses_to_start_and_resyncs_when_wiped(
    cluster: Cluster, damage: str
) -> None:
    client = cluster.client()
    client.create_queue("jobs")
    sent = publish(client, "a", 60)  # past 40 entries: every node has a snapshot
    victim = cluster.followers()[0]
    node_dir = cluster.nodes[victim].data_dir
    wait_until(lambda: (node_dir / "raft.snapshot").exists(), 30, "a snapshot on the victim")
    cluster.kill(victim, signal.SIGKILL)
    if damage == "snapshot":
        snapshot = node_dir / "raft.snapshot"
        flip_byte(snapshot, snapshot.stat().st_size // 2)
        expected_message = "snapshot"
    else:
        segment = last_segment(node_dir)
        assert segment.stat().st_size > 200, "not enough journal to damage its middle"
        flip_byte(segment, 60)  # inside an early record, with valid records after it
        expected_message = "journal"

    sent += publish(client, "b", 10)  # the healthy majority keeps confirming
    cluster.start_node(victim)
    assert wait_for_exit(cluster, victim) == 3
    log = cluster.nodes[victim].log_path.read_text()
    assert "refusing to start" in log and expected_message in log

    # Operator's procedure: empty the damaged node's data directory; it resyncs from peers.
    shutil.rmtree(node_dir)
    cluster.start_node(victim)
    sent += publish(client, "c", 10)
    cluster.wait_converged(timeout_s=60)
    finish(cluster, client, sent)
