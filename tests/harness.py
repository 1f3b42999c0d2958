"""Real Chasqui clusters for tests: node processes on 127.0.0.1, each with its own data dir.

Every process is started by this harness, remembered by PID, and stopped by PID in `close()`
(SIGTERM, then SIGKILL), which the fixtures call even when a test fails. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from prometheus_client.parser import text_string_to_metric_families

from chasqui_client import Client
from chasqui_proto import chasqui_pb2 as pb
from chasqui_proto import chasqui_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

STOP_WAIT_S = 10.0
LEADER_WAIT_S = 30.0


def wait_until(
    predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05
) -> T:
    """Poll `predicate` until it returns something truthy; fail naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:  # the condition may be unreachable for a while
            last_error = error
        time.sleep(interval_s)
    raise AssertionError(
        f"timed out after {timeout_s} s waiting for {what} (last error: {last_error})"
    )


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_metrics(port: int) -> Samples:
    """A node's /metrics on 127.0.0.1:`port`, parsed: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(count: int) -> int:
    """A base port such that base..base+count-1 are free now (randomised to avoid reuse races)."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - count)
        if all(_port_is_free(base + offset) for offset in range(count)):
            return base
    raise RuntimeError("no free block of loopback ports found")


@dataclass
class NodeHandle:
    node_id: str
    client_address: str
    raft_address: str
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None
    command_prefix: tuple[str, ...] = ()  # e.g. ("ip", "netns", "exec", NAME)
    # Extra environment of every start of this node (e.g. LD_PRELOAD to skew its clock).
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.data_dir / "node.log"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Cluster:
    """N node processes forming one Raft group: on loopback ports by default, or one node per
    host address (with a command prefix per node, e.g. to run it in a network namespace).
    `environments` gives chosen nodes (by id) extra environment variables on every start,
    restarts included."""

    def __init__(
        self,
        root: Path,
        size: int = 3,
        extra_args: Sequence[str] = (),
        secret: str = "test-secret",
        hosts: Sequence[str] | None = None,
        command_prefixes: Sequence[Sequence[str]] | None = None,
        environments: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.root = root
        self.extra_args = list(extra_args)
        self.secret = secret
        self.nodes: dict[str, NodeHandle] = {}
        base = free_port_block(2 * size) if hosts is None else 0
        for index in range(size):
            node_id = f"n{index + 1}"
            if hosts is None:
                client_address = f"127.0.0.1:{base + index}"
                raft_address = f"127.0.0.1:{base + size + index}"
            else:
                client_address = f"{hosts[index]}:7100"
                raft_address = f"{hosts[index]}:7200"
            self.nodes[node_id] = NodeHandle(
                node_id=node_id,
                client_address=client_address,
                raft_address=raft_address,
                data_dir=root / node_id,
                command_prefix=tuple(command_prefixes[index]) if command_prefixes else (),
                environment=dict((environments or {}).get(node_id, {})),
            )
        unknown = set(environments or {}) - set(self.nodes)
        assert not unknown, f"environments for nodes that do not exist: {sorted(unknown)}"
        self.cluster_arg = ",".join(
            f"{n.node_id}={n.client_address}/{n.raft_address}" for n in self.nodes.values()
        )
        self._clients: list[Client] = []

    # -- processes ---------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [node.client_address for node in self.nodes.values()]

    def start(self) -> Cluster:
        for node_id in self.nodes:
            self.start_node(node_id)
        self.wait_for_leader()
        return self

    def start_node(
        self,
        node_id: str,
        extra_args: Sequence[str] = (),
        *,
        arguments: Sequence[str] | None = None,
        environment: dict[str, str] | None = None,
        module: str = "chasqui_node.cli",
        source: Path = REPO_ROOT,
    ) -> None:
        """Start a node with the usual flags, or with exactly `arguments` after `start`;
        `module` is what `python -m` runs (a test's stand-in for an older node), from the code
        under `source` (another release's, unpacked). Its environment is this process's, the
        node's own (`NodeHandle.environment`), then `environment`."""
        node = self.nodes[node_id]
        assert not node.alive(), f"{node_id} is already running"
        node.data_dir.mkdir(parents=True, exist_ok=True)
        if arguments is None:
            arguments = [
                "--node-id", node_id,
                "--data-dir", str(node.data_dir),
                "--cluster", self.cluster_arg,
                *self.extra_args,
                *extra_args,
            ]  # fmt: skip
        command = [
            *node.command_prefix,
            sys.executable, "-m", module, "start",
            *arguments,
        ]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(source),
            "CHASQUI_CLUSTER_SECRET": self.secret,
            **node.environment,
            **(environment or {}),
        }
        with open(node.log_path, "ab") as log:
            # `python -m` puts its working directory first on the path: run it in `source`.
            node.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=source
            )

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        node = self.nodes[node_id]
        if node.alive():
            assert node.process is not None
            node.process.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                try:
                    node.process.wait(timeout=STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait(timeout=STOP_WAIT_S)

    def stop_node(self, node_id: str) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        self.kill(node_id, signal.SIGTERM)
        process = self.nodes[node_id].process
        return None if process is None else process.returncode

    def restart_node(self, node_id: str) -> None:
        self.kill(node_id)
        self.start_node(node_id)

    def close(self) -> None:
        for client in self._clients:
            client.close()
        for node_id in self.nodes:
            self.kill(node_id, signal.SIGTERM)

    # -- observation -------------------------------------------------------------------------

    def node_status(self, node_id: str, timeout_s: float = 1.0) -> Any:
        with grpc.insecure_channel(self.nodes[node_id].client_address) as channel:
            return pb_grpc.BrokerStub(channel).ClusterStatus(
                pb.ClusterStatusRequest(), timeout=timeout_s
            )

    def statuses(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for node_id, node in self.nodes.items():
            if node.alive():
                with contextlib.suppress(grpc.RpcError):
                    found[node_id] = self.node_status(node_id)
        return found

    def leader_id(self) -> str | None:
        """The node that says it leads, if the running nodes agree on it."""
        statuses = self.statuses()
        leaders = {s.node_id for s in statuses.values() if s.role == "leader"}
        if len(leaders) != 1:
            return None
        (leader,) = leaders
        followers_agree = all(
            s.leader_id == leader for s in statuses.values() if s.role != "candidate"
        )
        return leader if followers_agree else None

    def wait_for_leader(self, timeout_s: float = LEADER_WAIT_S, exclude: str | None = None) -> str:
        def found() -> str | None:
            leader = self.leader_id()
            return leader if leader and leader != exclude else None

        return wait_until(found, timeout_s, "a leader")

    def followers(self) -> list[str]:
        leader = self.wait_for_leader()
        return [
            node_id for node_id, node in self.nodes.items() if node_id != leader and node.alive()
        ]

    def wait_converged(self, timeout_s: float = 30.0) -> int:
        """Wait until every running node has applied the same index as the leader's commit."""

        def converged() -> int | None:
            statuses = self.statuses()
            running = [n for n, node in self.nodes.items() if node.alive()]
            if set(statuses) != set(running):
                return None
            leaders = [s for s in statuses.values() if s.role == "leader"]
            if len(leaders) != 1:
                return None
            commit = leaders[0].commit_index
            if all(s.applied_index == commit for s in statuses.values()):
                return commit
            return None

        return wait_until(converged, timeout_s, "all nodes to apply the same index")

    def client(self, key: str | None = None, **options: Any) -> Client:
        client = Client(self.endpoints, key=key, **options)
        self._clients.append(client)
        return client

    def logs(self) -> dict[str, str]:
        return {
            node_id: node.log_path.read_text(errors="replace") if node.log_path.exists() else ""
            for node_id, node in self.nodes.items()
        }

    def assert_logs_clean(self) -> None:
        """No tracebacks and no pysyncobj wedge or log-truncation warnings on any node."""
        for node_id, text in self.logs().items():
            for marker in ("Traceback", "failed _onTick", "dropping log entries", "CRITICAL"):
                assert marker not in text, f"{node_id} log contains {marker!r}:\n{text[-4000:]}"


def dump_states(cluster: Cluster) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every stopped node's applied state, read straight from its LMDB files.

    A node that did not stop cleanly left its unsynced-state marker: it ran on this machine in
    this boot, so its state is read under the boot id it recorded (it would be kept on a
    restart here), not discarded as after a machine crash."""
    from chasqui_node.storage import BOOT_ID_ENV, UNSYNCED_MARKER, Storage

    states = {}
    for node_id, node in cluster.nodes.items():
        assert not node.alive(), f"stop {node_id} before reading its files"
        marker = node.data_dir / "state" / UNSYNCED_MARKER
        boot = marker.read_text() if marker.exists() else os.environ.get(BOOT_ID_ENV, "")
        saved = os.environ.get(BOOT_ID_ENV)
        os.environ[BOOT_ID_ENV] = boot
        try:
            storage = Storage(node.data_dir)
        finally:
            if saved is None:
                del os.environ[BOOT_ID_ENV]
            else:
                os.environ[BOOT_ID_ENV] = saved
        try:
            states[node_id] = storage.dump_state()
        finally:
            storage.close()
    return states
