"""Security at the service edge: closed signup, admin calls, access lists, per-connection limits.

Each test runs an in-process gRPC server over the fake replicator (the real state machine
decides every verdict) built by `start_secured`, which takes the node's security settings. The
bootstrap admin is installed the way a leader does it, by proposing `EnsureAdmin` with the key's
hash. Tests prove UNAUTHENTICATED (no, unknown or revoked key) and PERMISSION_DENIED (known user,
not allowed) are used exactly, that refusals name the user, action and name, and that each limit
holds just under, exactly at and just over.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from chasqui_node import limits
from chasqui_node.commands import EnsureAdmin, UserCreated
from chasqui_node.long_poll import ChangeBoard
from chasqui_node.service import BrokerService, hash_key
from chasqui_node.state import MemoryStore, StateMachine
from chasqui_node.wire import add_broker_to_server
from chasqui_proto import chasqui_pb2 as pb
from chasqui_proto import chasqui_pb2_grpc as pb_grpc
from tests.harness import wait_until
from tests.service.conftest import FakeClock, FakeReplication
from tests.service.support import Metadata, create_queue, publish, queues, refusal

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


def bearer(key: str) -> Metadata:
    return (("authorization", f"Bearer {key}"),)


@dataclass
class SecuredBroker:
    stub: pb_grpc.BrokerStub
    service: BrokerService
    replication: FakeReplication
    port: int
    admin: Metadata
    open_channel: Callable[[], grpc.Channel]

    def new_user(self) -> Metadata:
        """A new user, created by the admin (works with signup open or closed)."""
        response = self.stub.CreateUser(pb.CreateUserRequest(), metadata=self.admin, timeout=5)
        return bearer(response.key)

    def user_id(self, metadata: Metadata) -> str:
        user_id: str = self.stub.WhoAmI(pb.WhoAmIRequest(), metadata=metadata, timeout=5).user_id
        return user_id


@contextlib.contextmanager
def start_secured(
    signup_open: bool = True,
    calls_in_flight_per_connection_max: int = limits.CALLS_IN_FLIGHT_PER_CONNECTION_MAX,
    waiting_calls_max: int = limits.WAITING_CALLS_MAX,
    waiting_calls_per_key_max: int = limits.WAITING_CALLS_PER_KEY_MAX,
) -> Iterator[SecuredBroker]:
    """An in-process node with these security settings and a bootstrap admin."""
    state_machine = StateMachine()
    change_board = ChangeBoard()
    clock = FakeClock(int(time.time() * 1000))
    replication = FakeReplication(state_machine, MemoryStore(), change_board, clock)
    admin_key = secrets.token_urlsafe(24)
    [created] = replication.propose_many([EnsureAdmin(hash_key(admin_key))], 5)
    assert isinstance(created, UserCreated)
    service = BrokerService(
        replication,
        state_machine,
        change_board,
        proposal_timeout_s=2.0,
        signup_open=signup_open,
        calls_in_flight_per_connection_max=calls_in_flight_per_connection_max,
        waiting_calls_max=waiting_calls_max,
        waiting_calls_per_key_max=waiting_calls_per_key_max,
    )
    server = grpc.server(
        ThreadPoolExecutor(max_workers=limits.GRPC_WORKERS, thread_name_prefix="chasqui-test-grpc"),
        maximum_concurrent_rpcs=limits.GRPC_CONCURRENT_CALLS_MAX,
        options=[
            ("grpc.max_receive_message_length", limits.GRPC_MESSAGE_BYTES_MAX),
            ("grpc.so_reuseport", 0),
        ],
    )
    add_broker_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channels: list[grpc.Channel] = []

    def open_channel() -> grpc.Channel:
        # A local subchannel pool gives every channel its own connection (its own peer).
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        channels.append(channel)
        return channel

    try:
        yield SecuredBroker(
            pb_grpc.BrokerStub(open_channel()),
            service,
            replication,
            port,
            bearer(admin_key),
            open_channel,
        )
    finally:
        for channel in channels:
            channel.close()
        server.stop(grace=None).wait(5)


@pytest.fixture
def secured() -> Iterator[SecuredBroker]:
    with start_secured() as broker:
        yield broker


@pytest.fixture
def closed() -> Iterator[SecuredBroker]:
    with start_secured(signup_open=False) as broker:
        yield broker


# -- signup and admin -------------------------------------------------------------------------


def test_bootstrap_admin_is_an_admin(secured: SecuredBroker) -> None:
    response = secured.stub.WhoAmI(pb.WhoAmIRequest(), metadata=secured.admin, timeout=5)
    assert response.admin


def test_closed_signup_without_a_key_is_unauthenticated(closed: SecuredBroker) -> None:
    error = refusal(closed.stub.CreateUser, pb.CreateUserRequest(), (), UNAUTHENTICATED)
    assert "signup is closed" in error.details()
    assert "Bearer" in error.details()


def test_closed_signup_with_a_user_key_is_permission_denied(closed: SecuredBroker) -> None:
    user = closed.new_user()
    error = refusal(closed.stub.CreateUser, pb.CreateUserRequest(), user, PERMISSION_DENIED)
    assert error.details() == (
        f"user {closed.user_id(user)} is not an admin; only an admin may create users on "
        "this cluster"
    )


def test_closed_signup_with_a_wrong_key_is_unauthenticated(closed: SecuredBroker) -> None:
    error = refusal(
        closed.stub.CreateUser, pb.CreateUserRequest(), bearer("nope" * 8), UNAUTHENTICATED
    )
    assert error.details() == "unknown key"


def test_closed_signup_admin_creates_users(closed: SecuredBroker) -> None:
    user = closed.new_user()
    assert not closed.stub.WhoAmI(pb.WhoAmIRequest(), metadata=user, timeout=5).admin


def test_open_signup_needs_an_admin_for_admin_users(secured: SecuredBroker) -> None:
    refusal(secured.stub.CreateUser, pb.CreateUserRequest(admin=True), (), UNAUTHENTICATED)
    user = secured.new_user()
    refusal(secured.stub.CreateUser, pb.CreateUserRequest(admin=True), user, PERMISSION_DENIED)
    key = secured.stub.CreateUser(
        pb.CreateUserRequest(admin=True), metadata=secured.admin, timeout=5
    ).key
    assert secured.stub.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(key), timeout=5).admin


def test_revoked_key_is_unauthenticated_and_its_queue_stays(secured: SecuredBroker) -> None:
    alice, bob = secured.new_user(), secured.new_user()
    bob_id = secured.user_id(bob)
    create_queue(secured.stub, bob, "bobs")
    secured.stub.RevokeUser(pb.RevokeUserRequest(user_id=bob_id), metadata=secured.admin)
    error = refusal(secured.stub.ListQueues, pb.ListQueuesRequest(), bob, UNAUTHENTICATED)
    assert error.details() == f"the key of user {bob_id} has been revoked"
    refusal(
        secured.stub.Publish,
        pb.PublishRequest(kind=pb.QUEUE, name="bobs", body=b"x"),
        bob,
        UNAUTHENTICATED,
    )
    assert queues(secured.stub, alice)["bobs"].owner == bob_id
    error = refusal(
        secured.stub.DeleteQueue, pb.DeleteQueueRequest(name="bobs"), alice, PERMISSION_DENIED
    )
    assert "only its owner or an admin may delete it" in error.details()
    secured.stub.DeleteQueue(pb.DeleteQueueRequest(name="bobs"), metadata=secured.admin)
    assert "bobs" not in queues(secured.stub, alice)
    users = secured.stub.ListUsers(pb.ListUsersRequest(), metadata=secured.admin).users
    assert [user.revoked for user in users if user.user_id == bob_id] == [True]


def test_admin_calls_refuse_other_users(secured: SecuredBroker) -> None:
    user = secured.new_user()
    error = refusal(secured.stub.ListUsers, pb.ListUsersRequest(), user, PERMISSION_DENIED)
    assert "is not an admin" in error.details()
    refusal(secured.stub.RevokeUser, pb.RevokeUserRequest(user_id="u1"), user, PERMISSION_DENIED)
    refusal(secured.stub.ListUsers, pb.ListUsersRequest(), (), UNAUTHENTICATED)
    refusal(secured.stub.RevokeUser, pb.RevokeUserRequest(user_id="u1"), (), UNAUTHENTICATED)


def test_revoke_checks_the_user_id(secured: SecuredBroker) -> None:
    for user_id in ("", "u" * (limits.USER_ID_BYTES_MAX + 1)):
        refusal(
            secured.stub.RevokeUser,
            pb.RevokeUserRequest(user_id=user_id),
            secured.admin,
            INVALID_ARGUMENT,
        )
    refusal(
        secured.stub.RevokeUser,
        pb.RevokeUserRequest(user_id="u999"),
        secured.admin,
        grpc.StatusCode.NOT_FOUND,
    )


# -- access lists -----------------------------------------------------------------------------


def test_access_lists_end_to_end(secured: SecuredBroker) -> None:
    owner, publisher, consumer, outsider = (secured.new_user() for _ in range(4))
    create_queue(secured.stub, owner, "orders")
    publisher_id, consumer_id = secured.user_id(publisher), secured.user_id(consumer)
    outsider_id = secured.user_id(outsider)
    refusal(
        secured.stub.SetAccess,
        pb.SetAccessRequest(kind=pb.QUEUE, name="orders", publishers=[outsider_id]),
        outsider,
        PERMISSION_DENIED,
    )
    secured.stub.SetAccess(
        pb.SetAccessRequest(
            kind=pb.QUEUE, name="orders", publishers=[publisher_id], consumers=[consumer_id]
        ),
        metadata=owner,
        timeout=5,
    )
    error = refusal(
        secured.stub.Publish,
        pb.PublishRequest(kind=pb.QUEUE, name="orders", body=b"x"),
        outsider,
        PERMISSION_DENIED,
    )
    assert error.details() == (
        f'user {outsider_id} may not publish to queue "orders": not on its publishers list '
        f"(owner {secured.user_id(owner)})"
    )
    publish(secured.stub, publisher, "orders")
    error = refusal(
        secured.stub.Consume,
        pb.ConsumeRequest(kind=pb.QUEUE, name="orders"),
        publisher,
        PERMISSION_DENIED,
    )
    assert f'user {publisher_id} may not consume from queue "orders"' in error.details()
    [delivery] = secured.stub.Consume(
        pb.ConsumeRequest(kind=pb.QUEUE, name="orders"), metadata=consumer, timeout=5
    ).deliveries
    reference = pb.DeliveryRef(
        kind=pb.QUEUE, name="orders", sequence=delivery.sequence, delivery_count=1
    )
    refusal(secured.stub.Ack, pb.AckRequest(deliveries=[reference]), outsider, PERMISSION_DENIED)
    secured.stub.Ack(pb.AckRequest(deliveries=[reference]), metadata=consumer, timeout=5)
    info = queues(secured.stub, owner)["orders"]
    assert (list(info.publishers), list(info.consumers)) == ([publisher_id], [consumer_id])
    seen_by_outsider = queues(secured.stub, outsider)["orders"]
    assert list(seen_by_outsider.publishers) == [] and info.depth == 0


def test_set_access_checks_lists_at_the_edge(secured: SecuredBroker) -> None:
    owner = secured.new_user()
    create_queue(secured.stub, owner, "orders")
    users = [secured.user_id(owner)]
    for count, code in (
        (limits.ACCESS_LIST_USERS_MAX - 1, None),
        (limits.ACCESS_LIST_USERS_MAX, None),
        (limits.ACCESS_LIST_USERS_MAX + 1, INVALID_ARGUMENT),
    ):
        request = pb.SetAccessRequest(kind=pb.QUEUE, name="orders", consumers=users * count)
        if code is None:
            secured.stub.SetAccess(request, metadata=owner, timeout=5)  # repeats collapse
        else:
            error = refusal(secured.stub.SetAccess, request, owner, code)
            assert "access_list_users_max" in error.details()
    for bad in (
        pb.SetAccessRequest(kind=pb.KIND_UNSPECIFIED, name="orders"),
        pb.SetAccessRequest(kind=pb.QUEUE, name="no such/name"),
        pb.SetAccessRequest(kind=pb.QUEUE, name="orders", publishers=[""]),
        pb.SetAccessRequest(kind=pb.QUEUE, name="orders", publishers=["u" * 40]),
    ):
        refusal(secured.stub.SetAccess, bad, owner, INVALID_ARGUMENT)
    refusal(
        secured.stub.SetAccess,
        pb.SetAccessRequest(kind=pb.TOPIC, name="orders"),
        owner,
        grpc.StatusCode.NOT_FOUND,
    )


# -- limits -----------------------------------------------------------------------------------


def test_user_queue_limit_under_at_and_over(
    secured: SecuredBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "USER_QUEUES_MAX", 3)
    user = secured.new_user()
    create_queue(secured.stub, user, "q1")
    create_queue(secured.stub, user, "q2")  # just under
    create_queue(secured.stub, user, "q3")  # at
    error = refusal(
        secured.stub.CreateQueue, pb.CreateQueueRequest(name="q4"), user, RESOURCE_EXHAUSTED
    )
    assert "user_queues_max 3" in error.details()


def _hold_long_polls(
    broker: SecuredBroker, stub: pb_grpc.BrokerStub, user: Metadata, count: int
) -> list[Any]:
    held = [
        stub.Consume.future(
            pb.ConsumeRequest(kind=pb.QUEUE, name="idle", timeout_s=20), metadata=user, timeout=30
        )
        for _ in range(count)
    ]
    wait_until(
        lambda: (
            sum(broker.service.connection_slots.in_flight().values()) == count
            and sum(broker.service.waiting_slots.in_flight().values()) == count
        ),
        10,
        f"{count} long-polls in flight and waiting",
    )
    return held


@pytest.mark.parametrize(("held", "refused"), [(2, False), (3, True)])
def test_calls_in_flight_per_connection(held: int, refused: bool) -> None:
    """With a bound of 3: 2 held + 1 (just under, reaching the bound) is served; 3 held + 1
    (just over) is refused at once, while another connection is still served."""
    with start_secured(calls_in_flight_per_connection_max=3) as broker:
        user = broker.new_user()
        create_queue(broker.stub, user, "idle")
        stub = pb_grpc.BrokerStub(broker.open_channel())
        stub.WhoAmI(pb.WhoAmIRequest(), metadata=user, timeout=5)  # connect first
        waiting = _hold_long_polls(broker, stub, user, held)
        if refused:
            error = refusal(stub.WhoAmI, pb.WhoAmIRequest(), user, RESOURCE_EXHAUSTED)
            assert "calls_in_flight_per_connection_max 3" in error.details()
        else:
            stub.WhoAmI(pb.WhoAmIRequest(), metadata=user, timeout=5)
        other = pb_grpc.BrokerStub(broker.open_channel())
        other.WhoAmI(pb.WhoAmIRequest(), metadata=user, timeout=5)
        for _ in waiting:
            publish(broker.stub, user, "idle")
        for future in waiting:
            assert len(future.result(timeout=10).deliveries) == 1
        stub.WhoAmI(pb.WhoAmIRequest(), metadata=user, timeout=5)  # slots come back
        assert broker.service.connection_slots.in_flight() == {}


@pytest.mark.parametrize(("held", "refused"), [(2, False), (3, True)])
def test_waiting_calls_per_key(held: int, refused: bool) -> None:
    """With a bound of 3 per key: a key holding 2 long-polls may open one more (reaching the
    bound), one holding 3 is refused at once, over any connection; a short consume (timeout
    0) and another key's long-poll are still served."""
    with start_secured(waiting_calls_per_key_max=3) as broker:
        user, other_user = broker.new_user(), broker.new_user()
        create_queue(broker.stub, user, "idle")
        waiting = _hold_long_polls(broker, pb_grpc.BrokerStub(broker.open_channel()), user, held)
        stub = pb_grpc.BrokerStub(broker.open_channel())
        long_poll = pb.ConsumeRequest(kind=pb.QUEUE, name="idle", timeout_s=0.2)
        if refused:
            error = refusal(stub.Consume, long_poll, user, RESOURCE_EXHAUSTED)
            assert error.details().startswith(
                "this key already has 3 waiting calls (long-polls and streams), at "
                "waiting_calls_per_key_max 3;"
            )
            stream = stub.ConsumeStream(
                iter([pb.ConsumeStreamRequest(kind=pb.QUEUE, name="idle", credit=1)]),
                metadata=user,
                timeout=5,
            )
            with pytest.raises(grpc.RpcError) as streamed:
                next(stream)
            assert streamed.value.code() == RESOURCE_EXHAUSTED
        else:
            assert not stub.Consume(long_poll, metadata=user, timeout=5).deliveries
        short = pb.ConsumeRequest(kind=pb.QUEUE, name="idle", timeout_s=0)
        assert not stub.Consume(short, metadata=user, timeout=5).deliveries
        assert not stub.Consume(long_poll, metadata=other_user, timeout=5).deliveries
        for _ in waiting:
            publish(broker.stub, user, "idle")
        for future in waiting:
            assert len(future.result(timeout=10).deliveries) == 1
        assert broker.service.waiting_slots.in_flight() == {}


def test_waiting_calls_per_node() -> None:
    """With a node bound of 4 and 3 per key: two keys fill the node; a third key's long-poll
    is refused naming the node's bound, while its short calls are answered."""
    with start_secured(waiting_calls_max=4, waiting_calls_per_key_max=3) as broker:
        first, second, third = broker.new_user(), broker.new_user(), broker.new_user()
        create_queue(broker.stub, first, "idle")
        waiting = _hold_long_polls(broker, pb_grpc.BrokerStub(broker.open_channel()), first, 3)
        waiting.append(
            broker.stub.Consume.future(
                pb.ConsumeRequest(kind=pb.QUEUE, name="idle", timeout_s=20),
                metadata=second,
                timeout=30,
            )
        )
        wait_until(
            lambda: sum(broker.service.waiting_slots.in_flight().values()) == 4,
            10,
            "4 waiting calls",
        )
        long_poll = pb.ConsumeRequest(kind=pb.QUEUE, name="idle", timeout_s=5)
        error = refusal(broker.stub.Consume, long_poll, third, RESOURCE_EXHAUSTED)
        assert "this node already has 4 waiting calls" in error.details()
        assert "waiting_calls_max 4" in error.details()
        assert broker.user_id(third)
        publish(broker.stub, third, "idle")
        for _ in waiting[1:]:
            publish(broker.stub, third, "idle")
        for future in waiting:
            assert len(future.result(timeout=10).deliveries) == 1
