"""One user's waiting calls cannot stop the leader from serving everyone else.

The attack, on three real nodes: one key opens several connections to the leader and fills
them with long-polls (`Consume` with `timeout_s=20`) or `ConsumeStream`s that never end. Before
the per-key and per-node bounds (admission.py), 135 long-polls over 3 connections held every
worker thread of the leader, so for 20 s other users' calls and the health check timed out,
and the cluster took no writes. Now the key gets WAITING_CALLS_PER_KEY_MAX of them and a
RESOURCE_EXHAUSTED naming the limit for the rest, at once; meanwhile another user's WhoAmI,
publish and consume, the health check and ClusterStatus on the leader each answer within 3 s.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chasqui_node import limits
from chasqui_proto import chasqui_pb2 as pb
from chasqui_proto import chasqui_pb2_grpc as pb_grpc
from tests.harness import Cluster, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

ANSWER_WITHIN_S = 3.0


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _channels(address: str, count: int) -> list[grpc.Channel]:
    # A local subchannel pool gives every channel its own connection (its own gRPC peer).
    return [
        grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(count)
    ]


def _wait_serving(channel: grpc.Channel) -> None:
    """The health check answers within 3 s each time, and says SERVING (a node still
    settling after its start may say NOT_SERVING for a moment: bounded wait)."""
    health = health_pb2_grpc.HealthStub(channel)
    wait_until(
        lambda: (
            health.Check(health_pb2.HealthCheckRequest(service=""), timeout=ANSWER_WITHIN_S).status
            == health_pb2.HealthCheckResponse.SERVING
        ),
        10,
        "the leader's health check to say SERVING",
    )


def _assert_others_are_served(cluster: Cluster, leader: str, other_key: str) -> None:
    """Another user's calls, the health check and status on the leader, each within 3 s."""
    address = cluster.nodes[leader].client_address
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.BrokerStub(channel)
        metadata = bearer(other_key)
        stub.WhoAmI(pb.WhoAmIRequest(), metadata=metadata, timeout=ANSWER_WITHIN_S)
        stub.Publish(
            pb.PublishRequest(kind=pb.QUEUE, name="others", body=b"still served"),
            metadata=metadata,
            timeout=ANSWER_WITHIN_S,
        )
        consumed = stub.Consume(
            pb.ConsumeRequest(kind=pb.QUEUE, name="others", timeout_s=1),
            metadata=metadata,
            timeout=ANSWER_WITHIN_S,
        )
        assert [delivery.body for delivery in consumed.deliveries] == [b"still served"]
        _wait_serving(channel)
    assert cluster.node_status(leader, timeout_s=ANSWER_WITHIN_S).role == "leader"


def _settled(futures: list[Any], expected_refused: int) -> list[Any]:
    """Wait until the refused calls have all answered; return the ones still waiting."""

    def refused_all() -> list[Any] | None:
        done = [future for future in futures if future.done()]
        if len(done) < expected_refused:
            return None
        for future in done:
            assert future.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, future.details()
            assert f"waiting_calls_per_key_max {limits.WAITING_CALLS_PER_KEY_MAX}" in (
                future.details()
            )
        return [future for future in futures if not future.done()]

    return wait_until(refused_all, 15, f"{expected_refused} calls refused")


@pytest.fixture
def keys(cluster: Cluster) -> Iterator[tuple[str, str]]:
    """An attacker's key (owning the idle queue) and another user's (owning its own)."""
    with grpc.insecure_channel(cluster.nodes[cluster.wait_for_leader()].client_address) as channel:
        _wait_serving(channel)
    attacker = cluster.client(call_timeout_s=10)
    attacker.create_queue("idle")
    other = cluster.client(call_timeout_s=10)
    other.create_queue("others")
    yield attacker.key, other.key


def test_one_key_holding_135_long_polls_does_not_stop_the_leader(
    cluster: Cluster, keys: tuple[str, str]
) -> None:
    attacker_key, other_key = keys
    leader = cluster.wait_for_leader()
    channels = _channels(cluster.nodes[leader].client_address, 3)
    try:
        futures = [
            pb_grpc.BrokerStub(channel).Consume.future(
                pb.ConsumeRequest(kind=pb.QUEUE, name="idle", timeout_s=20),
                metadata=bearer(attacker_key),
                timeout=30,
            )
            for channel in channels
            for _ in range(45)
        ]
        waiting = _settled(futures, 135 - limits.WAITING_CALLS_PER_KEY_MAX)
        assert len(waiting) == limits.WAITING_CALLS_PER_KEY_MAX
        _assert_others_are_served(cluster, leader, other_key)
        for future in waiting:
            future.cancel()
    finally:
        for channel in channels:
            channel.close()


def test_one_key_holding_200_streams_does_not_stop_the_leader(
    cluster: Cluster, keys: tuple[str, str]
) -> None:
    attacker_key, other_key = keys
    leader = cluster.wait_for_leader()
    channels = _channels(cluster.nodes[leader].client_address, 4)
    release = threading.Event()

    def requests() -> Iterator[pb.ConsumeStreamRequest]:
        yield pb.ConsumeStreamRequest(kind=pb.QUEUE, name="idle", credit=10)
        release.wait(60)  # keep the stream open, as a consumer that never leaves

    streams: list[Any] = []
    try:
        for number in range(200):
            stub = pb_grpc.BrokerStub(channels[number % len(channels)])
            streams.append(stub.ConsumeStream(requests(), metadata=bearer(attacker_key)))

        def refused_count() -> int | None:
            refused = [
                stream
                for stream in streams
                if stream.done() and stream.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            ]
            expected = 200 - limits.WAITING_CALLS_PER_KEY_MAX
            return len(refused) if len(refused) >= expected else None

        assert wait_until(refused_count, 20, "streams over the bound refused") == (
            200 - limits.WAITING_CALLS_PER_KEY_MAX
        )
        assert sum(1 for stream in streams if not stream.done()) == (
            limits.WAITING_CALLS_PER_KEY_MAX
        )
        _assert_others_are_served(cluster, leader, other_key)
    finally:
        release.set()
        for stream in streams:
            stream.cancel()
        for channel in channels:
            channel.close()
