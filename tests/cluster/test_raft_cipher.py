"""AES-GCM between nodes, and a rolling upgrade from nodes that speak only Fernet.

Real node processes: n3 first runs as a node from before AES-GCM (tests/cluster/
old_wire_node.py: pysyncobj's plain connections). The cluster must elect, commit and serve
through every pair of nodes, n1 and n2 sealing with AES-GCM between themselves and Fernet to
and from n3, as each node's /metrics says. Then n3 is restarted as a current node, on the
same data, and every link turns to AES-GCM with nothing lost.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Cluster, free_port_block, scrape_metrics, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

OLD_WIRE_MODULE = "tests.cluster.old_wire_node"
PEERS_AES_GCM = ("chasqui_raft_peers_aes_gcm", ())
PEERS_CONNECTED = ("chasqui_raft_peers_connected", ())
LEADER_CHANGES_MAX = 4


@pytest.fixture
def mixed(tmp_path: Path) -> Iterator[tuple[Cluster, dict[str, int]]]:
    cluster = Cluster(tmp_path)
    base = free_port_block(len(cluster.nodes))
    ports = {node_id: base + i for i, node_id in enumerate(cluster.nodes)}
    try:
        for node_id in cluster.nodes:
            cluster.start_node(
                node_id,
                ["--metrics-port", str(ports[node_id])],
                module=OLD_WIRE_MODULE if node_id == "n3" else "chasqui_node.cli",
            )
        cluster.wait_for_leader()
        yield cluster, ports
    finally:
        cluster.close()


def _links(ports: dict[str, int]) -> dict[str, tuple[float, float]]:
    """Per node: (peers connected, peers sent AES-GCM)."""
    links = {}
    for node_id, port in ports.items():
        samples = scrape_metrics(port)
        links[node_id] = (samples[PEERS_CONNECTED], samples[PEERS_AES_GCM])
    return links


def test_rolling_upgrade_from_fernet_only_nodes(mixed: tuple[Cluster, dict[str, int]]) -> None:
    cluster, ports = mixed
    client = cluster.client(call_timeout_s=30)
    client.create_queue("jobs")
    sent = [f"before {i}".encode() for i in range(200)]
    client.publish_many_queue("jobs", sent[:100])
    for body in sent[100:]:
        client.publish_queue("jobs", body)

    expected_mixed = {"n1": (2.0, 1.0), "n2": (2.0, 1.0), "n3": (2.0, 0.0)}
    wait_until(
        lambda: _links(ports) == expected_mixed, 30, f"links {expected_mixed} in a mixed cluster"
    )
    cluster.wait_converged()  # every node applied every entry, whichever cipher carried it

    # Elections over mixed links: kill the leader until the old node leads (its Fernet then
    # goes out to both new nodes), at most a few times; either way a new leader commits.
    for _ in range(LEADER_CHANGES_MAX):
        leader = cluster.wait_for_leader()
        if leader == "n3":
            break
        cluster.kill(leader)
        cluster.wait_for_leader(exclude=leader)
        cluster.start_node(leader, ["--metrics-port", str(ports[leader])])
        body = f"under a new leader, from {leader}".encode()
        client.publish_queue("jobs", body)
        sent.append(body)
    cluster.wait_converged()

    cluster.kill("n3")  # the upgrade: same data, current code
    cluster.start_node("n3", ["--metrics-port", str(ports["n3"])])
    upgraded = {node_id: (2.0, 2.0) for node_id in cluster.nodes}
    wait_until(lambda: _links(ports) == upgraded, 30, "every link on AES-GCM after the upgrade")
    client.publish_many_queue("jobs", [b"after"])
    sent.append(b"after")

    received = []
    while len(received) < len(sent):
        batch = client.consume_many_queue("jobs", 100, timeout_s=5)
        assert batch, f"only {len(received)} of {len(sent)} messages came back"
        received.extend(batch)
        client.ack(batch)
    assert sorted(message.body for message in received) == sorted(sent)
