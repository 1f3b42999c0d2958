"""AddMember and RemoveMember at the service edge, over a fake replicator.

Proves that both need an admin key, that the registry command commits before the Raft change
(the fake's member list then shows the new member), that an unknown or leading node cannot be
removed, and that a follower redirects to the leader like any write.
"""

from __future__ import annotations

import grpc

from chasqui_node.commands import EnsureAdmin
from chasqui_node.service import hash_key
from chasqui_proto import chasqui_pb2 as pb
from tests.service.conftest import LEADER, Broker
from tests.service.support import Metadata, refusal

ADMIN_KEY = "service-membership-admin-key-0123"


def admin(broker: Broker) -> Metadata:
    broker.replication.propose_many([EnsureAdmin(hash_key(ADMIN_KEY))], 5)
    return (("authorization", f"Bearer {ADMIN_KEY}"),)


def test_admin_adds_and_removes_a_member(broker: Broker) -> None:
    metadata = admin(broker)
    request = pb.AddMemberRequest(
        node_id="n4", client_address="127.0.0.1:7104", raft_address="127.0.0.1:7204"
    )
    added = broker.stub.AddMember(request, metadata=metadata, timeout=5)
    assert "n4" in [member.node_id for member in added.members]
    removed = broker.stub.RemoveMember(
        pb.RemoveMemberRequest(node_id="n4"), metadata=metadata, timeout=5
    )
    assert "n4" not in [member.node_id for member in removed.members]


def test_membership_needs_an_admin(broker: Broker, user: Metadata) -> None:
    request = pb.AddMemberRequest(node_id="n4", client_address="h:1", raft_address="h:2")
    refusal(broker.stub.AddMember, request, user, grpc.StatusCode.PERMISSION_DENIED)
    refusal(broker.stub.AddMember, request, (), grpc.StatusCode.UNAUTHENTICATED)
    assert [member.node_id for member in broker.replication.members] == [broker.replication.node_id]


def test_unknown_or_leading_node_cannot_be_removed(broker: Broker) -> None:
    metadata = admin(broker)
    refusal(
        broker.stub.RemoveMember,
        pb.RemoveMemberRequest(node_id="n9"),
        metadata,
        grpc.StatusCode.NOT_FOUND,
    )
    error = refusal(
        broker.stub.RemoveMember,
        pb.RemoveMemberRequest(node_id=broker.replication.node_id),
        metadata,
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "cannot remove itself" in error.details()


def test_follower_redirects_membership_changes(broker: Broker) -> None:
    metadata = admin(broker)
    broker.replication.become_follower(LEADER)
    error = refusal(
        broker.stub.AddMember,
        pb.AddMemberRequest(node_id="n4", client_address="h:1", raft_address="h:2"),
        metadata,
        grpc.StatusCode.UNAVAILABLE,
    )
    assert dict(error.trailing_metadata() or ())["chasqui-leader"] == LEADER.client_address
