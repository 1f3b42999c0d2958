"""The synchronous Chasqui client: routing to the leader, safe retries, and the broker API.

Contract for every public method: it returns once a node answered, or raises an exception from
`chasqui_client.errors` within the call's budget (`call_timeout_s`, plus the long-poll wait for
consumes). One `Client` may be used from several threads at once.

Routing. The client keeps one gRPC channel per endpoint (created on first use) and remembers the
leader. A follower answers UNAVAILABLE with the leader's client address in the trailing metadata
`chasqui-leader`: the client switches to it at once (adding it to its endpoints if new). Any other
UNAVAILABLE, or a deadline hit before the channel ever connected, moves on to the next endpoint.
After a round in which every endpoint failed, the client pauses (jittered, 50 ms doubling to 1 s)
and starts another round, until the budget is spent.

Retries. ABORTED, and DEADLINE_EXCEEDED on a connected channel, are ambiguous: the request may have
been committed. Publishes carry `(producer_id, sequence)`, fixed before the first attempt, and the
broker drops duplicates, so they are retried with the same id (the retry's receipt then says
`duplicate=True`); acks, nacks, extends, reads and consumes are retried the same way. Creates,
deletes, subscribes and user creation are not idempotent: an ambiguous failure raises
`OutcomeUnknown` at once. When the budget runs out after an ambiguous failure the client raises
`OutcomeUnknown`, otherwise `NoEndpointAvailable` naming every endpoint tried and its last error.
Every other status (INVALID_ARGUMENT, NOT_FOUND, ...) is raised at once as its typed exception.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TypeVar

import grpc
from google.protobuf.message import Message as ProtoMessage

from chasqui_client import errors, limits
from chasqui_client.models import (
    ClusterStatus,
    Kind,
    Message,
    Overflow,
    QueueInfo,
    Receipt,
    Start,
    TopicInfo,
    WhoAmI,
)
from chasqui_proto import chasqui_pb2, chasqui_pb2_grpc

LEADER_METADATA_KEY = "chasqui-leader"

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", limits.GRPC_MESSAGE_BYTES_MAX),
    ("grpc.max_receive_message_length", limits.GRPC_MESSAGE_BYTES_MAX),
    # gRPC's reconnect backoff grows to 120 s by default, during which calls to a node that came
    # back fail at once; a broker's nodes restart in seconds, so reconnect within about 1 s.
    ("grpc.initial_reconnect_backoff_ms", limits.RECONNECT_BACKOFF_INITIAL_MS),
    ("grpc.max_reconnect_backoff_ms", limits.RECONNECT_BACKOFF_MAX_MS),
]
# States in which a call is answered without waiting for a connection: connected or failing fast.
_SETTLED_STATES = frozenset(
    {
        grpc.ChannelConnectivity.READY,
        grpc.ChannelConnectivity.TRANSIENT_FAILURE,
        grpc.ChannelConnectivity.SHUTDOWN,
    }
)
_AMBIGUOUS_CODES = (grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED)
_NAME_ALPHABET = frozenset(limits.NAME_ALPHABET)

ResponseT = TypeVar("ResponseT", bound=ProtoMessage)


class _Endpoint:
    """One node address with its lazily created channel and its last known connectivity."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None) -> None:
        self.address = address
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)
        self.stub = chasqui_pb2_grpc.BrokerStub(self.channel)
        # Written by gRPC's polling thread under the condition; read without it where a stale
        # value only costs one extra attempt.
        self.state: grpc.ChannelConnectivity | None = None
        self._state_changed = threading.Condition()
        self._was_ready = False
        # Connect at once: an endpoint is created only when a call is about to use it.
        self.channel.subscribe(self._on_state, try_to_connect=True)

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        with self._state_changed:
            self.state = state
            self._was_ready = self._was_ready or state is grpc.ChannelConnectivity.READY
            self._state_changed.notify_all()

    def wait_settled(self, timeout_s: float) -> bool:
        """True once the channel is READY, failing fast, or idle after use; False on timeout.

        A host that drops packets keeps the channel CONNECTING: this bounds how long the client
        waits for it, without having sent anything, so moving on cannot duplicate a request. An
        IDLE channel that was connected before counts as settled: the call makes it reconnect.
        """
        with self._state_changed:
            return self._state_changed.wait_for(self._settled, timeout=timeout_s)

    def _settled(self) -> bool:
        if self.state is grpc.ChannelConnectivity.IDLE:
            # A new channel starts IDLE while it begins to connect; a used one went idle.
            return self._was_ready
        return self.state in _SETTLED_STATES

    @property
    def connected(self) -> bool:
        return self.state is grpc.ChannelConnectivity.READY

    def close(self) -> None:
        self.channel.unsubscribe(self._on_state)
        self.channel.close()


@dataclass
class _CallRecord:
    """What one call has seen so far, for its final error."""

    attempts: dict[str, str] = field(default_factory=dict)
    ambiguous_error: str | None = None


class Client:
    """A connection to a Chasqui cluster as one user.

    `endpoints` are the nodes' client addresses ("host:port"); any one reachable node is enough,
    since followers point to the leader. With `key=None` the constructor registers a new user
    (CreateUser) and keeps its key in `.key`, to reconnect later with `Client(endpoints, key)`.

    Time bounds: `call_timeout_s` is the budget of one call, retries included (a consume adds its
    long-poll `timeout_s`). `attempt_timeout_s` (default: `call_timeout_s`) bounds one attempt on
    a connected node; lower it to fail over sooner from a node that hangs. `connect_timeout_s`
    bounds an attempt on a node the client has not connected to yet.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        key: str | None = None,
        *,
        call_timeout_s: float = limits.CALL_TIMEOUT_S_DEFAULT,
        attempt_timeout_s: float | None = None,
        connect_timeout_s: float = limits.CONNECT_TIMEOUT_S_DEFAULT,
        backoff_initial_s: float = limits.BACKOFF_INITIAL_S,
        backoff_max_s: float = limits.BACKOFF_MAX_S,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            raise TypeError("endpoints must be a list of 'host:port' strings, not one string")
        addresses = list(dict.fromkeys(endpoint.strip() for endpoint in endpoints))
        if not addresses or not all(addresses):
            raise ValueError(f"endpoints must be non-empty 'host:port' strings, got {endpoints!r}")
        if attempt_timeout_s is None:
            attempt_timeout_s = call_timeout_s
        if min(call_timeout_s, attempt_timeout_s, connect_timeout_s) <= 0:
            raise ValueError("call_timeout_s, attempt_timeout_s and connect_timeout_s must be > 0")
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError("backoff_initial_s must be positive and at most backoff_max_s")
        self.call_timeout_s = call_timeout_s
        self.attempt_timeout_s = attempt_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.producer_id = uuid.uuid4().hex
        self._credentials = credentials
        self._lock = threading.Lock()
        self._addresses: list[str] = addresses
        self._endpoints: dict[str, _Endpoint] = {}
        self._leader: str | None = None
        self._sequences = itertools.count(1)
        self._closed = False
        self._random = random.Random()
        self.user_id: str | None = None
        if key is None:
            try:
                created = self._call(
                    "CreateUser",
                    chasqui_pb2.CreateUserRequest(),
                    chasqui_pb2.CreateUserResponse,
                    idempotent=False,
                    authenticated=False,
                )
            except BaseException:
                self.close()
                raise
            key = created.key
            self.user_id = created.user_id
        self.key: str = key

    # ---- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Closes every channel; calls in flight fail and later calls raise `RuntimeError`."""
        with self._lock:
            self._closed = True
            endpoints = list(self._endpoints.values())
            self._endpoints.clear()
        # Closing a watched channel waits for gRPC's connectivity poll (up to 0.2 s): in parallel.
        closers = [threading.Thread(target=endpoint.close, daemon=True) for endpoint in endpoints]
        for closer in closers:
            closer.start()
        for closer in closers:
            closer.join()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def endpoints(self) -> list[str]:
        """Known endpoints, in the order rounds try them (leader hints may have added some)."""
        with self._lock:
            return list(self._addresses)

    @property
    def leader(self) -> str | None:
        """The endpoint believed to be the leader, or None until one answered."""
        with self._lock:
            return self._leader

    # ---- users and cluster -----------------------------------------------------------------

    def whoami(self) -> WhoAmI:
        response = self._call(
            "WhoAmI", chasqui_pb2.WhoAmIRequest(), chasqui_pb2.WhoAmIResponse, idempotent=True
        )
        self.user_id = response.user_id
        return WhoAmI(user_id=response.user_id, admin=response.admin)

    def cluster_status(self) -> ClusterStatus:
        """The view of whichever node answers first (any node answers, not only the leader)."""
        response = self._call(
            "ClusterStatus",
            chasqui_pb2.ClusterStatusRequest(),
            chasqui_pb2.ClusterStatusResponse,
            idempotent=True,
        )
        return ClusterStatus.from_proto(response)

    # ---- topics and queues -----------------------------------------------------------------

    def create_queue(
        self,
        name: str,
        exist_ok: bool = False,
        *,
        visibility_timeout_s: float | None = None,
        max_deliveries: int = 0,
        dead_letter_queue: str = "",
        max_length: int = 0,
        overflow: Overflow | str = Overflow.REJECT_PUBLISH,
        message_ttl_s: float | None = None,
    ) -> bool:
        """Creates a queue; returns False when `exist_ok` found it already there.

        `None`/0 mean the defaults: visibility timeout 30 s, unlimited deliveries, no dead-letter
        queue, the cluster's queue_depth_max, no TTL.
        """
        _check_name("queue", name)
        if dead_letter_queue:
            _check_name("queue", dead_letter_queue)
        _check_range(
            "max_deliveries", max_deliveries, "max_deliveries_max", limits.MAX_DELIVERIES_MAX
        )
        if max_length < 0:
            raise errors.InvalidArgument(f"max_length of {max_length} must not be negative")
        try:
            overflow_value = Overflow(overflow)
        except ValueError:
            choices = ", ".join(repr(choice.value) for choice in Overflow)
            raise errors.InvalidArgument(
                f"overflow {overflow!r} is invalid: must be one of {choices}"
            ) from None
        request = chasqui_pb2.CreateQueueRequest(
            name=name,
            exist_ok=exist_ok,
            visibility_timeout_ms=_optional_ms(
                "visibility_timeout", visibility_timeout_s, limits.VISIBILITY_TIMEOUT_MS_MAX
            ),
            max_deliveries=max_deliveries,
            dead_letter_queue=dead_letter_queue,
            max_length=max_length,
            overflow=(
                chasqui_pb2.DROP_HEAD
                if overflow_value is Overflow.DROP_HEAD
                else chasqui_pb2.REJECT_PUBLISH
            ),
            message_ttl_ms=_optional_ms("message_ttl", message_ttl_s, limits.MESSAGE_TTL_MS_MAX),
        )
        return self._call(
            "CreateQueue", request, chasqui_pb2.CreateQueueResponse, idempotent=exist_ok
        ).created

    def create_topic(self, name: str, exist_ok: bool = False) -> bool:
        """Creates a topic; returns False when `exist_ok` found it already there."""
        _check_name("topic", name)
        request = chasqui_pb2.CreateTopicRequest(name=name, exist_ok=exist_ok)
        return self._call(
            "CreateTopic", request, chasqui_pb2.CreateTopicResponse, idempotent=exist_ok
        ).created

    def delete_queue(self, name: str) -> None:
        _check_name("queue", name)
        self._call(
            "DeleteQueue",
            chasqui_pb2.DeleteQueueRequest(name=name),
            chasqui_pb2.DeleteQueueResponse,
            idempotent=False,
        )

    def delete_topic(self, name: str) -> None:
        _check_name("topic", name)
        self._call(
            "DeleteTopic",
            chasqui_pb2.DeleteTopicRequest(name=name),
            chasqui_pb2.DeleteTopicResponse,
            idempotent=False,
        )

    def list_queues(self, owned_only: bool = False) -> list[QueueInfo]:
        request = chasqui_pb2.ListQueuesRequest(owned_only=owned_only)
        response = self._call(
            "ListQueues", request, chasqui_pb2.ListQueuesResponse, idempotent=True
        )
        return [QueueInfo.from_proto(info) for info in response.queues]

    def list_topics(self, owned_only: bool = False) -> list[TopicInfo]:
        request = chasqui_pb2.ListTopicsRequest(owned_only=owned_only)
        response = self._call(
            "ListTopics", request, chasqui_pb2.ListTopicsResponse, idempotent=True
        )
        return [TopicInfo.from_proto(info) for info in response.topics]

    # ---- subscriptions ---------------------------------------------------------------------

    def subscribe_topic(self, name: str, start: Start | str = Start.LATEST, offset: int = 0) -> int:
        """Creates this user's durable cursor on a topic; returns the next offset it receives.

        `start`: "latest" (messages published from now on), "earliest" (the oldest retained) or
        "offset" (`offset`, clamped to what is retained).
        """
        _check_name("topic", name)
        try:
            start_value = Start(start)
        except ValueError:
            choices = ", ".join(repr(choice.value) for choice in Start)
            raise errors.InvalidArgument(
                f"start {start!r} is invalid: must be one of {choices}"
            ) from None
        if offset < 0:
            raise errors.InvalidArgument(f"offset of {offset} must not be negative")
        start_proto = {
            Start.LATEST: chasqui_pb2.SubscribeRequest.LATEST,
            Start.EARLIEST: chasqui_pb2.SubscribeRequest.EARLIEST,
            Start.OFFSET: chasqui_pb2.SubscribeRequest.OFFSET,
        }[start_value]
        request = chasqui_pb2.SubscribeRequest(
            kind=chasqui_pb2.TOPIC, name=name, start=start_proto, offset=offset
        )
        return self._call(
            "Subscribe", request, chasqui_pb2.SubscribeResponse, idempotent=False
        ).offset

    def subscribe_queue(self, name: str) -> None:
        _check_name("queue", name)
        request = chasqui_pb2.SubscribeRequest(kind=chasqui_pb2.QUEUE, name=name)
        self._call("Subscribe", request, chasqui_pb2.SubscribeResponse, idempotent=False)

    def unsubscribe_topic(self, name: str) -> None:
        _check_name("topic", name)
        request = chasqui_pb2.UnsubscribeRequest(kind=chasqui_pb2.TOPIC, name=name)
        self._call("Unsubscribe", request, chasqui_pb2.UnsubscribeResponse, idempotent=False)

    def unsubscribe_queue(self, name: str) -> None:
        _check_name("queue", name)
        request = chasqui_pb2.UnsubscribeRequest(kind=chasqui_pb2.QUEUE, name=name)
        self._call("Unsubscribe", request, chasqui_pb2.UnsubscribeResponse, idempotent=False)

    # ---- publishing ------------------------------------------------------------------------

    def publish_queue(self, name: str, body: bytes | str, *, delay_s: float = 0) -> Receipt:
        """Publishes one message to a queue, deliverable no earlier than `delay_s` from now."""
        return self._publish(Kind.QUEUE, name, body, _delay_ms("delay", delay_s))

    def publish_topic(self, name: str, body: bytes | str) -> Receipt:
        """Publishes one message to a topic."""
        return self._publish(Kind.TOPIC, name, body, 0)

    def publish_many_queue(
        self, name: str, bodies: Iterable[bytes | str], *, delay_s: float = 0
    ) -> list[Receipt]:
        """Publishes many messages to a queue; returns their receipts in order.

        They travel in PublishBatch calls of at most 500 messages and 4 MiB. If a later batch
        fails, the earlier ones are already committed and the exception says nothing of them.
        """
        return self._publish_many(Kind.QUEUE, name, bodies, _delay_ms("delay", delay_s))

    def publish_many_topic(self, name: str, bodies: Iterable[bytes | str]) -> list[Receipt]:
        """Publishes many messages to a topic; see `publish_many_queue`."""
        return self._publish_many(Kind.TOPIC, name, bodies, 0)

    def _publish(self, kind: Kind, name: str, body: bytes | str, delay_ms: int) -> Receipt:
        _check_name(kind.value, name)
        payload = _encode_body(body)
        # The id is fixed once, before the first attempt: every retry must repeat it exactly.
        request = chasqui_pb2.PublishRequest(
            kind=kind.to_proto(),
            name=name,
            body=payload,
            producer_id=self.producer_id,
            sequence=self._next_sequences(1),
            delay_ms=delay_ms,
        )
        return Receipt.from_proto(
            self._call("Publish", request, chasqui_pb2.PublishResponse, idempotent=True).receipt
        )

    def _publish_many(
        self, kind: Kind, name: str, bodies: Iterable[bytes | str], delay_ms: int
    ) -> list[Receipt]:
        _check_name(kind.value, name)
        payloads = [_encode_body(body) for body in bodies]
        receipts: list[Receipt] = []
        for batch in _split_batches(payloads):
            first_sequence = self._next_sequences(len(batch))
            request = chasqui_pb2.PublishBatchRequest(
                kind=kind.to_proto(),
                name=name,
                producer_id=self.producer_id,
                items=[
                    chasqui_pb2.PublishBatchRequest.Item(
                        body=payload, sequence=first_sequence + index, delay_ms=delay_ms
                    )
                    for index, payload in enumerate(batch)
                ],
            )
            response = self._call(
                "PublishBatch", request, chasqui_pb2.PublishBatchResponse, idempotent=True
            )
            if len(response.receipts) != len(batch):
                raise errors.Internal(
                    f"PublishBatch of {len(batch)} messages answered "
                    f"{len(response.receipts)} receipts"
                )
            receipts.extend(Receipt.from_proto(receipt) for receipt in response.receipts)
        return receipts

    def _next_sequences(self, count: int) -> int:
        """Reserves `count` consecutive sequence numbers; returns the first."""
        with self._lock:
            first = next(self._sequences)
            for _ in range(count - 1):
                next(self._sequences)
        return first

    # ---- consuming -------------------------------------------------------------------------

    def consume_queue(
        self, name: str, timeout_s: float = 0, *, visibility_timeout_s: float | None = None
    ) -> Message | None:
        """Leases the next ready message, waiting up to `timeout_s` (server-side); None if none."""
        messages = self.consume_many_queue(
            name, 1, timeout_s, visibility_timeout_s=visibility_timeout_s
        )
        return messages[0] if messages else None

    def consume_topic(self, name: str, timeout_s: float = 0) -> Message | None:
        """The next message past this user's cursor, waiting up to `timeout_s`; None if none."""
        messages = self.consume_many_topic(name, 1, timeout_s)
        return messages[0] if messages else None

    def consume_many_queue(
        self,
        name: str,
        max_messages: int,
        timeout_s: float = 0,
        *,
        visibility_timeout_s: float | None = None,
    ) -> list[Message]:
        """Leases up to `max_messages` (1..500), waiting up to `timeout_s` for the first."""
        visibility_timeout_ms = _optional_ms(
            "visibility_timeout", visibility_timeout_s, limits.VISIBILITY_TIMEOUT_MS_MAX
        )
        return self._consume(Kind.QUEUE, name, max_messages, timeout_s, visibility_timeout_ms)

    def consume_many_topic(
        self, name: str, max_messages: int, timeout_s: float = 0
    ) -> list[Message]:
        """Up to `max_messages` (1..500) past the cursor, waiting up to `timeout_s` for one."""
        return self._consume(Kind.TOPIC, name, max_messages, timeout_s, 0)

    def _consume(
        self,
        kind: Kind,
        name: str,
        max_messages: int,
        timeout_s: float,
        visibility_timeout_ms: int,
    ) -> list[Message]:
        _check_name(kind.value, name)
        if not 1 <= max_messages <= limits.CONSUME_MESSAGES_MAX:
            raise errors.InvalidArgument(
                f"max_messages of {max_messages} is outside 1..consume_messages_max "
                f"{limits.CONSUME_MESSAGES_MAX}"
            )
        if not 0 <= timeout_s <= limits.CONSUME_WAIT_S_MAX:
            raise errors.InvalidArgument(
                f"timeout_s of {timeout_s:g} is outside 0..consume_wait_s_max "
                f"{limits.CONSUME_WAIT_S_MAX:g}"
            )
        request = chasqui_pb2.ConsumeRequest(
            kind=kind.to_proto(),
            name=name,
            max_messages=max_messages,
            timeout_s=timeout_s,
            visibility_timeout_ms=visibility_timeout_ms,
        )
        # A retried consume may leave an earlier lease unused; it is redelivered after its
        # visibility timeout (at-least-once), so retrying is safe.
        response = self._call(
            "Consume", request, chasqui_pb2.ConsumeResponse, idempotent=True, wait_s=timeout_s
        )
        return [Message.from_proto(delivery) for delivery in response.deliveries]

    # ---- acknowledging ---------------------------------------------------------------------

    def ack(self, messages: Message | Iterable[Message]) -> None:
        """Acks one delivery or many (split into calls of at most 1000). Idempotent."""
        batch = [messages] if isinstance(messages, Message) else list(messages)
        for start in range(0, len(batch), limits.ACK_BATCH_MAX):
            chunk = batch[start : start + limits.ACK_BATCH_MAX]
            request = chasqui_pb2.AckRequest(deliveries=[message.to_ref() for message in chunk])
            self._call("Ack", request, chasqui_pb2.AckResponse, idempotent=True)

    def nack(self, message: Message, delay_s: float = 0) -> None:
        """Returns a leased delivery to its queue, deliverable again after `delay_s`."""
        request = chasqui_pb2.NackRequest(
            delivery=message.to_ref(), delay_ms=_delay_ms("delay", delay_s)
        )
        self._call("Nack", request, chasqui_pb2.NackResponse, idempotent=True)

    def extend(self, message: Message, seconds: float) -> None:
        """Moves a lease's deadline to `seconds` from now."""
        extend_ms = _optional_ms("extend", seconds, limits.VISIBILITY_TIMEOUT_MS_MAX)
        request = chasqui_pb2.ExtendRequest(delivery=message.to_ref(), extend_ms=extend_ms)
        self._call("Extend", request, chasqui_pb2.ExtendResponse, idempotent=True)

    # ---- routing ---------------------------------------------------------------------------

    def _endpoint(self, address: str) -> _Endpoint:
        with self._lock:
            if self._closed:
                raise RuntimeError("client is closed")
            endpoint = self._endpoints.get(address)
            if endpoint is None:
                endpoint = _Endpoint(address, self._credentials)
                self._endpoints[address] = endpoint
            return endpoint

    def _round_order(self) -> list[str]:
        """The leader first (if known), then every other endpoint in list order."""
        with self._lock:
            if self._closed:
                raise RuntimeError("client is closed")
            leader = self._leader
            others = [address for address in self._addresses if address != leader]
        return [leader, *others] if leader is not None else others

    def _follow_hint(self, hint: str) -> None:
        with self._lock:
            if hint not in self._addresses:
                self._addresses.append(hint)
            self._leader = hint

    def _forget_leader(self, address: str) -> None:
        with self._lock:
            if self._leader == address:
                self._leader = None

    def _remember_leader(self, address: str) -> None:
        with self._lock:
            self._leader = address

    def _call(
        self,
        rpc: str,
        request: ProtoMessage,
        response_type: type[ResponseT],
        *,
        idempotent: bool,
        wait_s: float = 0.0,
        authenticated: bool = True,
    ) -> ResponseT:
        """Sends `request` to the leader, following hints and retrying within the budget.

        `wait_s` is the server-side long-poll of a consume: it extends the budget, and a retry
        asks for no more wait than the budget has left.
        """
        budget_s = self.call_timeout_s + wait_s
        deadline = time.monotonic() + budget_s
        metadata = (("authorization", f"Bearer {self.key}"),) if authenticated else ()
        record = _CallRecord()
        backoff_s = self.backoff_initial_s
        attempts_made = 0
        while True:
            order = self._round_order()
            redirects = 0
            index = 0
            while index < len(order):
                address = order[index]
                index += 1
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    raise self._budget_error(budget_s, record)
                endpoint = self._endpoint(address)
                request_wait_s = wait_s
                if attempts_made and wait_s > 0 and isinstance(request, chasqui_pb2.ConsumeRequest):
                    # A retry waits only for what is left of the caller's wait.
                    request_wait_s = min(wait_s, max(0.0, remaining_s - self.call_timeout_s))
                    request.timeout_s = request_wait_s
                if not endpoint.connected and not endpoint.wait_settled(
                    min(remaining_s, self.connect_timeout_s)
                ):
                    record.attempts[address] = (
                        f"could not connect within connect_timeout_s {self.connect_timeout_s:g}"
                    )
                    self._forget_leader(address)
                    continue
                attempt_timeout_s = min(
                    deadline - time.monotonic(), self.attempt_timeout_s + request_wait_s
                )
                attempts_made += 1
                try:
                    response = getattr(endpoint.stub, rpc)(
                        request, timeout=attempt_timeout_s, metadata=metadata
                    )
                except grpc.RpcError as error:
                    code = errors.status_code_of(error)
                    description = f"{code.name}: {errors.details_of(error)}"
                    record.attempts[address] = description
                    if code is grpc.StatusCode.UNAVAILABLE:
                        self._forget_leader(address)
                        hint = _leader_hint(error)
                        if hint and hint != address and redirects < limits.REDIRECTS_PER_ROUND_MAX:
                            redirects += 1
                            self._follow_hint(hint)
                            order.insert(index, hint)
                        continue
                    if code is grpc.StatusCode.DEADLINE_EXCEEDED and not endpoint.connected:
                        # Never connected: the request cannot have reached the node.
                        self._forget_leader(address)
                        continue
                    if code in _AMBIGUOUS_CODES:
                        record.ambiguous_error = f"{address}: {description}"
                        if not idempotent:
                            raise errors.OutcomeUnknown(
                                f"{rpc} on {address} failed with {description}; it may or may "
                                "not have happened",
                                code=code.name,
                            ) from None
                        self._forget_leader(address)
                        continue
                    raise errors.from_rpc_error(error) from None
                self._remember_leader(address)
                if not isinstance(response, response_type):
                    raise errors.Internal(f"{rpc} answered {type(response).__name__}")
                return response
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise self._budget_error(budget_s, record)
            time.sleep(min(remaining_s, self._random.uniform(backoff_s / 2, backoff_s)))
            backoff_s = min(self.backoff_max_s, backoff_s * 2)

    @staticmethod
    def _budget_error(budget_s: float, record: _CallRecord) -> errors.ChasquiError:
        if record.ambiguous_error is not None:
            return errors.OutcomeUnknown(
                f"no confirmed answer within {budget_s:g} s after {record.ambiguous_error}; it "
                "may or may not have happened; safe to retry with the same id"
            )
        return errors.NoEndpointAvailable(budget_s, record.attempts)


def _leader_hint(error: grpc.RpcError) -> str | None:
    trailing_method = getattr(error, "trailing_metadata", None)
    trailing = trailing_method() if callable(trailing_method) else None
    for key, value in trailing or ():
        if key == LEADER_METADATA_KEY:
            hint = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            return hint.strip() or None
    return None


def _check_name(kind: str, name: str) -> None:
    """Raises InvalidArgument unless `name` is 1..200 bytes of [A-Za-z0-9._-].

    Same rule and wording as the node's check, so the caller sees one message either way.
    """
    if not isinstance(name, str):
        raise errors.InvalidArgument(f"{kind} name {name!r} is invalid: must be a string")
    size = len(name.encode("utf-8", errors="surrogatepass"))
    shown = name if len(name) <= 60 else name[:57] + "..."
    if not 1 <= size <= limits.NAME_BYTES_MAX:
        raise errors.InvalidArgument(
            f"{kind} name {shown!r} is invalid: must be 1 to name_bytes_max "
            f"{limits.NAME_BYTES_MAX} bytes, got {size}"
        )
    for char in name:
        if char not in _NAME_ALPHABET:
            raise errors.InvalidArgument(
                f"{kind} name {shown!r} is invalid: character {char!r} is not one of [A-Za-z0-9._-]"
            )


def _check_range(what: str, value: int, limit_name: str, limit: int) -> None:
    if value < 0:
        raise errors.InvalidArgument(f"{what} of {value} must not be negative")
    if value > limit:
        raise errors.InvalidArgument(f"{what} of {value} exceeds {limit_name} {limit}")


def _encode_body(body: bytes | str) -> bytes:
    if isinstance(body, str):
        payload = body.encode("utf-8")
    elif isinstance(body, bytes | bytearray | memoryview):
        payload = bytes(body)
    else:
        raise errors.InvalidArgument(
            f"message body must be bytes or str, got {type(body).__name__}"
        )
    if len(payload) > limits.MESSAGE_BYTES_MAX:
        raise errors.InvalidArgument(
            f"message of {len(payload)} bytes exceeds message_bytes_max {limits.MESSAGE_BYTES_MAX}"
        )
    return payload


def _split_batches(payloads: list[bytes]) -> list[list[bytes]]:
    """Consecutive batches of at most 500 messages and 4 MiB of bodies each, in order."""
    batches: list[list[bytes]] = []
    batch: list[bytes] = []
    batch_bytes = 0
    for payload in payloads:
        if batch and (
            len(batch) >= limits.PUBLISH_BATCH_MESSAGES_MAX
            or batch_bytes + len(payload) > limits.PUBLISH_BATCH_BYTES_MAX
        ):
            batches.append(batch)
            batch, batch_bytes = [], 0
        batch.append(payload)
        batch_bytes += len(payload)
    if batch:
        batches.append(batch)
    return batches


def _to_ms(what: str, seconds: float) -> int:
    if seconds < 0:
        raise errors.InvalidArgument(f"{what} of {seconds:g} s must not be negative")
    return round(seconds * 1000)


def _delay_ms(what: str, seconds: float) -> int:
    """A delay in whole milliseconds, 0..delay_ms_max."""
    milliseconds = _to_ms(what, seconds)
    if milliseconds > limits.DELAY_MS_MAX:
        raise errors.InvalidArgument(
            f"{what} of {milliseconds} ms exceeds delay_ms_max {limits.DELAY_MS_MAX}"
        )
    return milliseconds


def _optional_ms(what: str, seconds: float | None, limit_ms: int) -> int:
    """A positive duration in milliseconds, or 0 (the node's default) for None."""
    if seconds is None:
        return 0
    if seconds <= 0:
        raise errors.InvalidArgument(f"{what} of {seconds:g} s must be positive")
    milliseconds = max(1, round(seconds * 1000))
    if milliseconds > limit_ms:
        raise errors.InvalidArgument(
            f"{what} of {milliseconds} ms exceeds {what}_ms_max {limit_ms}"
        )
    return milliseconds
