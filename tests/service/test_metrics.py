"""Metrics, health and reflection on an in-process server over the fake replicator.

The server here is wired as server.py wires a node: a `BrokerService` counting into its own
`NodeMetrics`, the scrape-time collector, the `/metrics` HTTP endpoint on port 0, the standard
health service driven by a `HealthReporter`, and reflection. Tests make real gRPC calls, then
scrape real HTTP and parse the text with prometheus_client's own parser, so what they check is
what Prometheus would see: counters move after calls, refusals are counted by status code,
gauges follow the replicator, queue depths stay bounded, and health follows leadership.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from chasqui_node.journal import Journal
from chasqui_node.long_poll import ChangeBoard
from chasqui_node.metrics import (
    MetricsHttpServer,
    NodeMetrics,
    QueueDepthReader,
    register_node_collector,
)
from chasqui_node.replication import Member, PeerStatus, ReplicationStatus, Role
from chasqui_node.server import (
    BROKER_SERVICE_NAME,
    HealthReporter,
    add_health_and_reflection,
    is_serving,
)
from chasqui_node.service import BrokerService, hash_key
from chasqui_node.state import MemoryStore, StateMachine
from chasqui_node.wire import add_broker_to_server
from chasqui_proto import chasqui_pb2 as pb
from chasqui_proto import chasqui_pb2_grpc as pb_grpc
from tests.harness import wait_until
from tests.service.conftest import NODE, FakeClock, FakeReplication
from tests.service.support import Metadata, create_queue, publish, refusal

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Node:
    stub: pb_grpc.BrokerStub
    channel: grpc.Channel
    replication: FakeReplication
    metrics: NodeMetrics
    metrics_port: int
    health: HealthReporter
    reader: Metadata  # the identity queue depths are read as (the node's "admin")

    def scrape(self) -> Samples:
        """Every sample on /metrics, keyed by (name, sorted labels)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def health_of(self, service: str) -> int:
        answer = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        status: int = answer.status
        return status


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def node() -> Iterator[Node]:
    state_machine = StateMachine()
    change_board = ChangeBoard()
    replication = FakeReplication(
        state_machine, MemoryStore(), change_board, FakeClock(int(time.time() * 1000))
    )
    metrics = NodeMetrics()
    server = grpc.server(ThreadPoolExecutor(max_workers=16), options=[("grpc.so_reuseport", 0)])
    add_broker_to_server(
        BrokerService(
            replication, state_machine, change_board, proposal_timeout_s=2.0, metrics=metrics
        ),
        server,
    )
    health = add_health_and_reflection(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.BrokerStub(channel)
    reader_key = stub.CreateUser(pb.CreateUserRequest(), timeout=5).key
    register_node_collector(
        metrics, NODE.node_id, replication, state_machine, reader_key_hash=hash_key(reader_key)
    )
    http = MetricsHttpServer(metrics.registry, "127.0.0.1", 0)
    reporter = HealthReporter(health, replication.status, interval_s=0.05)
    reporter.start()
    try:
        yield Node(
            stub,
            channel,
            replication,
            metrics,
            http.port,
            reporter,
            (("authorization", f"Bearer {reader_key}"),),
        )
    finally:
        reporter.stop()
        http.close()
        channel.close()
        server.stop(grace=None).wait(5)


# -- counters and histograms -----------------------------------------------------------------


def test_calls_and_messages_are_counted_by_method_and_kind(node: Node) -> None:
    user = node.reader
    before = node.scrape()
    create_queue(node.stub, user, "jobs")
    for number in range(3):
        publish(node.stub, user, "jobs", producer_id="p", sequence=number + 1)
    publish(node.stub, user, "jobs", producer_id="p", sequence=1)  # a retried duplicate
    node.stub.PublishBatch(
        pb.PublishBatchRequest(
            kind=pb.QUEUE,
            name="jobs",
            items=[pb.PublishBatchRequest.Item(body=b"a"), pb.PublishBatchRequest.Item(body=b"b")],
        ),
        metadata=user,
        timeout=5,
    )
    deliveries = node.stub.Consume(
        pb.ConsumeRequest(kind=pb.QUEUE, name="jobs", max_messages=4), metadata=user, timeout=5
    ).deliveries
    assert len(deliveries) == 4
    node.stub.Ack(
        pb.AckRequest(
            deliveries=[
                pb.DeliveryRef(
                    kind=d.kind, name=d.name, sequence=d.sequence, delivery_count=d.delivery_count
                )
                for d in deliveries[:3]
            ]
        ),
        metadata=user,
        timeout=5,
    )
    after = node.scrape()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("chasqui_rpc_requests_total", method="Publish", code="OK") == 4
    assert moved("chasqui_rpc_requests_total", method="CreateQueue", code="OK") == 1
    assert moved("chasqui_rpc_duration_seconds_count", method="Publish") == 4
    assert moved("chasqui_rpc_duration_seconds_sum", method="Publish") > 0
    assert moved("chasqui_messages_published_total", kind="queue") == 5  # the duplicate is not
    assert moved("chasqui_messages_consumed_total", kind="queue") == 4
    assert moved("chasqui_messages_acked_total", kind="queue") == 3


def test_refusals_are_counted_by_status_code(node: Node) -> None:
    refusal(node.stub.Publish, pb.PublishRequest(kind=pb.QUEUE, name="nowhere", body=b"x"))
    refusal(
        node.stub.Publish,
        pb.PublishRequest(kind=pb.QUEUE, name="nowhere", body=b"x"),
        node.reader,
        grpc.StatusCode.NOT_FOUND,
    )
    refusal(
        node.stub.CreateQueue,
        pb.CreateQueueRequest(name=""),
        node.reader,
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    node.replication.become_follower(None)
    refusal(
        node.stub.CreateQueue,
        pb.CreateQueueRequest(name="jobs"),
        node.reader,
        grpc.StatusCode.UNAVAILABLE,
    )
    samples = node.scrape()
    for method, code in [
        ("Publish", "UNAUTHENTICATED"),
        ("Publish", "NOT_FOUND"),
        ("CreateQueue", "INVALID_ARGUMENT"),
        ("CreateQueue", "UNAVAILABLE"),
    ]:
        assert value(samples, "chasqui_rpc_requests_total", method=method, code=code) == 1, (
            method,
            code,
        )
    assert value(samples, "chasqui_messages_published_total", kind="queue") == 0


def test_a_consume_stream_counts_its_deliveries_and_its_end(node: Node) -> None:
    create_queue(node.stub, node.reader, "jobs")
    for number in range(2):
        publish(node.stub, node.reader, "jobs", producer_id="p", sequence=number + 1)
    call = node.stub.ConsumeStream(
        iter([pb.ConsumeStreamRequest(kind=pb.QUEUE, name="jobs", credit=2)]),
        metadata=node.reader,
        timeout=10,
    )
    received = 0
    for response in call:
        received += len(response.deliveries)
        if received == 2:
            break
    call.cancel()

    def stream_ended() -> Samples | None:
        samples = node.scrape()
        ended = sum(
            count
            for (name, labels), count in samples.items()
            if name == "chasqui_rpc_requests_total" and ("method", "ConsumeStream") in labels
        )
        return samples if ended == 1 else None

    samples = wait_until(stream_ended, 5, "the stream to be counted")
    assert value(samples, "chasqui_messages_consumed_total", kind="queue") == 2


def test_two_nodes_in_one_process_keep_their_series_apart() -> None:
    first, second = NodeMetrics(), NodeMetrics()
    first.observe_call("Publish", grpc.StatusCode.OK, 0.01)
    assert (
        first.registry.get_sample_value(
            "chasqui_rpc_requests_total", {"method": "Publish", "code": "OK"}
        )
        == 1
    )
    assert (
        second.registry.get_sample_value(
            "chasqui_rpc_requests_total", {"method": "Publish", "code": "OK"}
        )
        is None
    )


def test_journal_reports_each_fsync_to_its_on_sync_hook(tmp_path: Path) -> None:
    metrics = NodeMetrics()
    journal = Journal(tmp_path / "journal", on_sync=metrics.observe_journal_sync)
    try:
        journal.append(b"one", 1, 1)
        journal.sync()
        journal.sync()  # nothing new written: no fsync, nothing observed
        journal.append(b"two", 2, 1)
        journal.sync()
    finally:
        journal.close()
    assert metrics.registry.get_sample_value("chasqui_journal_fsync_duration_seconds_count") == 2
    assert (
        metrics.registry.get_sample_value("chasqui_journal_fsync_duration_seconds_sum") or 0
    ) > 0


def test_a_journal_without_fsync_observes_nothing(tmp_path: Path) -> None:
    seen: list[float] = []
    journal = Journal(tmp_path / "journal", fsync=False, on_sync=seen.append)
    try:
        journal.append(b"one", 1, 1)
        journal.sync()
    finally:
        journal.close()
    assert seen == []


# -- scrape-time gauges ----------------------------------------------------------------------


def test_status_gauges_follow_the_replicator(node: Node) -> None:
    create_queue(node.stub, node.reader, "jobs")
    samples = node.scrape()
    status = node.replication.status()
    assert value(samples, "chasqui_node_info", node_id="n1") == 1
    assert value(samples, "chasqui_raft_role", role="leader") == 1
    assert value(samples, "chasqui_raft_role", role="follower") == 0
    assert value(samples, "chasqui_raft_term") == 3
    assert value(samples, "chasqui_raft_commit_index") == status.commit_index > 0
    assert value(samples, "chasqui_raft_applied_index") == status.applied_index
    assert value(samples, "chasqui_raft_apply_lag") == 0
    assert value(samples, "chasqui_raft_leader_known") == 1
    node.replication.become_follower(None)
    samples = node.scrape()
    assert value(samples, "chasqui_raft_role", role="follower") == 1
    assert value(samples, "chasqui_raft_leader_known") == 0


def test_queue_depths_are_read_at_scrape_time(node: Node) -> None:
    create_queue(node.stub, node.reader, "jobs")
    create_queue(node.stub, node.reader, "mail")
    for number in range(3):
        publish(node.stub, node.reader, "jobs", producer_id="p", sequence=number + 1)
    node.stub.Consume(
        pb.ConsumeRequest(kind=pb.QUEUE, name="jobs", max_messages=1),
        metadata=node.reader,
        timeout=5,
    )
    samples = node.scrape()
    assert value(samples, "chasqui_queues") == 2
    assert value(samples, "chasqui_queue_depth", queue="jobs") == 3
    assert value(samples, "chasqui_queue_in_flight", queue="jobs") == 1
    assert ("chasqui_queue_depth", (("queue", "mail"),)) in samples
    assert value(samples, "chasqui_queue_depth", queue="mail") == 0
    assert not any(name == "chasqui_queue_depths_skipped" for name, _ in samples)


def _reader(node: Node, key_hash: str | None, **bounds: int) -> QueueDepthReader:
    return QueueDepthReader(node.replication, StateMachine(), key_hash, **bounds)


def test_queue_depths_are_skipped_without_an_identity_or_past_their_bounds(node: Node) -> None:
    for name in ("a", "b", "c"):
        create_queue(node.stub, node.reader, name)
    key_hash = hash_key(node.reader[0][1].removeprefix("Bearer "))
    assert _reader(node, None).read() == (None, "no_admin_key")
    assert _reader(node, hash_key("not-a-user-key-at-all")).read() == (None, "unreadable")
    # Exactly at the queue bound is fine; one over is skipped.
    queues, reason = _reader(node, key_hash, queues_max=3).read()
    assert queues is not None and len(queues) == 3 and reason == ""
    assert _reader(node, key_hash, queues_max=2).read() == (None, "too_many_queues")
    # A listing that would read more rows than its budget stops early.
    assert _reader(node, key_hash, scan_rows_max=2).read() == (None, "too_many_rows")


# -- health ----------------------------------------------------------------------------------

PEER = Member("n3", "127.0.0.1:7403", "127.0.0.1:7503")


def _status(**fields: object) -> ReplicationStatus:
    base: dict[str, object] = {
        "node_id": "n1",
        "role": Role.FOLLOWER,
        "term": 2,
        "leader": PEER,
        "commit_index": 500,
        "applied_index": 500,
        "log_length": 500,
        "has_quorum": True,
        "peers": (PeerStatus(PEER, True, 0),),
    }
    base.update(fields)
    return ReplicationStatus(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "serving"),
    [
        ({}, True),
        ({"leader": None}, False),
        ({"has_quorum": False}, False),  # a follower that sees no majority
        ({"peers": (PeerStatus(PEER, False, 0),)}, False),  # names a leader it cannot reach
        ({"leader": Member("n9", "h:1", "h:2")}, False),  # a leader not among its peers
        ({"role": Role.CANDIDATE, "leader": None}, False),
        ({"role": Role.LEADER, "leader": NODE, "has_quorum": True}, True),
        ({"role": Role.LEADER, "leader": NODE, "has_quorum": False}, False),
        ({"applied_index": 401}, True),  # just under the lag bound
        ({"applied_index": 400}, True),  # exactly at it
        ({"applied_index": 399}, False),  # just over it
    ],
)
def test_serving_needs_a_leader_and_an_applied_index_caught_up(
    fields: dict[str, object], serving: bool
) -> None:
    assert is_serving(_status(**fields), apply_lag_max=100) is serving


def test_health_follows_leadership_and_ends_not_serving(node: Node) -> None:
    for service in ("", BROKER_SERVICE_NAME):
        wait_until(
            lambda service=service: node.health_of(service) == SERVING, 5, f"{service!r} SERVING"
        )
    node.replication.become_follower(None)
    wait_until(lambda: node.health_of(BROKER_SERVICE_NAME) == NOT_SERVING, 5, "NOT_SERVING")
    assert node.health_of("") == NOT_SERVING
    node.replication.become_leader()
    wait_until(lambda: node.health_of("") == SERVING, 5, "SERVING again")
    node.health.stop()
    assert node.health_of("") == NOT_SERVING
    assert node.health_of(BROKER_SERVICE_NAME) == NOT_SERVING
    node.health.update()  # a late evaluation cannot bring a stopping node back
    assert node.health_of("") == NOT_SERVING


def test_an_unknown_service_is_not_found_by_health(node: Node) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        node.health_of("chasqui.v1.Nothing")
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


# -- reflection ------------------------------------------------------------------------------


def test_reflection_lists_the_broker_and_health_services(node: Node) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(node.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=BROKER_SERVICE_NAME),
    ]
    listing, file_answer = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    names = {service.name for service in listing.list_services_response.service}
    assert {BROKER_SERVICE_NAME, "grpc.health.v1.Health"} <= names
    assert file_answer.file_descriptor_response.file_descriptor_proto  # grpcurl can describe it
