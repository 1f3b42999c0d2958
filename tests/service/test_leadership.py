"""A node that is not the leader refuses writes and reads with UNAVAILABLE.

Proves that when the replicator reports NotLeader with a known leader, the service answers
UNAVAILABLE and puts the leader's client address in the trailing metadata `chasqui-leader`, so
the client can go there directly; with no leader (NoLeader, or NotLeader without a hint) it is
UNAVAILABLE without that metadata. Nothing is applied while the node is a follower.
"""

from __future__ import annotations

import grpc

from chasqui_node.errors import NotLeader
from chasqui_proto import chasqui_pb2 as pb
from tests.service.conftest import LEADER, Broker
from tests.service.support import Metadata, create_queue, depth, queues, refusal

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def _leader_hint(error: grpc.RpcError) -> str | None:
    for key, value in error.trailing_metadata() or ():
        if key == "chasqui-leader":
            return str(value)
    return None


def _calls() -> list[tuple[str, object]]:
    return [
        ("CreateUser", pb.CreateUserRequest()),
        ("CreateQueue", pb.CreateQueueRequest(name="fresh")),
        ("DeleteQueue", pb.DeleteQueueRequest(name="orders")),
        ("Publish", pb.PublishRequest(kind=pb.QUEUE, name="orders", body=b"x")),
        ("PublishBatch", pb.PublishBatchRequest(kind=pb.QUEUE, name="orders", items=[{}])),
        ("Consume", pb.ConsumeRequest(kind=pb.QUEUE, name="orders")),
        ("ListQueues", pb.ListQueuesRequest()),
        ("WhoAmI", pb.WhoAmIRequest()),
    ]


def test_follower_refuses_writes_with_leader_hint(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    broker.replication.become_follower(LEADER)
    for method_name, request in _calls():
        error = refusal(getattr(broker.stub, method_name), request, user, UNAVAILABLE)
        assert _leader_hint(error) == LEADER.client_address, method_name
        assert error.details() == (
            f"node n1 is not the leader; try {LEADER.node_id} at {LEADER.client_address}"
        )
    broker.replication.become_leader()
    assert set(queues(broker.stub, user)) == {"orders"}
    assert depth(broker.stub, user, "orders") == 0


def test_node_without_leader_refuses_writes_without_hint(broker: Broker, user: Metadata) -> None:
    create_queue(broker.stub, user, "orders")
    broker.replication.become_follower(None)
    for method_name, request in _calls():
        error = refusal(getattr(broker.stub, method_name), request, user, UNAVAILABLE)
        assert _leader_hint(error) is None, method_name
        assert error.details() == "no leader elected yet; retry shortly"
    broker.replication.become_leader()
    assert set(queues(broker.stub, user)) == {"orders"}
    assert depth(broker.stub, user, "orders") == 0


def test_not_leader_without_address_sends_no_hint(broker: Broker, user: Metadata) -> None:
    """A follower that knows no leader address must not send an empty `chasqui-leader`."""

    def refuse() -> None:
        raise NotLeader("n1", None, None)

    broker.replication.check_leader = refuse  # type: ignore[method-assign]
    request = pb.CreateQueueRequest(name="orders")
    error = refusal(broker.stub.CreateQueue, request, user, UNAVAILABLE)
    assert _leader_hint(error) is None
    assert error.details() == "node n1 is not the leader and knows no leader; retry shortly"
