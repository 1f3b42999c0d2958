"""The client's routing and retry rules, against fake brokers served in-process.

Each test starts one or more tiny gRPC servers on 127.0.0.1 port 0 whose `FakeBroker` servicer
answers as a leader, a follower with a `chasqui-leader` hint, a node with no leader, or a leader
that loses responses, and records every request it saw. The tests then check which node the
client called, with which idempotency key, and that every failure ends within the call budget.
These use local sockets (unlike the rest of tests/unit) because the client's contract is about
gRPC statuses and metadata; the real three-node cluster tests live in tests/cluster.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from chasqui_client import Client, Message, errors
from chasqui_client.limits import GRPC_MESSAGE_BYTES_MAX
from chasqui_proto import chasqui_pb2, chasqui_pb2_grpc

KEY = "test-key"
USER_ID = "u-1"


@dataclass
class Seen:
    rpc: str
    request: Any
    authorization: str | None
    time_remaining_s: float | None


@dataclass
class FakeBroker(chasqui_pb2_grpc.BrokerServicer):
    """A single-node broker in memory. Behaviour switches are plain attributes tests set."""

    leader_hint: str | None = None  # answer every call UNAVAILABLE with this hint
    no_leader: bool = False  # answer every call UNAVAILABLE without a hint
    # Statuses to answer the next calls of an RPC with, *after* doing the work (lost replies).
    fail_after_work: dict[str, list[grpc.StatusCode]] = field(default_factory=dict)
    delay_after_work_s: dict[str, list[float]] = field(default_factory=dict)
    # Statuses to answer an RPC with before doing anything, every time.
    refuse: dict[str, tuple[grpc.StatusCode, str]] = field(default_factory=dict)
    deliveries: list[chasqui_pb2.Delivery] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    receipts: dict[tuple[str, int], int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def calls(self, rpc: str) -> list[Seen]:
        with self.lock:
            return [seen for seen in self.seen if seen.rpc == rpc]

    def _enter(self, rpc: str, request: Any, context: grpc.ServicerContext) -> None:
        authorization = dict(context.invocation_metadata()).get("authorization")
        with self.lock:
            self.seen.append(Seen(rpc, request, authorization, context.time_remaining()))
        if self.leader_hint is not None:
            context.set_trailing_metadata((("chasqui-leader", self.leader_hint),))
            context.abort(grpc.StatusCode.UNAVAILABLE, f"not the leader; try {self.leader_hint}")
        if self.no_leader:
            context.abort(grpc.StatusCode.UNAVAILABLE, "no leader elected yet; retry shortly")
        if rpc in self.refuse:
            code, details = self.refuse[rpc]
            context.abort(code, details)
        if rpc != "CreateUser" and authorization != f"Bearer {KEY}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown key")

    def _leave(self, rpc: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            failures = self.fail_after_work.get(rpc)
            failure = failures.pop(0) if failures else None
            delays = self.delay_after_work_s.get(rpc)
            delay_s = delays.pop(0) if delays else 0.0
        time.sleep(delay_s)
        if failure is not None:
            context.abort(failure, "leader changed before the publish was committed")

    def _receipt(self, producer_id: str, sequence: int) -> chasqui_pb2.Receipt:
        with self.lock:
            key = (producer_id, sequence)
            if key in self.receipts:
                return chasqui_pb2.Receipt(sequence=self.receipts[key], duplicate=True)
            self.receipts[key] = len(self.receipts) + 1
            return chasqui_pb2.Receipt(sequence=self.receipts[key], duplicate=False)

    def CreateUser(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("CreateUser", request, context)
        return chasqui_pb2.CreateUserResponse(key=KEY, user_id=USER_ID)

    def WhoAmI(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("WhoAmI", request, context)
        return chasqui_pb2.WhoAmIResponse(user_id=USER_ID, admin=False)

    def CreateQueue(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("CreateQueue", request, context)
        self._leave("CreateQueue", context)
        return chasqui_pb2.CreateQueueResponse(created=True)

    def CreateTopic(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("CreateTopic", request, context)
        return chasqui_pb2.CreateTopicResponse(created=True)

    def DeleteQueue(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("DeleteQueue", request, context)
        return chasqui_pb2.DeleteQueueResponse()

    def DeleteTopic(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("DeleteTopic", request, context)
        return chasqui_pb2.DeleteTopicResponse()

    def Unsubscribe(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("Unsubscribe", request, context)
        return chasqui_pb2.UnsubscribeResponse()

    def ListQueues(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("ListQueues", request, context)
        info = chasqui_pb2.QueueInfo(name="jobs", owner=USER_ID, depth=3, in_flight=1)
        return chasqui_pb2.ListQueuesResponse(queues=[info])

    def ListTopics(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("ListTopics", request, context)
        info = chasqui_pb2.TopicInfo(name="news", owner="u-2", subscribed=True, next_offset=7)
        return chasqui_pb2.ListTopicsResponse(topics=[info])

    def Subscribe(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("Subscribe", request, context)
        return chasqui_pb2.SubscribeResponse(offset=request.offset)

    def Publish(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("Publish", request, context)
        receipt = self._receipt(request.producer_id, request.sequence)
        self._leave("Publish", context)
        return chasqui_pb2.PublishResponse(receipt=receipt)

    def PublishBatch(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("PublishBatch", request, context)
        receipts = [self._receipt(request.producer_id, item.sequence) for item in request.items]
        self._leave("PublishBatch", context)
        return chasqui_pb2.PublishBatchResponse(receipts=receipts)

    def Consume(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("Consume", request, context)
        with self.lock:
            ready = self.deliveries[: max(1, request.max_messages)]
            del self.deliveries[: len(ready)]
        if not ready:
            time.sleep(request.timeout_s)  # a long-poll on which nothing arrives
        return chasqui_pb2.ConsumeResponse(deliveries=ready)

    def Ack(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("Ack", request, context)
        self._leave("Ack", context)
        return chasqui_pb2.AckResponse()

    def Nack(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("Nack", request, context)
        return chasqui_pb2.NackResponse()

    def Extend(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("Extend", request, context)
        return chasqui_pb2.ExtendResponse()

    def ClusterStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("ClusterStatus", request, context)
        member = chasqui_pb2.MemberStatus(node_id="n1", client_address="a:1", connected=True)
        return chasqui_pb2.ClusterStatusResponse(
            node_id="n1", role="leader", term=4, leader_id="n1", members=[member], has_quorum=True
        )


StartBroker = Callable[[FakeBroker], str]


@pytest.fixture
def start_broker() -> Iterator[StartBroker]:
    """Serves a FakeBroker on 127.0.0.1 port 0; returns its address. Stopped after the test."""
    servers: list[grpc.Server] = []

    def start(broker: FakeBroker) -> str:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16),
            options=[
                ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES_MAX),
                ("grpc.max_send_message_length", GRPC_MESSAGE_BYTES_MAX),
            ],
        )
        chasqui_pb2_grpc.add_BrokerServicer_to_server(broker, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


@pytest.fixture
def closed_address() -> str:
    """An address on which nothing listens (connection refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"


def delivery(sequence: int = 5) -> chasqui_pb2.Delivery:
    return chasqui_pb2.Delivery(
        kind=chasqui_pb2.QUEUE,
        name="jobs",
        sequence=sequence,
        body="héllo".encode(),
        delivery_count=2,
        publish_time_ms=1000,
        producer_id="p",
        lease_deadline_ms=31000,
    )


# ---- users and authentication ----------------------------------------------------------------


def test_without_key_client_registers_user_and_sends_bearer_key_on_later_calls(
    start_broker: StartBroker,
) -> None:
    broker = FakeBroker()
    with Client([start_broker(broker)]) as client:
        assert (client.key, client.user_id) == (KEY, USER_ID)
        client.create_topic("news")
    create_user, create_topic = broker.seen
    assert create_user.authorization is None
    assert create_topic.authorization == f"Bearer {KEY}"


def test_wrong_key_raises_unauthenticated(start_broker: StartBroker) -> None:
    broker = FakeBroker()
    with (
        Client([start_broker(broker)], key="wrong") as client,
        pytest.raises(errors.Unauthenticated) as raised,
    ):
        client.whoami()
    assert raised.value.code == "UNAUTHENTICATED"
    assert raised.value.message == "unknown key"


# ---- routing ---------------------------------------------------------------------------------


def test_follower_hint_redirects_to_leader_at_once_and_the_leader_is_cached(
    start_broker: StartBroker,
) -> None:
    leader = FakeBroker()
    leader_address = start_broker(leader)
    follower = FakeBroker(leader_hint=leader_address)
    follower_address = start_broker(follower)
    with Client([follower_address], key=KEY) as client:
        started = time.monotonic()
        client.create_queue("jobs")
        assert time.monotonic() - started < 1.0  # no backoff pause on a redirect
        client.create_queue("more")
        assert client.leader == leader_address
        assert client.endpoints == [follower_address, leader_address]
    assert len(follower.calls("CreateQueue")) == 1
    assert [seen.request.name for seen in leader.calls("CreateQueue")] == ["jobs", "more"]


def test_no_leader_answer_moves_on_to_the_next_endpoint(start_broker: StartBroker) -> None:
    electing = FakeBroker(no_leader=True)
    leader = FakeBroker()
    addresses = [start_broker(electing), start_broker(leader)]
    with Client(addresses, key=KEY) as client:
        client.create_topic("news")
        assert client.leader == addresses[1]
    assert len(leader.calls("CreateTopic")) == 1


def test_refused_endpoint_is_skipped(start_broker: StartBroker, closed_address: str) -> None:
    leader = FakeBroker()
    with Client([closed_address, start_broker(leader)], key=KEY) as client:
        assert client.whoami().user_id == USER_ID


def test_all_endpoints_down_raise_no_endpoint_available_naming_each_within_budget(
    closed_address: str,
) -> None:
    silent = socket.socket()  # accepts TCP but never speaks HTTP/2: the channel never connects
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    silent_address = f"127.0.0.1:{silent.getsockname()[1]}"
    budget_s = 1.0
    try:
        with Client(
            [closed_address, silent_address],
            key=KEY,
            call_timeout_s=budget_s,
            connect_timeout_s=0.2,
        ) as client:
            started = time.monotonic()
            with pytest.raises(errors.NoEndpointAvailable) as raised:
                client.create_topic("news")
            elapsed_s = time.monotonic() - started
    finally:
        silent.close()
    assert budget_s <= elapsed_s + 0.05 and elapsed_s < budget_s + 0.5
    assert isinstance(raised.value, errors.Unavailable)
    assert set(raised.value.attempts) == {closed_address, silent_address}
    assert closed_address in raised.value.message and silent_address in raised.value.message
    assert "could not connect" in raised.value.attempts[silent_address]


def test_cluster_without_leader_is_retried_with_backoff_then_gives_up(
    start_broker: StartBroker,
) -> None:
    brokers = [FakeBroker(no_leader=True), FakeBroker(no_leader=True)]
    with Client([start_broker(b) for b in brokers], key=KEY, call_timeout_s=0.8) as client:
        started = time.monotonic()
        with pytest.raises(errors.NoEndpointAvailable) as raised:
            client.create_topic("news")
        assert time.monotonic() - started < 1.3
    assert "no leader elected yet" in raised.value.message
    for broker in brokers:
        # Several rounds, but paced by the backoff (50 ms doubling), not a busy loop.
        assert 2 <= len(broker.calls("CreateTopic")) <= 8


def test_flapping_leader_hints_stay_bounded(start_broker: StartBroker) -> None:
    first, second = FakeBroker(), FakeBroker()
    first_address, second_address = start_broker(first), start_broker(second)
    first.leader_hint, second.leader_hint = second_address, first_address
    with Client([first_address], key=KEY, call_timeout_s=0.6) as client:
        started = time.monotonic()
        with pytest.raises(errors.NoEndpointAvailable):
            client.create_topic("news")
        assert time.monotonic() - started < 1.1
    assert len(first.calls("CreateTopic")) + len(second.calls("CreateTopic")) < 40


def test_new_leader_is_found_after_the_cached_one_goes_down(
    start_broker: StartBroker,
) -> None:
    old_leader, new_leader = FakeBroker(), FakeBroker()
    addresses = [start_broker(old_leader), start_broker(new_leader)]
    with Client(addresses, key=KEY) as client:
        client.create_topic("a")
        assert client.leader == addresses[0]
        old_leader.leader_hint = addresses[1]
        client.create_topic("b")
        assert client.leader == addresses[1]


# ---- safe retries ----------------------------------------------------------------------------


def test_publish_after_lost_reply_is_retried_with_same_id_and_is_a_duplicate(
    start_broker: StartBroker,
) -> None:
    broker = FakeBroker(fail_after_work={"Publish": [grpc.StatusCode.ABORTED]})
    with Client([start_broker(broker)], key=KEY) as client:
        receipt = client.publish_queue("jobs", b"payload")
    first, retry = broker.calls("Publish")
    assert (first.request.producer_id, first.request.sequence) == (
        retry.request.producer_id,
        retry.request.sequence,
    )
    assert first.request.producer_id == client.producer_id
    assert (receipt.sequence, receipt.duplicate) == (1, True)


def test_publish_whose_reply_times_out_is_retried_with_same_id(
    start_broker: StartBroker,
) -> None:
    broker = FakeBroker(delay_after_work_s={"Publish": [0.6]})
    with Client([start_broker(broker)], key=KEY, attempt_timeout_s=0.2) as client:
        client.whoami()  # connect first: a deadline on a connected channel is ambiguous
        receipt = client.publish_topic("news", "text")
    first, retry = broker.calls("Publish")
    assert first.request.sequence == retry.request.sequence
    assert retry.request.body == b"text"
    assert receipt.duplicate


def test_publish_that_never_confirms_raises_outcome_unknown_not_unavailable(
    start_broker: StartBroker,
) -> None:
    broker = FakeBroker(fail_after_work={"Publish": [grpc.StatusCode.ABORTED] * 1000})
    with (
        Client([start_broker(broker)], key=KEY, call_timeout_s=0.5) as client,
        pytest.raises(errors.OutcomeUnknown) as raised,
    ):
        client.publish_queue("jobs", b"x")
    assert not isinstance(raised.value, errors.Unavailable)
    assert "safe to retry with the same id" in raised.value.message
    assert len({seen.request.sequence for seen in broker.calls("Publish")}) == 1


def test_each_publish_gets_a_new_sequence_across_threads(start_broker: StartBroker) -> None:
    broker = FakeBroker()
    with Client([start_broker(broker)], key=KEY) as client:

        def publish_some(thread_index: int) -> None:
            for index in range(25):
                client.publish_queue("jobs", f"{thread_index}-{index}")

        threads = [threading.Thread(target=publish_some, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    sequences = [seen.request.sequence for seen in broker.calls("Publish")]
    assert sorted(sequences) == list(range(1, 201))


def test_ack_is_retried_after_aborted(start_broker: StartBroker) -> None:
    broker = FakeBroker(fail_after_work={"Ack": [grpc.StatusCode.ABORTED]})
    broker.deliveries.append(delivery())
    with Client([start_broker(broker)], key=KEY) as client:
        message = client.consume_queue("jobs")
        assert message is not None
        client.ack(message)
    assert len(broker.calls("Ack")) == 2


def test_non_idempotent_create_is_not_retried_after_an_ambiguous_failure(
    start_broker: StartBroker,
) -> None:
    broker = FakeBroker(fail_after_work={"CreateQueue": [grpc.StatusCode.ABORTED]})
    with (
        Client([start_broker(broker)], key=KEY) as client,
        pytest.raises(errors.OutcomeUnknown) as raised,
    ):
        client.create_queue("jobs")
    assert raised.value.code == "ABORTED"
    assert len(broker.calls("CreateQueue")) == 1


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.INTERNAL, errors.Internal),
    ],
)
def test_non_retryable_status_is_raised_at_once_with_the_node_message(
    start_broker: StartBroker, code: grpc.StatusCode, error_class: type[errors.ChasquiError]
) -> None:
    broker = FakeBroker(refuse={"Publish": (code, 'queue "jobs" says no')})
    with (
        Client([start_broker(broker)], key=KEY) as client,
        pytest.raises(error_class) as raised,
    ):
        client.publish_queue("jobs", b"x")
    assert (raised.value.code, raised.value.message) == (code.name, 'queue "jobs" says no')
    assert len(broker.calls("Publish")) == 1


# ---- the API over the wire -------------------------------------------------------------------


def test_consume_long_poll_waits_server_side_with_a_deadline_covering_the_wait(
    start_broker: StartBroker,
) -> None:
    broker = FakeBroker()
    with Client([start_broker(broker)], key=KEY, call_timeout_s=2.0) as client:
        started = time.monotonic()
        assert client.consume_topic("news", timeout_s=0.5) is None
        assert time.monotonic() - started >= 0.5
    (consume,) = broker.calls("Consume")  # one call: no client-side polling loop
    assert consume.request.timeout_s == 0.5
    assert consume.request.kind == chasqui_pb2.TOPIC
    assert consume.time_remaining_s is not None
    assert 2.0 < consume.time_remaining_s <= 2.5


def test_consumed_message_maps_fields_and_is_acked_nacked_extended_by_reference(
    start_broker: StartBroker,
) -> None:
    broker = FakeBroker()
    broker.deliveries.extend([delivery(5), delivery(6)])
    with Client([start_broker(broker)], key=KEY) as client:
        messages = client.consume_many_queue("jobs", 10, visibility_timeout_s=2.5)
        first, second = messages
        assert isinstance(first, Message)
        assert (first.kind, first.name, first.sequence, first.delivery_count) == (
            "queue",
            "jobs",
            5,
            2,
        )
        assert (first.text, first.id, first.lease_deadline_ms) == ("héllo", "queue:jobs:5", 31000)
        client.ack(messages)
        client.nack(first, delay_s=1.5)
        client.extend(second, 30)
    assert broker.calls("Consume")[0].request.visibility_timeout_ms == 2500
    (ack,) = broker.calls("Ack")
    assert [(ref.name, ref.sequence, ref.delivery_count) for ref in ack.request.deliveries] == [
        ("jobs", 5, 2),
        ("jobs", 6, 2),
    ]
    assert broker.calls("Nack")[0].request.delay_ms == 1500
    assert broker.calls("Extend")[0].request.extend_ms == 30_000
    assert broker.calls("Extend")[0].request.delivery.sequence == 6


def test_publish_many_splits_into_batches_of_500_with_receipts_in_order(
    start_broker: StartBroker,
) -> None:
    broker = FakeBroker()
    with Client([start_broker(broker)], key=KEY) as client:
        receipts = client.publish_many_queue("jobs", [f"m{i}" for i in range(1201)])
    batches = broker.calls("PublishBatch")
    assert [len(batch.request.items) for batch in batches] == [500, 500, 201]
    sequences = [item.sequence for batch in batches for item in batch.request.items]
    assert sequences == list(range(1, 1202))
    assert [receipt.sequence for receipt in receipts] == list(range(1, 1202))
    assert batches[2].request.items[-1].body == b"m1200"


def test_publish_many_splits_at_4_mib(start_broker: StartBroker) -> None:
    broker = FakeBroker()
    one_mib = b"x" * (1024 * 1024)
    with Client([start_broker(broker)], key=KEY) as client:
        receipts = client.publish_many_topic("news", [one_mib] * 5)
    assert [len(batch.request.items) for batch in broker.calls("PublishBatch")] == [4, 1]
    assert len(receipts) == 5


def test_listing_subscribing_and_status_map_the_proto(start_broker: StartBroker) -> None:
    broker = FakeBroker()
    with Client([start_broker(broker)], key=KEY) as client:
        (queue,) = client.list_queues(owned_only=True)
        (topic,) = client.list_topics()
        assert (queue.name, queue.depth, queue.in_flight) == ("jobs", 3, 1)
        assert (topic.owner, topic.subscribed, topic.next_offset) == ("u-2", True, 7)
        assert client.subscribe_topic("news", start="offset", offset=3) == 3
        status = client.cluster_status()
        assert (status.role, status.term, status.members[0].node_id) == ("leader", 4, "n1")
    assert broker.calls("ListQueues")[0].request.owned_only
    subscribe = broker.calls("Subscribe")[0].request
    assert (subscribe.kind, subscribe.start) == (
        chasqui_pb2.TOPIC,
        chasqui_pb2.SubscribeRequest.OFFSET,
    )


def test_deletes_and_unsubscribes_name_their_kind(start_broker: StartBroker) -> None:
    broker = FakeBroker()
    with Client([start_broker(broker)], key=KEY) as client:
        client.delete_queue("jobs")
        client.delete_topic("news")
        client.subscribe_queue("jobs")
        client.unsubscribe_queue("jobs")
        client.unsubscribe_topic("news")
    assert broker.calls("DeleteQueue")[0].request.name == "jobs"
    assert broker.calls("DeleteTopic")[0].request.name == "news"
    assert broker.calls("Subscribe")[0].request.kind == chasqui_pb2.QUEUE
    assert [(seen.request.kind, seen.request.name) for seen in broker.calls("Unsubscribe")] == [
        (chasqui_pb2.QUEUE, "jobs"),
        (chasqui_pb2.TOPIC, "news"),
    ]


def test_closed_client_refuses_calls(start_broker: StartBroker) -> None:
    client = Client([start_broker(FakeBroker())], key=KEY)
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.whoami()
