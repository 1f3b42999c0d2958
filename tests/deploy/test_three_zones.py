"""Three "availability zones" on one host: a network namespace per zone, each joined by a veth pair
to a bridge in the test's own namespace, each with its own 10.x address, and in each one node
started from its rendered bootstrap, with the same ports on every node as on EC2. Each node runs
as Terraform configures it: signup closed with an admin key, and TLS on the client port with a
certificate for the zone's address (from a test CA, made with `chasqui_node.tls`).

The cluster forms, serves a client (the admin's, trusting the CA) through the bridge, and
survives the leader's zone going dark (its link set down, so the node keeps running but nothing
reaches it): the other two elect a leader and accept a publish. When the zone comes back its node
catches up with the others.

The namespaces, veth pairs and bridge are created by the test and deleted afterwards, pass or
fail. The test is skipped, saying why, where they cannot be created (not root, no CAP_NET_ADMIN,
no `ip`) or where the host filters traffic across the bridge.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from chasqui_client import Client
from tests.deploy.conftest import (
    TlsCluster,
    start_bootstrap,
    wait_for_admin,
    write_local_bootstraps,
    write_node_credentials,
)
from tests.harness import Cluster, wait_until

IP_TIMEOUT_S = 10
PROBE_TIMEOUT_S = 5
ZONES = 3
LEADER_WAIT_S = 30
CLIENT_PORT = 7100  # the Terraform defaults: each zone has its own address, so ports repeat
RAFT_PORT = 7200
PROBE_PORT = 7300  # not a node port: the probe's closed connections linger in TIME_WAIT


@dataclass
class Zone:
    namespace: str
    host_link: str  # the bridge-side end of the zone's veth pair, in the test's namespace
    address: str


def ip(*arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        ["ip", *arguments], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
    )
    if check and completed.returncode != 0:
        raise RuntimeError(f"ip {' '.join(arguments)}: {completed.stderr.strip()}")
    return completed


def unused_subnet() -> ipaddress.IPv4Network:
    """A /24 under 10.213.0.0/16 that no address or route on this host overlaps; chosen by PID so
    that concurrent test runs pick different ones."""
    in_use = ip("-4", "-o", "addr", "show").stdout + ip("-4", "route", "show").stdout
    for offset in range(250):
        subnet = ipaddress.ip_network(f"10.213.{(os.getpid() + offset) % 250}.0/24")
        if f"10.213.{subnet.network_address.packed[2]}." not in in_use:
            return subnet
    pytest.skip("no free /24 under 10.213.0.0/16 for the test bridge")


@pytest.fixture
def zones() -> Iterator[list[Zone]]:
    if not sys.platform.startswith("linux") or shutil.which("ip") is None:
        pytest.skip("network namespaces need Linux and iproute2's `ip`")
    suffix = str(os.getpid() % 100_000)
    bridge = f"chqbr{suffix}"
    subnet = unused_subnet()
    hosts = list(subnet.hosts())
    created = [
        Zone(f"chq{suffix}z{k}", f"chq{suffix}v{k}", str(hosts[10 + k]))
        for k in range(1, ZONES + 1)
    ]
    try:
        probe = ip("netns", "add", created[0].namespace, check=False)
        if probe.returncode != 0:
            pytest.skip(f"cannot create network namespaces here: {probe.stderr.strip()}")
        ip("link", "add", bridge, "type", "bridge")
        ip("addr", "add", f"{hosts[0]}/{subnet.prefixlen}", "dev", bridge)
        ip("link", "set", bridge, "up")
        for index, zone in enumerate(created):
            if index > 0:
                ip("netns", "add", zone.namespace)
            inner = f"chq{suffix}n{index + 1}"
            ip("link", "add", zone.host_link, "type", "veth", "peer", "name", inner)
            ip("link", "set", inner, "netns", zone.namespace)
            ip("link", "set", zone.host_link, "master", bridge)
            ip("link", "set", zone.host_link, "up")
            ip("-n", zone.namespace, "link", "set", "lo", "up")
            ip("-n", zone.namespace, "link", "set", inner, "name", "eth0")
            ip(
                "-n",
                zone.namespace,
                "addr",
                "add",
                f"{zone.address}/{subnet.prefixlen}",
                "dev",
                "eth0",
            )
            ip("-n", zone.namespace, "link", "set", "eth0", "up")
        check_reachable(created)
        yield created
    finally:
        for zone in created:
            ip("link", "del", zone.host_link, check=False)
            ip("netns", "del", zone.namespace, check=False)
        ip("link", "del", bridge, check=False)


def check_reachable(zones: list[Zone]) -> None:
    """Skip unless TCP crosses the bridge both from this namespace and between two zones (a host
    firewall with br_netfilter can drop bridged traffic)."""
    listener_code = (
        "import socket, sys\n"
        "s = socket.socket(); s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()\n"
        f"s.settimeout({PROBE_TIMEOUT_S})\n"
        "print('listening', flush=True)\n"
        "for _ in range(2): s.accept()[0].close()\n"
    )
    connect_code = (
        "import socket, sys\n"
        f"socket.create_connection((sys.argv[1], int(sys.argv[2])), {PROBE_TIMEOUT_S}).close()\n"
    )
    target = zones[0]
    listen = ["ip", "netns", "exec", target.namespace, sys.executable, "-c", listener_code]
    listener = subprocess.Popen(
        [*listen, target.address, str(PROBE_PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None
        if listener.stdout.readline().strip() != "listening":
            pytest.skip(f"cannot run Python in a namespace: {listener.communicate()[1][-500:]}")
        for prefix in ([], ["ip", "netns", "exec", zones[1].namespace]):
            connect = subprocess.run(
                [*prefix, sys.executable, "-c", connect_code, target.address, str(PROBE_PORT)],
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT_S + IP_TIMEOUT_S,
                check=False,
            )
            if connect.returncode != 0:
                where = "between zones" if prefix else "from the test's namespace"
                pytest.skip(f"TCP does not cross the test bridge {where} (host firewall?)")
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            listener.wait(timeout=PROBE_TIMEOUT_S)
        if listener.poll() is None:
            listener.kill()
            listener.wait()


@pytest.fixture
def zoned_cluster(
    zones: list[Zone], tmp_path: Path, render: ModuleType
) -> Iterator[tuple[TlsCluster, dict[str, Zone]]]:
    """One node per zone, each run by its rendered bootstrap inside its namespace; stopped by
    PID afterwards (before the fixture above deletes the namespaces)."""
    cluster = TlsCluster(tmp_path / "nodes", size=ZONES, secret="unused: in node.env", ca_pem=b"")
    zone_of = {}
    for (node_id, node), zone in zip(cluster.nodes.items(), zones, strict=True):
        node.client_address = f"{zone.address}:{CLIENT_PORT}"
        node.raft_address = f"{zone.address}:{RAFT_PORT}"
        zone_of[node_id] = zone
    cluster.cluster_arg = render.cluster_string([zone.address for zone in zones])
    assert cluster.cluster_arg == ",".join(
        f"{n.node_id}={n.client_address}/{n.raft_address}" for n in cluster.nodes.values()
    )
    admin_key_file, cluster.ca_pem = write_node_credentials(cluster, tmp_path)
    secret_file = tmp_path / "cluster-secret"
    secret_file.write_text(secrets.token_urlsafe(32) + "\n")
    bootstraps = write_local_bootstraps(
        render, cluster, tmp_path, secret_file, admin_key_file=admin_key_file, tls=True
    )
    try:
        for node_id, bootstrap in bootstraps.items():
            start_bootstrap(
                cluster,
                node_id,
                bootstrap,
                prefix=["ip", "netns", "exec", zone_of[node_id].namespace],
            )
        yield cluster, zone_of
    finally:
        cluster.close()


def reachable_leader(cluster: Cluster, dark: str) -> str | None:
    """The leader that every reachable node (all but `dark`) agrees on, if it is not `dark`."""
    statuses = {
        node_id: status for node_id, status in cluster.statuses().items() if node_id != dark
    }
    leaders = {status.node_id for status in statuses.values() if status.role == "leader"}
    if len(statuses) != ZONES - 1 or len(leaders) != 1:
        return None
    (leader,) = leaders
    agreed = all(status.leader_id == leader for status in statuses.values())
    return leader if agreed and leader != dark else None


@pytest.mark.timeout(150)
def test_three_zones_form_a_cluster_and_survive_one_zone_going_dark(
    zoned_cluster: tuple[TlsCluster, dict[str, Zone]], tmp_path: Path
) -> None:
    cluster, zone_of = zoned_cluster
    first_leader = cluster.wait_for_leader(timeout_s=LEADER_WAIT_S)
    wait_until(lambda: len(cluster.statuses()) == ZONES, LEADER_WAIT_S, "every zone's node")
    admin_key = (tmp_path / "admin.key").read_text().splitlines()[0]
    wait_for_admin(cluster, admin_key, LEADER_WAIT_S)
    client = cluster.client(admin_key)
    client.create_queue("zones")
    client.publish_queue("zones", b"before")
    cluster.wait_converged()

    # The leader's zone goes dark: its node keeps running, but no packet reaches it or leaves.
    ip("link", "set", zone_of[first_leader].host_link, "down")
    started = time.monotonic()
    new_leader = wait_until(
        lambda: reachable_leader(cluster, dark=first_leader), LEADER_WAIT_S, "a leader in two zones"
    )
    assert time.monotonic() - started < LEADER_WAIT_S
    survivors = [
        node.client_address for node in cluster.nodes.values() if node.node_id != first_leader
    ]
    with Client(survivors, admin_key, credentials=cluster.credentials()) as two_zone_client:
        receipt = two_zone_client.publish_queue("zones", b"during")
        assert not receipt.duplicate
        received = [two_zone_client.consume_queue("zones", timeout_s=10) for _ in range(2)]
        assert [message.body for message in received if message] == [b"before", b"during"]
        for message in received:
            assert message is not None
            two_zone_client.ack(message)
    assert new_leader != first_leader

    # The zone comes back: its node learns the new term and catches up with the others.
    ip("link", "set", zone_of[first_leader].host_link, "up")
    commit = cluster.wait_converged(timeout_s=LEADER_WAIT_S)
    assert cluster.node_status(first_leader).applied_index == commit
    cluster.wait_for_leader()
    cluster.assert_logs_clean()
