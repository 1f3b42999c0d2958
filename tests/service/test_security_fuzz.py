"""Fuzzing the Broker API: random requests in random orders never get INTERNAL, never hang, and
leave state whose invariants hold.

Hypothesis draws sequences of calls (every RPC that changes or reads state) with random names
(empty, unicode, 200-byte and longer), body sizes up to just over the message limit, keys that
are valid, revoked, made up or malformed, sequence numbers and ids at the 64-bit edges, unknown
enum values and non-finite timeouts. Each call has a deadline, so a hang fails as
DEADLINE_EXCEEDED. A `Model` mirrors what the node confirmed (successful creates, deletes,
publishes and acks), and afterwards listing must work for every user and each modelled queue's
depth must equal its confirmed publishes minus its confirmed acks (a topic's next offset, its
confirmed publishes). Queues with settings that drop or move messages on their own (max length,
TTL, max deliveries, dead-letter targets) are exercised but not modelled.

`run_calls` is shared with the smaller run against a real three-node cluster in
tests/cluster/test_security_cluster.py. Here the node is in-process over the real state machine,
with a fresh store for every example.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chasqui_node import limits
from chasqui_node.commands import EnsureAdmin
from chasqui_node.service import hash_key
from chasqui_node.state import MemoryStore
from chasqui_proto import chasqui_pb2 as pb
from chasqui_proto import chasqui_pb2_grpc as pb_grpc
from tests.service.test_security_service import SecuredBroker, bearer, start_secured

CALL_DEADLINE_S = 10.0
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
# A real cluster may change leader under load: the outcome of such a call is unknown.
UNCERTAIN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}
USERS = 3  # pool users 0..2; index 3 is the admin


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Draw from one of the strategies with the given relative weights (`st.one_of` would
    pick each distinct strategy about equally, whatever is repeated)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda index: table[index])


_NAME_CHARS = limits.NAME_ALPHABET
valid_names_list = ["jobs", "news", "dlq", "a", "Z.9-_"]
valid_names = st.sampled_from(valid_names_list)
names = weighted(
    (12, valid_names),
    (1, st.text(max_size=12)),  # any unicode, mostly invalid
    (1, st.text(alphabet=_NAME_CHARS, min_size=limits.NAME_BYTES_MAX - 1, max_size=201)),
    (1, st.just("")),
    (1, st.text(alphabet="é☃😀 /\x00", min_size=1, max_size=4)),
)
kinds = st.sampled_from([pb.QUEUE, pb.TOPIC, pb.QUEUE, pb.TOPIC, pb.KIND_UNSPECIFIED, 7])
u64 = st.one_of(st.integers(0, 5), st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64 - 1]))
u32 = st.one_of(st.integers(0, 5), st.sampled_from([501, 2**31, 2**32 - 1]))
body_sizes = st.one_of(
    st.integers(0, 64),
    st.sampled_from([limits.MESSAGE_BYTES_MAX, limits.MESSAGE_BYTES_MAX + 1]),
)
timeouts = st.sampled_from([0.0, 0.0, 0.01, -1.0, float("nan"), float("inf"), 61.0])
producer_ids = st.one_of(st.just(""), st.sampled_from(["p1", "p2"]), st.text(max_size=70))
user_ids = st.one_of(st.sampled_from(["u1", "u2", "u3", "u4", "u5", "u0", "x"]), st.text())
# Who calls: a pool user, the admin, nobody, or a made-up or malformed authorization value.
pool = st.integers(0, USERS)
callers = weighted(
    (16, pool),
    (1, st.just(None)),
    (1, st.text(alphabet=string.ascii_letters + string.digits + "-_ .", max_size=40)),
)

simple_creates = st.tuples(
    st.sampled_from(["create_queue_simple", "create_topic_simple"]), pool, valid_names
)
simple_traffic = st.one_of(
    st.tuples(
        st.just("publish"),
        pool,
        kinds,
        valid_names,
        st.integers(0, 8),
        producer_ids,
        u64,
        st.just(0),
    ),
    st.tuples(
        st.just("consume"), pool, kinds, valid_names, st.integers(1, 3), st.just(0.0), st.just(0)
    ),
    st.tuples(st.just("settle"), pool, st.sampled_from(["ack", "ack", "nack", "extend"]), u64),
    st.tuples(st.just("subscribe"), pool, kinds, valid_names, st.integers(0, 2), u64),
)
calls = weighted(
    (2, simple_creates),
    (8, simple_traffic),
    (
        10,
        st.one_of(
            st.tuples(
                st.just("create_queue"),
                callers,
                names,
                st.booleans(),
                st.sampled_from([0, 0, 1, limits.VISIBILITY_TIMEOUT_MS_MAX + 1]),
                st.sampled_from([0, 0, 0, 1, limits.QUEUE_DEPTH_MAX + 1]),  # max_length
                st.sampled_from([0, 0, 0, 5, limits.MESSAGE_TTL_MS_MAX + 1]),  # message_ttl_ms
                st.sampled_from([0, 0, 0, 1, limits.MAX_DELIVERIES_MAX + 1]),  # max_deliveries
                st.sampled_from(["", "", "", "dlq", "jobs", "bad name"]),  # dead_letter_queue
                st.sampled_from([pb.REJECT_PUBLISH, pb.DROP_HEAD, 9]),
            ),
            st.tuples(st.just("create_topic"), callers, names, st.booleans(), u64, u64),
            st.tuples(st.just("delete"), callers, kinds, names),
            st.tuples(
                st.just("publish"),
                callers,
                kinds,
                names,
                body_sizes,
                producer_ids,
                u64,
                st.integers(0, 2),
            ),
            st.tuples(
                st.just("batch"),
                callers,
                kinds,
                names,
                producer_ids,
                st.lists(st.tuples(st.integers(0, 32), u64, st.integers(0, 1)), max_size=4),
                st.sampled_from([0, 0, limits.PUBLISH_BATCH_MESSAGES_MAX + 1]),  # extra empty items
            ),
            st.tuples(st.just("consume"), callers, kinds, names, u32, timeouts, u64),
            st.tuples(st.just("settle"), callers, st.sampled_from(["ack", "nack", "extend"]), u64),
            st.tuples(
                st.just("ack_raw"),
                callers,
                kinds,
                names,
                u64,
                u32,
                st.sampled_from(["ack", "nack"]),
            ),
            st.tuples(st.just("subscribe"), callers, kinds, names, st.integers(0, 3), u64),
            st.tuples(st.just("unsubscribe"), callers, kinds, names),
            st.tuples(
                st.just("set_access"),
                callers,
                kinds,
                names,
                st.lists(user_ids, max_size=3),
                st.lists(user_ids, max_size=3),
            ),
            st.tuples(st.just("list"), callers, st.booleans()),
            st.tuples(st.just("revoke"), callers, user_ids),
            st.tuples(st.just("create_user"), callers, st.booleans()),
        ),
    ),
)


@dataclass
class Model:
    """What the node confirmed: stored sequences per modelled queue, offsets per topic."""

    queues: dict[str, set[int]] = field(default_factory=dict)
    topics: dict[str, int] = field(default_factory=dict)
    unmodelled: set[str] = field(default_factory=set)  # queue names with self-moving messages
    deliveries: list[Any] = field(default_factory=list)  # recent (caller, Delivery) pairs
    uncertain: bool = False  # some call's outcome is unknown (real cluster only)


@dataclass
class Caller:
    stub: pb_grpc.BrokerStub
    keys: list[str]  # pool users then the admin

    def metadata(self, who: Any) -> tuple[tuple[str, str], ...]:
        if who is None:
            return ()
        if isinstance(who, int):
            return bearer(self.keys[who])
        return (("authorization", who),)


def _call(method: Any, request: Any, metadata: Any, model: Model) -> Any:
    """The response, or None when refused; INTERNAL, UNKNOWN or a hang fail the test."""
    try:
        return method(request, metadata=metadata, timeout=CALL_DEADLINE_S)
    except grpc.RpcError as error:
        code = error.code()
        assert code not in NEVER, f"{code}: {error.details()} for {type(request).__name__}"
        assert "Traceback" not in (error.details() or "")
        if code in UNCERTAIN:
            model.uncertain = True
        return None


def _record_receipts(model: Model, kind: int, name: str, receipts: Any) -> None:
    for receipt in receipts:
        if receipt.duplicate:
            continue
        if kind == pb.QUEUE and name in model.queues:
            model.queues[name].add(receipt.sequence)
        elif kind == pb.TOPIC and name in model.topics:
            model.topics[name] += 1


def run_call(caller: Caller, model: Model, call: tuple[Any, ...]) -> None:
    stub, action, who = caller.stub, call[0], call[1]
    metadata = caller.metadata(who)
    if action in ("create_queue_simple", "create_topic_simple"):
        name = call[2]
        if action == "create_queue_simple":
            call = ("create_queue", who, name, True, 0, 0, 0, 0, "", pb.REJECT_PUBLISH)
        else:
            call = ("create_topic", who, name, True, 0, 0)
    if call[0] == "create_queue":
        _, _, name, exist_ok, visibility, max_length, ttl, max_deliveries, dlq, overflow = call
        request = pb.CreateQueueRequest(
            name=name,
            exist_ok=exist_ok,
            visibility_timeout_ms=visibility,
            max_length=max_length,
            message_ttl_ms=ttl,
            max_deliveries=max_deliveries,
            dead_letter_queue=dlq,
            overflow=overflow,
        )
        moving = bool(max_length or ttl or max_deliveries or dlq or overflow == pb.DROP_HEAD)
        if dlq:
            model.unmodelled.add(dlq)
        response = _call(stub.CreateQueue, request, metadata, model)
        if response is not None and response.created:
            if moving or name in model.unmodelled:
                model.unmodelled.add(name)
                model.queues.pop(name, None)
            else:
                model.queues[name] = set()
    elif call[0] == "create_topic":
        _, _, name, exist_ok, retention_ms, retention_bytes = call
        request = pb.CreateTopicRequest(
            name=name,
            exist_ok=exist_ok,
            retention_ms=retention_ms,
            retention_bytes=retention_bytes,
        )
        response = _call(stub.CreateTopic, request, metadata, model)
        if response is not None and response.created:
            # A short retention drops messages on its own: only the default is modelled.
            if retention_ms or retention_bytes:
                model.topics.pop(name, None)
            else:
                model.topics[name] = 0
    elif action == "delete":
        _, _, kind, name = call
        if kind == pb.TOPIC:
            deleted = _call(stub.DeleteTopic, pb.DeleteTopicRequest(name=name), metadata, model)
            if deleted is not None:
                model.topics.pop(name, None)
        elif kind == pb.QUEUE:
            deleted = _call(stub.DeleteQueue, pb.DeleteQueueRequest(name=name), metadata, model)
            if deleted is not None:
                model.queues.pop(name, None)
    elif action == "publish":
        _, _, kind, name, size, producer_id, sequence, delay_ms = call
        request = pb.PublishRequest(
            kind=kind,
            name=name,
            body=b"x" * size,
            producer_id=producer_id,
            sequence=sequence,
            delay_ms=delay_ms,
        )
        response = _call(stub.Publish, request, metadata, model)
        if response is not None:
            _record_receipts(model, kind, name, [response.receipt])
    elif action == "batch":
        _, _, kind, name, producer_id, items, extra = call
        request = pb.PublishBatchRequest(
            kind=kind,
            name=name,
            producer_id=producer_id,
            items=[
                pb.PublishBatchRequest.Item(body=b"y" * size, sequence=sequence, delay_ms=delay)
                for size, sequence, delay in items
            ]
            + [pb.PublishBatchRequest.Item()] * extra,
        )
        response = _call(stub.PublishBatch, request, metadata, model)
        if response is not None:
            _record_receipts(model, kind, name, response.receipts)
    elif action == "consume":
        _, _, kind, name, max_messages, timeout_s, visibility = call
        request = pb.ConsumeRequest(
            kind=kind,
            name=name,
            max_messages=max_messages,
            timeout_s=timeout_s,
            visibility_timeout_ms=visibility,
        )
        response = _call(stub.Consume, request, metadata, model)
        if response is not None:
            model.deliveries.extend((who, delivery) for delivery in response.deliveries)
            del model.deliveries[:-20]
    elif action == "settle":
        _, _, how, pick = call
        if not model.deliveries:
            return
        holder, delivery = model.deliveries[pick % len(model.deliveries)]
        reference = pb.DeliveryRef(
            kind=delivery.kind,
            name=delivery.name,
            sequence=delivery.sequence,
            delivery_count=delivery.delivery_count,
        )
        _settle(caller, model, holder if who == 0 else who, how, reference)
    elif action == "ack_raw":
        _, _, kind, name, sequence, count, how = call
        reference = pb.DeliveryRef(kind=kind, name=name, sequence=sequence, delivery_count=count)
        _settle(caller, model, who, how, reference)
    elif action == "subscribe":
        _, _, kind, name, start, offset = call
        request = pb.SubscribeRequest(kind=kind, name=name, start=start, offset=offset)
        _call(stub.Subscribe, request, metadata, model)
    elif action == "unsubscribe":
        _, _, kind, name = call
        _call(stub.Unsubscribe, pb.UnsubscribeRequest(kind=kind, name=name), metadata, model)
    elif action == "set_access":
        _, _, kind, name, publishers, consumers = call
        request = pb.SetAccessRequest(
            kind=kind, name=name, publishers=publishers, consumers=consumers
        )
        _call(stub.SetAccess, request, metadata, model)
    elif action == "list":
        _, _, owned_only = call
        _call(stub.ListQueues, pb.ListQueuesRequest(owned_only=owned_only), metadata, model)
        _call(stub.ListTopics, pb.ListTopicsRequest(owned_only=owned_only), metadata, model)
        _call(stub.ListUsers, pb.ListUsersRequest(), metadata, model)
        _call(stub.WhoAmI, pb.WhoAmIRequest(), metadata, model)
    elif action == "revoke":
        _, _, user_id = call
        _call(stub.RevokeUser, pb.RevokeUserRequest(user_id=user_id), metadata, model)
    elif action == "create_user":
        _, _, admin = call
        _call(stub.CreateUser, pb.CreateUserRequest(admin=admin), metadata, model)
    else:
        raise AssertionError(f"unknown call {action}")


def _settle(caller: Caller, model: Model, who: Any, how: str, reference: Any) -> None:
    metadata = caller.metadata(who)
    if how == "ack":
        response = _call(caller.stub.Ack, pb.AckRequest(deliveries=[reference]), metadata, model)
        if response is not None and reference.kind == pb.QUEUE:
            stored = model.queues.get(reference.name)
            if stored is not None:
                stored.discard(reference.sequence)
    elif how == "nack":
        request = pb.NackRequest(delivery=reference, delay_ms=0)
        _call(caller.stub.Nack, request, metadata, model)
    else:
        request = pb.ExtendRequest(delivery=reference, extend_ms=1000)
        _call(caller.stub.Extend, request, metadata, model)


def check_invariants(caller: Caller, model: Model) -> None:
    """Listing works for the admin, and every modelled queue and topic matches the model."""
    admin = caller.metadata(USERS)
    timeout = CALL_DEADLINE_S
    listed_queues = caller.stub.ListQueues(pb.ListQueuesRequest(), metadata=admin, timeout=timeout)
    listed_topics = caller.stub.ListTopics(pb.ListTopicsRequest(), metadata=admin, timeout=timeout)
    caller.stub.ListUsers(pb.ListUsersRequest(), metadata=admin, timeout=timeout)
    queues = {queue.name: queue for queue in listed_queues.queues}
    topics = {topic.name: topic for topic in listed_topics.topics}
    for queue in queues.values():
        assert queue.in_flight <= queue.depth, queue
    if model.uncertain:
        return
    for name, stored in model.queues.items():
        assert name in queues, f"queue {name!r} was confirmed created and never deleted"
        assert queues[name].depth == len(stored), (name, queues[name], sorted(stored))
    for name, published in model.topics.items():
        assert name in topics, f"topic {name!r} was confirmed created and never deleted"
        assert topics[name].next_offset == published, (name, topics[name])


PREAMBLE: list[tuple[Any, ...]] = [
    ("create_queue_simple", 0, "jobs"),
    ("create_queue_simple", 0, "dlq"),
    ("create_topic_simple", 0, "news"),
    ("subscribe", 1, pb.TOPIC, "news", 0, 0),
    ("publish", 1, pb.QUEUE, "jobs", 3, "", 0, 0),
    ("publish", 1, pb.TOPIC, "news", 3, "", 0, 0),
]


def run_calls(caller: Caller, sequence: list[tuple[Any, ...]]) -> None:
    """Clear the usual names (the admin may delete anything), run a short preamble so random
    calls find something to act on, then the calls; then check the invariants."""
    model = Model()
    admin = caller.metadata(USERS)
    for name in valid_names_list:
        _call(caller.stub.DeleteQueue, pb.DeleteQueueRequest(name=name), admin, model)
        _call(caller.stub.DeleteTopic, pb.DeleteTopicRequest(name=name), admin, model)
    for call in [*PREAMBLE, *sequence]:
        run_call(caller, model, call)
    check_invariants(caller, model)


@pytest.fixture(scope="module")
def fuzzed_node() -> Iterator[SecuredBroker]:
    with start_secured(signup_open=False) as broker:
        yield broker


def _fresh_caller(broker: SecuredBroker) -> Caller:
    """Start each example from an empty state with three users and the admin."""
    admin = broker.admin
    admin_key = admin[0][1].removeprefix("Bearer ")
    broker.replication.store = MemoryStore()
    broker.replication.propose_many([EnsureAdmin(hash_key(admin_key))], 5)
    keys = [
        broker.stub.CreateUser(pb.CreateUserRequest(), metadata=admin, timeout=5).key
        for _ in range(USERS)
    ]
    return Caller(broker.stub, [*keys, admin_key])


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sequence=st.lists(calls, min_size=5, max_size=30))
def test_random_calls_never_fail_internally(
    fuzzed_node: SecuredBroker, sequence: list[tuple[Any, ...]]
) -> None:
    run_calls(_fresh_caller(fuzzed_node), sequence)
