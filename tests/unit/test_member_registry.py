"""The replicated member registry in the state machine.

Proves that only admins change it, that adding is idempotent for the same addresses and refused
for a taken id or Raft address, that removal leaves a tombstone (also for a member only listed in
`--cluster`) so every replica hides it, that bad addresses are refused before anything is
written, and that the commands survive the log encoding.
"""

from __future__ import annotations

from chasqui_node.commands import (
    AddMember,
    CreateUser,
    Done,
    Entry,
    MemberRecord,
    RemoveMember,
)
from chasqui_node.entries import (
    decode_entry,
    encode_entry,
)
from chasqui_node.errors import (
    AlreadyExists,
    ChasquiError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
)
from chasqui_node.state import MemoryStore, StateMachine

ADMIN = "a" * 64
USER = "b" * 64


def apply(store: MemoryStore, *commands: object) -> list[object]:
    entry = decode_entry(encode_entry(Entry(1_000, tuple(commands))))  # type: ignore[arg-type]
    return list(StateMachine().apply_entry(store, entry))


def fresh() -> MemoryStore:
    store = MemoryStore()
    apply(store, CreateUser(ADMIN, admin=True), CreateUser(USER))
    return store


def test_admin_adds_and_removes_members_with_tombstones() -> None:
    store = fresh()
    add = AddMember(ADMIN, "n4", "10.0.0.4:7100", "10.0.0.4:7200")
    assert apply(store, add, add, RemoveMember(ADMIN, "n2")) == [Done(), Done(), Done()]
    assert StateMachine().members(store) == [
        MemberRecord("n2", "", "", removed=True),
        MemberRecord("n4", "10.0.0.4:7100", "10.0.0.4:7200", removed=False),
    ]
    assert apply(store, RemoveMember(ADMIN, "n4")) == [Done()]
    assert StateMachine().members(store)[1].removed


def test_only_admins_change_members() -> None:
    store = fresh()
    before = store.items()
    [result] = apply(store, AddMember(USER, "n4", "h:1", "h:2"))
    assert isinstance(result, PermissionDenied)
    [result] = apply(store, RemoveMember(USER, "n1"))
    assert isinstance(result, PermissionDenied)
    assert store.items() == before
    assert StateMachine().members(store) == []


def test_taken_id_or_raft_address_and_bad_addresses_are_refused() -> None:
    store = fresh()
    apply(store, AddMember(ADMIN, "n4", "h:1", "h:2"))
    results = apply(
        store,
        AddMember(ADMIN, "n4", "h:1", "h:3"),
        AddMember(ADMIN, "n5", "h:5", "h:2"),
        AddMember(ADMIN, "n6", "nohost", "h:6"),
        AddMember(ADMIN, "n7", "h:7", "h:99999"),
        AddMember(ADMIN, "", "h:8", "h:9"),
    )
    assert [type(result) for result in results] == [
        AlreadyExists,
        FailedPrecondition,
        InvalidArgument,
        InvalidArgument,
        InvalidArgument,
    ]
    assert all(isinstance(result, ChasquiError) for result in results)
    assert [record.node_id for record in StateMachine().members(store)] == ["n4"]
