"""Membership changes under publish load, with real node processes and `chasqui-node members`.

Proves that while a client publishes without pause, an operator can add a fourth node, remove an
original node, and replace a killed node (remove it, add a fresh node with an empty data dir),
one change at a time, and lose nothing: every publish the client saw confirmed is consumed
exactly once, nothing is consumed twice, and the nodes left at the end hold byte-identical
state. New nodes are started with `--cluster` listing every member, themselves included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chasqui_client import Client
from tests.harness import REPO_ROOT, Cluster, NodeHandle, dump_states, free_port_block, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

ADMIN_KEY = "membership-test-admin-key-0123456789"
ENVIRONMENT = {"CHASQUI_ADMIN_KEY": ADMIN_KEY}
CHANGE_ATTEMPTS_MAX = 20  # a change is refused while the previous one or an election settles


def run_members(cluster: Cluster, *arguments: str) -> str:
    """Run `chasqui-node members ...` against the running nodes until it succeeds."""
    endpoints = ",".join(node.client_address for node in cluster.nodes.values() if node.alive())
    command = [sys.executable, "-m", "chasqui_node.cli", "members", *arguments]
    command += ["--endpoints", endpoints, "--timeout-s", "15"]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **ENVIRONMENT}
    output = ""
    for _ in range(CHANGE_ATTEMPTS_MAX):
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=60, env=environment, check=False
        )
        output = done.stdout + done.stderr
        if done.returncode == 0:
            assert ADMIN_KEY not in output
            return output
        time.sleep(0.5)
    raise AssertionError(f"members {' '.join(arguments)} kept failing:\n{output}")


def member_arg(node: NodeHandle) -> str:
    return f"{node.node_id}={node.client_address}/{node.raft_address}"


def start_member(cluster: Cluster, node: NodeHandle) -> None:
    """Start a node added with `members add`: its --cluster lists every current member."""
    members = ",".join(member_arg(n) for n in cluster.nodes.values() if n.alive() or n is node)
    cluster.start_node(
        node.node_id,
        arguments=["--node-id", node.node_id, "--data-dir", str(node.data_dir),
                   "--cluster", members],
        environment=ENVIRONMENT,
    )  # fmt: skip


def wait_caught_up(cluster: Cluster, node_id: str) -> None:
    leader = cluster.wait_for_leader()
    commit = cluster.node_status(leader).commit_index
    wait_until(
        lambda: cluster.node_status(node_id).applied_index >= commit,
        30,
        f"{node_id} to apply the leader's commit index {commit}",
    )


class Publisher(threading.Thread):
    """Publishes numbered messages until stopped, recording the ones confirmed."""

    def __init__(self, client: Client) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.confirmed: list[bytes] = []
        self.failures = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        number = 0
        while not self.stopping.is_set():
            body = f"m-{number}".encode()
            number += 1
            try:
                self.client.publish_queue("jobs", body)
            except Exception:  # may or may not have committed: only confirmed ones count
                self.failures += 1
                time.sleep(0.05)
                continue
            self.confirmed.append(body)
            time.sleep(0.005)


def test_add_remove_and_replace_members_while_publishing(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    publisher: Publisher | None = None
    try:
        for node_id in list(cluster.nodes):
            cluster.start_node(node_id, environment=ENVIRONMENT)
        cluster.wait_for_leader()
        base = free_port_block(4)
        for index, node_id in enumerate(("n4", "n5")):
            cluster.nodes[node_id] = NodeHandle(
                node_id=node_id,
                client_address=f"127.0.0.1:{base + index}",
                raft_address=f"127.0.0.1:{base + 2 + index}",
                data_dir=tmp_path / node_id,
            )
        admin = cluster.client(key=ADMIN_KEY, call_timeout_s=30)
        # The leader makes the configured key an admin with its first entries.
        wait_until(lambda: admin.whoami().admin, 30, "the admin key to be installed")
        admin.create_queue("jobs")
        publisher = Publisher(admin)
        publisher.start()
        wait_until(lambda: len(publisher.confirmed) >= 20, 30, "the first publishes")

        # Add a fourth node: register it on the leader, then start it.
        output = run_members(cluster, "add", member_arg(cluster.nodes["n4"]))
        assert "added n4" in output and "n4=" in output
        start_member(cluster, cluster.nodes["n4"])
        wait_caught_up(cluster, "n4")

        # Remove one original follower (not n2, which is killed below), then stop it.
        leader = cluster.wait_for_leader()
        removed = next(node_id for node_id in ("n1", "n3") if node_id != leader)
        output = run_members(cluster, "remove", removed)
        assert f"removed {removed}" in output and f"{removed}=" not in output
        cluster.stop_node(removed)
        cluster.wait_for_leader()

        # Replace a killed node with a fresh one.
        cluster.kill("n2", signal.SIGKILL)
        cluster.wait_for_leader()
        run_members(cluster, "remove", "n2")
        run_members(cluster, "add", member_arg(cluster.nodes["n5"]))
        start_member(cluster, cluster.nodes["n5"])
        wait_caught_up(cluster, "n5")
        confirmed_before = len(publisher.confirmed)
        wait_until(
            lambda: len(publisher.confirmed) >= confirmed_before + 20, 30, "publishes after n5"
        )
        publisher.stopping.set()
        publisher.join(timeout=40)
        assert not publisher.is_alive()

        # The new node can lead: every remaining node maps its Raft address to a client one.
        statuses = cluster.statuses()
        remaining = sorted(statuses)
        assert remaining == sorted({"n1", "n3"} - {removed} | {"n4", "n5"})
        leader = cluster.wait_for_leader()
        assert {s.leader_id for s in statuses.values()} == {leader}
        assert {s.leader_address for s in statuses.values()} == {
            cluster.nodes[leader].client_address
        }

        consumed: list[bytes] = []
        for _ in range(10_000):
            batch = admin.consume_many_queue("jobs", 100, timeout_s=1)
            if not batch:
                break
            consumed.extend(message.body for message in batch)
            admin.ack(batch)
        assert len(consumed) == len(set(consumed)), "a message was consumed twice"
        missing = set(publisher.confirmed) - set(consumed)
        assert not missing, f"{len(missing)} confirmed publishes were lost"
        assert len(publisher.confirmed) >= 40

        cluster.wait_converged()
        for node_id in remaining:
            cluster.stop_node(node_id)
        states = dump_states(cluster)
        reference = states[remaining[0]]
        for node_id in remaining[1:]:
            assert states[node_id] == reference, f"{node_id} differs from {remaining[0]}"
        for node_id, text in cluster.logs().items():
            if node_id in remaining:
                for marker in ("Traceback", "failed _onTick", "dropping log entries"):
                    assert marker not in text, f"{node_id} log has {marker!r}:\n{text[-3000:]}"
    finally:
        if publisher is not None:
            publisher.stopping.set()
        cluster.close()
