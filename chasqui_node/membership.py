"""The steps of a membership change, one member at a time, on the leader (AddMember and
RemoveMember; the service translates their requests and answers).

Each change takes two steps, in this order:

1. The registry command (`commands.AddMember` / `commands.RemoveMember`) commits through Raft.
   Applying it checks that the caller is an admin, and gives every node the member's client
   address before a new member can lead, so followers can send clients to it.
2. The Raft configuration change itself (`Replication.add_member` / `remove_member`), which
   waits for pysyncobj to commit it, up to `limits.MEMBERSHIP_CHANGE_TIMEOUT_S` or the call's
   deadline, whichever comes first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from chasqui_node import limits
from chasqui_node.commands import AddMember, Command, RemoveMember, Result
from chasqui_node.deadlines import Call, call_wait_s
from chasqui_node.errors import AlreadyExists, ChasquiError, FailedPrecondition, NotFound
from chasqui_node.replication import AtCommit, Member
from chasqui_node.validation import check_request


class MembershipReplication(Protocol):
    """What a membership change needs from replication; `Replicator` and the tests' fake
    provide it."""

    node_id: str
    members: tuple[Member, ...]  # every member this node knows, itself included

    def propose_many(
        self, commands: Sequence[Command], timeout_s: float, at_commit: AtCommit | None = None
    ) -> list[Result]: ...

    def check_leader(self) -> None: ...

    def member(self, node_id: str) -> Member | None: ...

    def add_member(self, member: Member, timeout_s: float) -> None: ...

    def remove_member(self, member: Member, timeout_s: float) -> None: ...


class MembershipSteps:
    """Adds and removes members for the service; any gRPC worker thread. Raises domain errors
    for the service to map: NotLeader/NoLeader off the leader, PermissionDenied from the
    registry command for a caller who is not an admin, AlreadyExists, NotFound and
    FailedPrecondition as each method says, OutcomeUnknown when a step does not commit in time.
    """

    def __init__(self, replication: MembershipReplication, proposal_timeout_s: float) -> None:
        self._replication = replication
        self._proposal_timeout_s = proposal_timeout_s

    def add(self, key_hash: str, member: Member, call: Call) -> None:
        """Add `member`, on behalf of the caller whose key hashes to `key_hash`. AlreadyExists
        when its node id is a member with other addresses; FailedPrecondition when another
        member has its Raft address."""
        # The registry command commits first: it checks the caller is an admin, and every node
        # then knows the new member's client address before the new member can lead.
        self._replication.check_leader()
        known = self._replication.member(member.node_id)
        if known is not None and known != member:
            raise AlreadyExists("member", known.node_id)
        if any(
            m.raft_address == member.raft_address and m.node_id != member.node_id
            for m in self._replication.members
        ):
            raise FailedPrecondition(
                f"raft address {member.raft_address} belongs to another member"
            )
        self._propose(
            AddMember(
                key_hash=key_hash,
                node_id=member.node_id,
                client_address=member.client_address,
                raft_address=member.raft_address,
            ),
            call,
        )
        self._replication.add_member(member, self._change_timeout_s(call))

    def remove(self, key_hash: str, node_id: str, call: Call) -> None:
        """Remove member `node_id`, on behalf of the caller whose key hashes to `key_hash`.
        NotFound when it is not a member; FailedPrecondition when it is this node, the leader
        (the message tells the operator how to remove it)."""
        self._replication.check_leader()
        member = self._replication.member(node_id)
        if member is None:
            raise NotFound(f"node {node_id!r} is not a member of this cluster")
        if member.node_id == self._replication.node_id:
            raise FailedPrecondition(
                f"node {member.node_id} is the leader and cannot remove itself; stop it, wait "
                "for a new leader, then remove it there"
            )
        self._propose(RemoveMember(key_hash=key_hash, node_id=member.node_id), call)
        self._replication.remove_member(member, self._change_timeout_s(call))

    def _propose(self, command: Command, call: Call) -> None:
        check_request(command)  # stateless rules at the edge too, as for every command
        timeout_s = call_wait_s(call, self._proposal_timeout_s)
        (result,) = self._replication.propose_many([command], timeout_s)
        if isinstance(result, ChasquiError):
            raise result

    @staticmethod
    def _change_timeout_s(call: Call) -> float:
        return call_wait_s(call, limits.MEMBERSHIP_CHANGE_TIMEOUT_S)
