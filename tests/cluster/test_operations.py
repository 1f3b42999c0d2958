"""Operability of real node processes: /metrics, gRPC health, reflection and JSON logs.

Three nodes run with `--metrics-port`, `--log-format json`, debug logging, a random cluster
secret and an admin key (so queue depths can be read). The tests scrape each node's /metrics
over HTTP and parse it with prometheus_client's parser, call the standard health service, list
services through reflection, and read every log line back as JSON, checking that no secret or
key appears in any of them. Health under isolation is proved by SIGSTOPping (then SIGKILLing)
a node's peers and watching it go NOT_SERVING within a few seconds, and SERVING again when its
peers come back. Every process is stopped by PID afterwards, and stopped ones are continued
first.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chasqui_proto import chasqui_pb2 as pb
from chasqui_proto import chasqui_pb2_grpc as pb_grpc
from tests.harness import (
    REPO_ROOT,
    Cluster,
    Samples,
    free_port_block,
    scrape_metrics,
    wait_until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

BROKER = "chasqui.v1.Broker"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NOT_SERVING_WITHIN_S = 8.0  # leader fallback 1.5 s, an election timeout, two health checks


class OperatedCluster:
    def __init__(self, cluster: Cluster, metrics_ports: dict[str, int], admin_key: str) -> None:
        self.cluster = cluster
        self.metrics_ports = metrics_ports
        self.admin_key = admin_key

    def scrape(self, node_id: str) -> Samples:
        return scrape_metrics(self.metrics_ports[node_id])

    def health(self, node_id: str, service: str = "") -> int:
        address = self.cluster.nodes[node_id].client_address
        with grpc.insecure_channel(address) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        status: int = answer.status
        return status

    def stub(self, node_id: str) -> Any:
        channel = grpc.insecure_channel(self.cluster.nodes[node_id].client_address)
        return pb_grpc.BrokerStub(channel)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
def operated(tmp_path: Path) -> Iterator[OperatedCluster]:
    admin_key = secrets.token_urlsafe(24)
    cluster = Cluster(
        tmp_path,
        extra_args=["--log-format", "json", "--log-level", "debug"],
        secret=secrets.token_urlsafe(32),
    )
    base = free_port_block(len(cluster.nodes))
    ports = {node_id: base + i for i, node_id in enumerate(cluster.nodes)}
    # Each source of the setting once: n1 the flag, n2 the environment, n3 a TOML file.
    config_file = tmp_path / "n3.toml"
    config_file.write_text(f"metrics_port = {ports['n3']}\n")
    sources: dict[str, tuple[list[str], dict[str, str]]] = {
        "n1": (["--metrics-port", str(ports["n1"])], {}),
        "n2": ([], {"CHASQUI_METRICS_PORT": str(ports["n2"])}),
        "n3": (["--config", str(config_file)], {}),
    }
    try:
        for node_id in cluster.nodes:
            arguments, environment = sources[node_id]
            cluster.start_node(
                node_id, arguments, environment={"CHASQUI_ADMIN_KEY": admin_key, **environment}
            )
        cluster.wait_for_leader()
        yield OperatedCluster(cluster, ports, admin_key)
    finally:
        for node in cluster.nodes.values():  # a stopped process would ignore SIGTERM
            if node.alive() and node.process is not None:
                node.process.send_signal(signal.SIGCONT)
        cluster.close()


def _wait_admin(operated: OperatedCluster) -> Any:
    def admin_ready() -> Any:
        stub = operated.stub(operated.cluster.wait_for_leader())
        answer = stub.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(operated.admin_key), timeout=2)
        return stub if answer.admin else None

    return wait_until(admin_ready, 30, "the bootstrap admin to be registered")


def test_metrics_health_reflection_and_logs_on_real_nodes(operated: OperatedCluster) -> None:
    cluster = operated.cluster
    stub = _wait_admin(operated)
    user_key = stub.CreateUser(pb.CreateUserRequest(), timeout=5).key
    user = bearer(user_key)
    stub.CreateQueue(pb.CreateQueueRequest(name="jobs"), metadata=user, timeout=5)
    for sequence in range(1, 6):
        stub.Publish(
            pb.PublishRequest(
                kind=pb.QUEUE, name="jobs", body=b"x", producer_id="p", sequence=sequence
            ),
            metadata=user,
            timeout=5,
        )
    deliveries = stub.Consume(
        pb.ConsumeRequest(kind=pb.QUEUE, name="jobs", max_messages=2), metadata=user, timeout=5
    ).deliveries
    assert len(deliveries) == 2
    first = deliveries[0]
    stub.Ack(
        pb.AckRequest(
            deliveries=[
                pb.DeliveryRef(
                    kind=first.kind,
                    name=first.name,
                    sequence=first.sequence,
                    delivery_count=first.delivery_count,
                )
            ]
        ),
        metadata=user,
        timeout=5,
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.Publish(pb.PublishRequest(kind=pb.QUEUE, name="nowhere"), metadata=user, timeout=5)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    cluster.wait_converged()

    # -- metrics: one leader, counters on it, gauges and depths on every node
    leader = cluster.wait_for_leader()
    scraped = {node_id: operated.scrape(node_id) for node_id in cluster.nodes}
    roles = {n: s for n, s in scraped.items() if value(s, "chasqui_raft_role", role="leader")}
    assert list(roles) == [leader]
    on_leader = scraped[leader]
    assert value(on_leader, "chasqui_messages_published_total", kind="queue") == 5
    assert value(on_leader, "chasqui_messages_consumed_total", kind="queue") == 2
    assert value(on_leader, "chasqui_messages_acked_total", kind="queue") == 1
    assert value(on_leader, "chasqui_rpc_requests_total", method="Publish", code="OK") == 5
    assert value(on_leader, "chasqui_rpc_requests_total", method="Publish", code="NOT_FOUND") == 1
    assert value(on_leader, "chasqui_rpc_duration_seconds_count", method="Consume") == 1
    for node_id, samples in scraped.items():
        assert value(samples, "chasqui_node_info", node_id=node_id) == 1
        assert value(samples, "chasqui_raft_leader_known") == 1, node_id
        assert value(samples, "chasqui_raft_peers") == 2
        assert value(samples, "chasqui_raft_term") >= 1
        assert value(samples, "chasqui_raft_applied_index") > 0
        assert value(samples, "chasqui_journal_fsync_duration_seconds_count") > 0, node_id
        assert value(samples, "chasqui_queue_depth", queue="jobs") == 4, node_id
    assert value(on_leader, "chasqui_raft_peers_connected") == 2
    assert value(on_leader, "chasqui_raft_has_quorum") == 1

    # -- health and reflection
    for node_id in cluster.nodes:
        for service in ("", BROKER):
            wait_until(
                lambda n=node_id, s=service: operated.health(n, s) == SERVING,
                10,
                f"{node_id} {service!r} SERVING",
            )
    with grpc.insecure_channel(cluster.nodes[leader].client_address) as channel:
        listing = next(
            reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        )
    names = {service.name for service in listing.list_services_response.service}
    assert {BROKER, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names

    # -- logs: JSON, one event per line, and never a secret or a key
    for node_id in cluster.nodes:
        cluster.stop_node(node_id)
    for node_id, text in cluster.logs().items():
        lines = text.splitlines()
        assert lines, f"{node_id} wrote no log"
        for line in lines:
            event = json.loads(line)  # every line is one JSON event
            assert {"ts", "level", "logger", "message", "node_id"} <= set(event), line
            assert event["node_id"] == node_id
        for secret, what in [
            (cluster.secret, "cluster secret"),
            (operated.admin_key, "admin key"),
            (user_key, "user key"),
        ]:
            assert secret not in text, f"{node_id} logged the {what}"
        assert any("serving clients on" in json.loads(line)["message"] for line in lines)
        assert "Traceback" not in text


def test_a_node_cut_off_from_its_peers_goes_not_serving(operated: OperatedCluster) -> None:
    cluster = operated.cluster
    leader = cluster.wait_for_leader()
    for node_id in cluster.nodes:
        wait_until(
            lambda n=node_id: operated.health(n, BROKER) == SERVING, 10, f"{node_id} SERVING"
        )
    followers = [node_id for node_id in cluster.nodes if node_id != leader]

    # The leader's peers freeze: it loses its majority, steps down, and knows no leader.
    for node_id in followers:
        cluster.kill(node_id, signal.SIGSTOP)
    wait_until(
        lambda: operated.health(leader, BROKER) == operated.health(leader) == NOT_SERVING,
        NOT_SERVING_WITHIN_S,
        f"the isolated {leader} to report NOT_SERVING",
    )
    assert value(operated.scrape(leader), "chasqui_raft_leader_known") == 0

    # They come back: a leader is elected and every node serves again.
    for node_id in followers:
        cluster.kill(node_id, signal.SIGCONT)
    for node_id in cluster.nodes:
        wait_until(lambda n=node_id: operated.health(n) == SERVING, 30, f"{node_id} SERVING again")

    # Two nodes die: the survivor can never know a leader again.
    survivor = followers[0]
    for node_id in cluster.nodes:
        if node_id != survivor:
            cluster.kill(node_id, signal.SIGKILL)
    wait_until(
        lambda: operated.health(survivor, BROKER) == NOT_SERVING,
        NOT_SERVING_WITHIN_S,
        f"{survivor}, alone, to report NOT_SERVING",
    )
    # (Had the survivor been leading, it reports no quorum at once and steps down shortly.)
    wait_until(
        lambda: value(operated.scrape(survivor), "chasqui_raft_leader_known") == 0,
        NOT_SERVING_WITHIN_S,
        f"{survivor} to know no leader",
    )
    assert operated.health(survivor) == NOT_SERVING


def test_dev_gives_each_node_a_metrics_endpoint_and_prints_it(tmp_path: Path) -> None:
    base = free_port_block(3)
    command = [
        sys.executable, "-m", "chasqui_node.cli", "dev",
        "--nodes", "1",
        "--data-dir", str(tmp_path),
        "--client-port", str(base),
        "--raft-port", str(base + 1),
        "--metrics-port", str(base + 2),
        "--log-format", "json",
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environment)
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(2)]
        url = f"http://127.0.0.1:{base + 2}/metrics"
        assert f"metrics {url}" in lines[1], lines

        def leading() -> bool:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return 'chasqui_raft_role{role="leader"} 1.0' in answer.read().decode()

        wait_until(leading, 30, "the dev node to lead and say so on /metrics")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    log_lines = (tmp_path / "n1" / "node.log").read_text().splitlines()
    assert log_lines and all(json.loads(line)["node_id"] == "n1" for line in log_lines)
