"""Fixtures for service tests: an in-process gRPC server on port 0 over a fake replicator.

`FakeReplication` stands in for `Replicator`: it applies each proposal at once, in-process, to a
real `StateMachine` over a `MemoryStore`, so every verdict the tests see is the state machine's
own. Entries are encoded and decoded exactly as on the Raft path, and `now_ms` comes from a
`FakeClock` the test advances by hand (lease expiry without sleeping). A test can turn the node
into a follower, with or without a leader hint, to see how the service refuses writes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc
import pytest

from chasqui_node import limits
from chasqui_node.commands import Command, Entry, Kind, Result
from chasqui_node.entries import decode_entry, encode_for_raft
from chasqui_node.errors import NoLeader, NotLeader
from chasqui_node.long_poll import ChangeBoard
from chasqui_node.replication import (
    AtCommit,
    Member,
    ReplicationStatus,
    Rider,
    RiderBoard,
    Role,
)
from chasqui_node.service import BrokerService
from chasqui_node.state import MemoryStore, StateMachine, Store
from chasqui_node.wire import add_broker_to_server
from chasqui_proto import chasqui_pb2 as pb
from chasqui_proto import chasqui_pb2_grpc as pb_grpc

T = TypeVar("T")

NODE = Member("n1", "127.0.0.1:7401", "127.0.0.1:7501")
LEADER = Member("n2", "10.0.0.5:7400", "10.0.0.5:7500")

Metadata = tuple[tuple[str, str], ...]


class FakeClock:
    """The leader's wall clock as the state machine sees it; only the test moves it."""

    def __init__(self, start_ms: int) -> None:
        self._lock = threading.Lock()
        self._now_ms = start_ms

    def now_ms(self) -> int:
        with self._lock:
            return self._now_ms

    def advance(self, milliseconds: int) -> None:
        with self._lock:
            self._now_ms += milliseconds


class FakeReplication:
    """`service.Replication` without Raft: one lock stands in for the log's total order."""

    def __init__(
        self,
        state_machine: StateMachine,
        store: MemoryStore,
        change_board: ChangeBoard,
        clock: FakeClock,
    ) -> None:
        self.node_id = NODE.node_id
        self.store = store
        self.clock = clock
        self._state_machine = state_machine
        self._change_board = change_board
        self._lock = threading.Lock()
        self._leader: Member | None = NODE
        self._applied_index = 0
        self.members: tuple[Member, ...] = (NODE,)
        self._riders = RiderBoard()
        self.entries: list[Entry] = []  # every entry applied, in order
        self.rides = 0  # riders registered so far

    def become_follower(self, leader: Member | None) -> None:
        """From now on refuse proposals: NotLeader with `leader` as hint, or NoLeader."""
        self._leader = leader

    def become_leader(self) -> None:
        self._leader = NODE

    def check_leader(self) -> None:
        leader = self._leader
        if leader == NODE:
            return
        if leader is None:
            raise NoLeader()
        raise NotLeader(self.node_id, leader.node_id, leader.client_address)

    def cluster_time_ms(self) -> int:
        return self.clock.now_ms()

    def propose_many(
        self, commands: Sequence[Command], timeout_s: float, at_commit: AtCommit | None = None
    ) -> list[Result]:
        self.check_leader()
        with self._lock:
            riders = self._riders.take(commands)
            carried = [c for rider in riders for c in rider.commands]
            entry = Entry(now_ms=self.clock.now_ms(), commands=(*commands, *carried))
            entry = decode_entry(encode_for_raft(entry))  # what a replica would apply
            results = self._state_machine.apply_entry(self.store, entry)
            self.entries.append(entry)
            self._applied_index += 1
            self._change_board.on_applied(entry, results)
            for noted in (at_commit, *(rider.at_commit for rider in riders)):
                if noted is not None:
                    noted()  # before the next entry applies, as the Replicator does
        position = len(commands)
        for rider in riders:
            count = len(rider.commands)
            rider.future.set_result(results[position : position + count])
            position += count
        return results[: len(commands)]

    def ride(
        self, key: tuple[Kind, str], commands: Sequence[Command], at_commit: AtCommit | None = None
    ) -> Rider:
        self.rides += 1
        return self._riders.ride(key, commands, at_commit)

    def withdraw(self, rider: Rider) -> bool:
        return self._riders.withdraw(rider)

    def status(self) -> ReplicationStatus:
        leading = self._leader == NODE
        return ReplicationStatus(
            node_id=self.node_id,
            role=Role.LEADER if leading else Role.FOLLOWER,
            term=3,
            leader=self._leader,
            commit_index=self._applied_index,
            applied_index=self._applied_index,
            log_length=self._applied_index,
            has_quorum=leading,
            peers=(),
        )

    def read(self, query: Callable[[Store], T]) -> T:
        with self._lock:
            return query(self.store)

    def member(self, node_id: str) -> Member | None:
        return next((m for m in self.members if m.node_id == node_id), None)

    def add_member(self, member: Member, timeout_s: float) -> None:
        self.check_leader()
        if member not in self.members:
            self.members = (*self.members, member)

    def remove_member(self, member: Member, timeout_s: float) -> None:
        self.check_leader()
        self.members = tuple(m for m in self.members if m != member)


@dataclass
class Broker:
    """One running service: the raw stub, the fake underneath, and a user helper."""

    stub: pb_grpc.BrokerStub
    replication: FakeReplication
    clock: FakeClock
    port: int

    def new_user(self) -> Metadata:
        """Create a user; return call metadata carrying its key."""
        key = self.stub.CreateUser(pb.CreateUserRequest(), timeout=5).key
        return (("authorization", f"Bearer {key}"),)


@pytest.fixture
def broker() -> Iterator[Broker]:
    state_machine = StateMachine()
    change_board = ChangeBoard()
    clock = FakeClock(int(time.time() * 1000))
    replication = FakeReplication(state_machine, MemoryStore(), change_board, clock)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=limits.GRPC_WORKERS, thread_name_prefix="chasqui-test-grpc"),
        maximum_concurrent_rpcs=limits.GRPC_CONCURRENT_CALLS_MAX,
        options=[
            ("grpc.max_receive_message_length", limits.GRPC_MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", limits.GRPC_MESSAGE_BYTES_MAX),
            ("grpc.so_reuseport", 0),
        ],
    )
    add_broker_to_server(
        BrokerService(replication, state_machine, change_board, proposal_timeout_s=2.0), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    assert port != 0
    server.start()
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_receive_message_length", limits.GRPC_MESSAGE_BYTES_MAX)],
    )
    try:
        yield Broker(pb_grpc.BrokerStub(channel), replication, clock, port)
    finally:
        channel.close()
        server.stop(grace=None).wait(5)


@pytest.fixture
def stub(broker: Broker) -> pb_grpc.BrokerStub:
    return broker.stub


@pytest.fixture
def user(broker: Broker) -> Metadata:
    """Metadata of a fresh user on the broker."""
    return broker.new_user()
