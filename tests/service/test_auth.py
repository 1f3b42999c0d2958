"""Authentication at the service edge.

Proves that every call except CreateUser and ClusterStatus needs `authorization: Bearer <key>`:
a missing header, a malformed one and a key the cluster does not know all get UNAUTHENTICATED
with a message that says what to send, and such a call changes nothing. ClusterStatus answers
without a key because operators and the client's leader discovery need it from any node.
"""

from __future__ import annotations

import grpc
import pytest

from chasqui_proto import chasqui_pb2 as pb
from tests.service.conftest import LEADER, Broker
from tests.service.support import Metadata, queues, refusal

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def test_call_without_key_is_unauthenticated(broker: Broker, user: Metadata) -> None:
    error = refusal(
        broker.stub.CreateQueue, pb.CreateQueueRequest(name="orders"), (), UNAUTHENTICATED
    )
    assert "authorization: Bearer <key>" in error.details()
    assert queues(broker.stub, user) == {}


@pytest.mark.parametrize(
    "value",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "Token abc", "bearer"],
)
def test_malformed_authorization_is_unauthenticated(
    broker: Broker, user: Metadata, value: str
) -> None:
    error = refusal(
        broker.stub.CreateQueue,
        pb.CreateQueueRequest(name="orders"),
        (("authorization", value),),
        UNAUTHENTICATED,
    )
    assert "Bearer <key>" in error.details()
    assert queues(broker.stub, user) == {}


def test_unknown_key_is_unauthenticated(broker: Broker, user: Metadata) -> None:
    stranger = (("authorization", "Bearer not-a-key-anyone-was-given"),)
    error = refusal(
        broker.stub.CreateQueue, pb.CreateQueueRequest(name="orders"), stranger, UNAUTHENTICATED
    )
    assert "unknown key" in error.details()
    assert queues(broker.stub, user) == {}


def test_unknown_key_cannot_read_listings(broker: Broker) -> None:
    stranger = (("authorization", "Bearer not-a-key-anyone-was-given"),)
    refusal(broker.stub.ListQueues, pb.ListQueuesRequest(), stranger, UNAUTHENTICATED)
    refusal(broker.stub.WhoAmI, pb.WhoAmIRequest(), stranger, UNAUTHENTICATED)


def test_bearer_scheme_is_case_insensitive(broker: Broker) -> None:
    key = broker.stub.CreateUser(pb.CreateUserRequest(), timeout=5).key
    response = broker.stub.WhoAmI(
        pb.WhoAmIRequest(), metadata=(("authorization", f"bearer {key}"),), timeout=5
    )
    assert response.user_id.startswith("u")


def test_cluster_status_answers_without_a_key(broker: Broker) -> None:
    status = broker.stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=5)
    assert status.node_id == "n1"
    assert status.role == "leader"
    assert status.leader_id == "n1"
    assert status.has_quorum


def test_cluster_status_answers_on_a_follower(broker: Broker) -> None:
    broker.replication.become_follower(LEADER)
    status = broker.stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=5)
    assert status.role == "follower"
    assert status.leader_address == LEADER.client_address
