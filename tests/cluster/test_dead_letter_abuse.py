"""Another user's queue cannot be fed through a dead-letter queue, on three real nodes.

The attacks, as a user B would try them against a user A:
- B creates a queue whose dead-letter queue is A's queue, which only A may publish to: refused
  with PERMISSION_DENIED. Once A has let B publish and takes it back, B's expiring messages
  are dropped instead of moved, so they cannot push A's own messages out of a full
  `drop_head` queue either.
- B's queue names an open queue of A's as its dead-letter queue; A deletes it and a third user
  C creates a queue of the same name: B's dead letters never reach C's queue.
Before the fix both moved B's messages (with the producer id B chose) into the target. Each
test ends by reading the target through its owner and by checking the replicas agree.
"""

from __future__ import annotations

import grpc
import pytest

from chasqui_client import Client, errors
from chasqui_proto import chasqui_pb2 as pb
from chasqui_proto import chasqui_pb2_grpc as pb_grpc
from tests.harness import Cluster, dump_states

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

TTL_S = 0.2
DELAY_S = 0.5  # publishes wait this long, past their TTL: they expire without a delivery


def _set_publishers(cluster: Cluster, owner: Client, queue_name: str, user_ids: list[str]) -> None:
    """The owner's SetAccess (raw gRPC: the client has no call for it yet)."""
    leader = cluster.nodes[cluster.wait_for_leader()]
    with grpc.insecure_channel(leader.client_address) as channel:
        pb_grpc.BrokerStub(channel).SetAccess(
            pb.SetAccessRequest(kind=pb.QUEUE, name=queue_name, publishers=user_ids),
            metadata=(("authorization", f"Bearer {owner.key}"),),
            timeout=10,
        )


def _expire_into_dead_letters(client: Client, queue_name: str, bodies: list[str]) -> None:
    """Publish `bodies` delayed past their TTL, so none is ever delivered, and long-poll until
    the consume that finds them ready has expired them (and decided their dead-lettering)."""
    client.publish_many_queue(queue_name, bodies, delay_s=DELAY_S)
    for _ in range(20):  # bounded: each round long-polls at most 1 s
        delivered = client.consume_many_queue(queue_name, 100, timeout_s=1)
        assert not delivered, "a message was delivered instead of expiring"
        if client.list_queues(owned_only=True)[0].depth == 0:
            return
    raise AssertionError(f"the messages of {queue_name} did not expire")


def _bodies(client: Client, queue_name: str) -> list[str]:
    return [message.text for message in client.consume_many_queue(queue_name, 100, timeout_s=1)]


def _assert_replicas_agree(cluster: Cluster) -> None:
    cluster.wait_converged()
    for node_id in cluster.nodes:
        cluster.stop_node(node_id)
    first, *others = dump_states(cluster).values()
    assert all(state == first for state in others)


def test_a_restricted_queue_gets_no_dead_letters_from_another_user(cluster: Cluster) -> None:
    alice, bob = cluster.client(call_timeout_s=10), cluster.client(call_timeout_s=10)
    alice_id, bob_id = alice.whoami().user_id, bob.whoami().user_id
    alice.create_queue("alice.inbox", max_length=3, overflow="drop_head")
    _set_publishers(cluster, alice, "alice.inbox", [alice_id])
    with pytest.raises(errors.PermissionDenied, match="as a dead-letter queue: not on its"):
        bob.create_queue("bob.expiring", dead_letter_queue="alice.inbox", message_ttl_s=TTL_S)

    _set_publishers(cluster, alice, "alice.inbox", [alice_id, bob_id])
    bob.create_queue("bob.expiring", dead_letter_queue="alice.inbox", message_ttl_s=TTL_S)
    _set_publishers(cluster, alice, "alice.inbox", [alice_id])  # taken back
    alice.publish_many_queue("alice.inbox", ["a1", "a2", "a3"])  # full: drop_head next
    _expire_into_dead_letters(bob, "bob.expiring", [f"from bob {n}" for n in range(5)])
    assert _bodies(alice, "alice.inbox") == ["a1", "a2", "a3"]
    _assert_replicas_agree(cluster)


def test_a_re_created_dead_letter_queue_gets_nothing_of_the_old_ones(cluster: Cluster) -> None:
    alice, bob, carol = (cluster.client(call_timeout_s=10) for _ in range(3))
    alice.create_queue("shared.dead")  # open: anyone may publish
    bob.create_queue("bob.expiring", dead_letter_queue="shared.dead", message_ttl_s=TTL_S)
    _expire_into_dead_letters(bob, "bob.expiring", ["moved while it existed"])
    assert _bodies(alice, "shared.dead") == ["moved while it existed"]  # the feature works
    alice.delete_queue("shared.dead")
    carol.create_queue("shared.dead")
    _expire_into_dead_letters(bob, "bob.expiring", ["secret payload of bob"])
    assert _bodies(carol, "shared.dead") == []
    _assert_replicas_agree(cluster)
