"""The member registry: every node's client and Raft address, and tombstones of members that
left, replicated so any node can turn a Raft leader into a client address for leader hints."""

from __future__ import annotations

from chasqui_node import limits, validation
from chasqui_node.commands import AddMember, Done, MemberRecord, RemoveMember, Result, UserInfo
from chasqui_node.errors import (
    AlreadyExists,
    FailedPrecondition,
    PermissionDenied,
    ResourceExhausted,
)
from chasqui_node.state import keys
from chasqui_node.state.context import EntryContext
from chasqui_node.state.store import Store, scan_all


def add_member(ctx: EntryContext, user: UserInfo, command: AddMember) -> Result:
    """Idempotent for the same addresses, so a caller may retry after a timeout."""
    _check_admin(user)
    validation.check_add_member(command)
    records = {record.node_id: record for record in members(ctx.store)}
    for record in records.values():
        if record.removed or record.node_id == command.node_id:
            continue
        if command.raft_address == record.raft_address:
            raise FailedPrecondition(
                f"raft address {command.raft_address} belongs to member {record.node_id}"
            )
    existing = records.get(command.node_id)
    if existing is not None and not existing.removed:
        if (existing.client_address, existing.raft_address) == (
            command.client_address,
            command.raft_address,
        ):
            return Done()
        raise AlreadyExists("member", command.node_id)
    if existing is None and len(records) >= limits.MEMBER_RECORDS_MAX:
        raise ResourceExhausted(
            f"the member registry holds member_records_max {limits.MEMBER_RECORDS_MAX} records"
        )
    _put_member(ctx, command.node_id, command.client_address, command.raft_address, False)
    return Done()


def remove_member(ctx: EntryContext, user: UserInfo, command: RemoveMember) -> Result:
    """Writes a tombstone even for a member only listed in the nodes' `--cluster`."""
    _check_admin(user)
    validation.check_remove_member(command)
    value = ctx.store.get(keys.member_key(command.node_id))
    if value is None:
        if len(scan_all(ctx.store, keys.MEMBER_PREFIX)) >= limits.MEMBER_RECORDS_MAX:
            raise ResourceExhausted(
                f"the member registry holds member_records_max {limits.MEMBER_RECORDS_MAX} records"
            )
        _put_member(ctx, command.node_id, "", "", True)
    else:
        record = keys.decode_member(command.node_id, value)
        if not record.removed:
            _put_member(ctx, command.node_id, record.client_address, record.raft_address, True)
    return Done()


def members(store: Store) -> list[MemberRecord]:
    """The member registry sorted by node id, tombstones included (at most
    MEMBER_RECORDS_MAX). Unauthenticated: replication reads it to give leader hints."""
    return [
        keys.decode_member(node_id, value) for node_id, value in scan_all(store, keys.MEMBER_PREFIX)
    ]


def _check_admin(user: UserInfo) -> None:
    if not user.admin:
        raise PermissionDenied(
            f"user {user.user_id} is not an admin; only an admin may change cluster members"
        )


def _put_member(ctx: EntryContext, node_id: str, client: str, raft: str, removed: bool) -> None:
    ctx.store.put(keys.member_key(node_id), keys.encode_member(client, raft, removed))
