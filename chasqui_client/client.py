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

import contextlib
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import grpc

from chasqui_client import calls, errors, limits, routing
from chasqui_client.calls import ResponseT, ResultT
from chasqui_client.calls import split_batches as _split_batches
from chasqui_client.models import (
    ClosedOnExit,
    ClusterStatus,
    Kind,
    Message,
    Overflow,
    QueueInfo,
    Receipt,
    Start,
    TopicInfo,
    WhoAmI,
    settle_streams,
)
from chasqui_client.routing import LEADER_METADATA_KEY
from chasqui_proto import chasqui_pb2, chasqui_pb2_grpc

if TYPE_CHECKING:
    from chasqui_client.acker import Acker
    from chasqui_client.publisher import Publisher
    from chasqui_client.stream import Stream

__all__ = ["LEADER_METADATA_KEY", "Client", "_split_batches"]


class _Endpoint:
    """One node address with its lazily created channel and its last known connectivity."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None) -> None:
        self.address = address
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options=routing.CHANNEL_OPTIONS)
        else:
            self.channel = grpc.secure_channel(
                address, credentials, options=routing.CHANNEL_OPTIONS
            )
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
        return self.state in routing.SETTLED_STATES

    @property
    def connected(self) -> bool:
        return self.state is grpc.ChannelConnectivity.READY

    def close(self) -> None:
        self.channel.unsubscribe(self._on_state)
        self.channel.close()


class Client(ClosedOnExit):
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
        addresses = routing.check_endpoints(endpoints)
        self.timing = routing.Timing(
            call_timeout_s=call_timeout_s,
            attempt_timeout_s=call_timeout_s if attempt_timeout_s is None else attempt_timeout_s,
            connect_timeout_s=connect_timeout_s,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
        )
        self.call_timeout_s = call_timeout_s
        self.attempt_timeout_s = self.timing.attempt_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.producer_id = uuid.uuid4().hex
        self._credentials = credentials
        self._lock = threading.Lock()
        self._topic_offsets: dict[str, int] = {}  # topic -> offset after the last received
        self._router = routing.Router(addresses)
        self._endpoints: dict[str, _Endpoint] = {}
        self._next_sequence = 1  # of this client's producer id; see `_next_sequences`
        self._closing: list[Stream | Publisher | Acker] = []
        self.user_id: str | None = None
        if key is None:
            try:
                created = self._run(calls.create_user())
            except BaseException:
                self.close()
                raise
            key = created.key
            self.user_id = created.user_id
        self.key: str = key
        self._metadata = (("authorization", f"Bearer {self.key}"),)

    # ---- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Closes every channel; calls in flight fail, iterators and streams end, and later
        calls raise `RuntimeError`. Publishers still open fail their pending futures."""
        with self._lock:
            self._router.close()
            endpoints = list(self._endpoints.values())
            self._endpoints.clear()
            closing, self._closing = self._closing, []
        for resource in closing:
            resource.abort()
        # Closing a watched channel waits for gRPC's connectivity poll (up to 0.2 s): in parallel.
        closers = [threading.Thread(target=endpoint.close, daemon=True) for endpoint in endpoints]
        for closer in closers:
            closer.start()
        for closer in closers:
            closer.join()

    @property
    def closed(self) -> bool:
        return self._router.closed

    @property
    def endpoints(self) -> list[str]:
        """Known endpoints, in the order rounds try them (leader hints may have added some)."""
        return self._router.addresses

    @property
    def leader(self) -> str | None:
        """The endpoint believed to be the leader, or None until one answered."""
        return self._router.leader

    # ---- users and cluster -----------------------------------------------------------------

    def whoami(self) -> WhoAmI:
        identity = self._run(calls.whoami())
        self.user_id = identity.user_id
        return identity

    def cluster_status(self) -> ClusterStatus:
        """The view of whichever node answers first (any node answers, not only the leader)."""
        return self._run(calls.cluster_status())

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
        return self._run(
            calls.create_queue(
                name,
                exist_ok,
                visibility_timeout_s=visibility_timeout_s,
                max_deliveries=max_deliveries,
                dead_letter_queue=dead_letter_queue,
                max_length=max_length,
                overflow=overflow,
                message_ttl_s=message_ttl_s,
            )
        )

    def create_topic(self, name: str, exist_ok: bool = False) -> bool:
        """Creates a topic; returns False when `exist_ok` found it already there."""
        return self._run(calls.create_topic(name, exist_ok))

    def delete_queue(self, name: str) -> None:
        self._run(calls.delete_queue(name))

    def delete_topic(self, name: str) -> None:
        self._run(calls.delete_topic(name))

    def list_queues(self, owned_only: bool = False) -> list[QueueInfo]:
        return self._run(calls.list_queues(owned_only))

    def list_topics(self, owned_only: bool = False) -> list[TopicInfo]:
        return self._run(calls.list_topics(owned_only))

    # ---- subscriptions ---------------------------------------------------------------------

    def subscribe_topic(self, name: str, start: Start | str = Start.LATEST, offset: int = 0) -> int:
        """Creates this user's durable cursor on a topic; returns the next offset it receives.

        `start`: "latest" (messages published from now on), "earliest" (the oldest retained) or
        "offset" (`offset`, clamped to what is retained).
        """
        return self._run(calls.subscribe_topic(name, start, offset))

    def subscribe_queue(self, name: str) -> None:
        self._run(calls.subscribe_queue(name))

    def unsubscribe_topic(self, name: str) -> None:
        self._run(calls.unsubscribe(Kind.TOPIC, name))

    def unsubscribe_queue(self, name: str) -> None:
        self._run(calls.unsubscribe(Kind.QUEUE, name))

    # ---- publishing ------------------------------------------------------------------------

    def publish_queue(self, name: str, body: bytes | str, *, delay_s: float = 0) -> Receipt:
        """Publishes one message to a queue, deliverable no earlier than `delay_s` from now."""
        return self._publish(Kind.QUEUE, name, body, calls.delay_ms("delay", delay_s))

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
        return self._publish_many(Kind.QUEUE, name, bodies, calls.delay_ms("delay", delay_s))

    def publish_many_topic(self, name: str, bodies: Iterable[bytes | str]) -> list[Receipt]:
        """Publishes many messages to a topic; see `publish_many_queue`."""
        return self._publish_many(Kind.TOPIC, name, bodies, 0)

    def publisher(
        self,
        name: str,
        kind: Kind | str = Kind.QUEUE,
        *,
        window: int = limits.PUBLISHER_WINDOW_DEFAULT,
        linger_s: float = limits.PUBLISHER_LINGER_S_DEFAULT,
    ) -> Publisher:
        """A pipelined publisher to one queue or topic: `publish(body)` returns a future at once
        and messages travel in PublishBatch calls; see `chasqui_client.publisher.Publisher`."""
        from chasqui_client.publisher import Publisher

        publisher = Publisher(self, Kind(kind), name, window=window, linger_s=linger_s)
        self._track(publisher)
        return publisher

    def _publish(self, kind: Kind, name: str, body: bytes | str, delay_ms: int) -> Receipt:
        calls.check_name(kind.value, name)
        payload = calls.encode_body(body)
        [sequence] = self._next_sequences(1)
        return self._run(calls.publish(kind, name, payload, delay_ms, self.producer_id, sequence))

    def _publish_many(
        self, kind: Kind, name: str, bodies: Iterable[bytes | str], delay_ms: int
    ) -> list[Receipt]:
        calls.check_name(kind.value, name)
        payloads = [calls.encode_body(body) for body in bodies]
        receipts: list[Receipt] = []
        for batch in _split_batches(payloads):
            sequences = self._next_sequences(len(batch))
            call = calls.publish_batch(kind, name, batch, delay_ms, self.producer_id, sequences)
            batch_receipts = self._run(call)
            receipts.extend(batch_receipts)
        return receipts

    def _next_sequences(self, count: int) -> range:
        """Reserves `count` consecutive sequence numbers of this client's producer id."""
        with self._lock:
            first = self._next_sequence
            self._next_sequence += count
        return range(first, first + count)

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
        visibility_timeout_ms = calls.optional_ms(
            "visibility_timeout", visibility_timeout_s, limits.VISIBILITY_TIMEOUT_MS_MAX
        )
        return self._run(
            calls.consume(Kind.QUEUE, name, max_messages, timeout_s, visibility_timeout_ms, self)
        )

    def consume_many_topic(
        self, name: str, max_messages: int, timeout_s: float = 0
    ) -> list[Message]:
        """Up to `max_messages` (1..500) past the cursor, waiting up to `timeout_s` for one.

        The client remembers the offset after the last message it received from each topic and
        sends it along, so a reply lost in a failover is delivered again first, in order.
        """
        with self._lock:
            next_offset = self._topic_offsets.get(name)
        messages = self._run(
            calls.consume(Kind.TOPIC, name, max_messages, timeout_s, 0, self, next_offset)
        )
        if messages:
            with self._lock:
                self._topic_offsets[name] = messages[-1].sequence + 1
        return messages

    def iter_queue(
        self,
        name: str,
        *,
        batch: int = limits.ITER_BATCH_DEFAULT,
        wait_s: float = limits.ITER_WAIT_S_DEFAULT,
        visibility_timeout_s: float | None = None,
    ) -> Iterator[Message]:
        """Yields the queue's messages forever, leasing up to `batch` per long-poll of `wait_s`.

        Ack each message (or use `with message.process():`) before its lease ends. The iterator
        ends without an error when the client is closed; other errors are raised from it. Leases
        not yet yielded when the iterator is closed early are given back (nacked).
        """
        visibility_timeout_ms = calls.optional_ms(
            "visibility_timeout", visibility_timeout_s, limits.VISIBILITY_TIMEOUT_MS_MAX
        )
        return self._iterate(Kind.QUEUE, name, batch, wait_s, visibility_timeout_ms)

    def iter_topic(
        self,
        name: str,
        *,
        batch: int = limits.ITER_BATCH_DEFAULT,
        wait_s: float = limits.ITER_WAIT_S_DEFAULT,
    ) -> Iterator[Message]:
        """Yields the topic's messages past this user's cursor forever; see `iter_queue`.

        Topic acks are cumulative: acking a message also acks every earlier one. One iterator
        yields each offset at most once and in order, also across failovers (see
        `_rewound_after_gap`); run one iterator per user and topic.
        """
        return self._iterate(Kind.TOPIC, name, batch, wait_s, 0)

    def _iterate(
        self, kind: Kind, name: str, batch: int, wait_s: float, visibility_timeout_ms: int
    ) -> Iterator[Message]:
        # Check the arguments now, not at the first next(): an error belongs to the call.
        calls.consume(kind, name, batch, wait_s, visibility_timeout_ms, self)
        return self._iterate_checked(kind, name, batch, wait_s, visibility_timeout_ms)

    def _iterate_checked(
        self, kind: Kind, name: str, batch: int, wait_s: float, visibility_timeout_ms: int
    ) -> Iterator[Message]:
        next_offset: int | None = None  # topics: the offset after the last one yielded
        while not self.closed:
            try:
                messages = self._run(
                    calls.consume(
                        kind, name, batch, wait_s, visibility_timeout_ms, self, next_offset
                    )
                )
                if kind is Kind.TOPIC and messages and next_offset is not None:
                    if self._rewound_after_gap(messages[0], next_offset):
                        continue
                    messages = [m for m in messages if m.sequence >= next_offset]
            except (errors.ChasquiError, RuntimeError):
                if self.closed:
                    return  # close() cut the long-poll short
                raise
            for index, message in enumerate(messages):
                next_offset = message.sequence + 1
                try:
                    yield message
                except GeneratorExit:
                    self._give_back(messages[index + 1 :])
                    raise

    def _rewound_after_gap(self, first: Message, next_offset: int) -> bool:
        """True if a topic consume skipped offsets and the window was rewound to get them.

        A consume whose reply was lost (the leader died after committing it) leaves the offsets
        it leased unseen; the retry then starts past them. Acking what came next would ack them
        too (topic acks are cumulative), so the iterator nacks instead, which rewinds the window
        to the oldest unacked offset, and consumes again, skipping offsets it already yielded.
        """
        if first.sequence <= next_offset:
            return False
        # FailedPrecondition: the window's lease expired; the next consume starts over anyway.
        with contextlib.suppress(errors.FailedPrecondition):
            self.nack(first)
        return True

    def _give_back(self, messages: list[Message]) -> None:
        """Best effort: nacks leases the caller will never see, so they return at once rather
        than after their visibility timeout. A failure only delays them."""
        for message in messages:
            if self.closed:
                return
            try:
                self.nack(message)
            except (errors.ChasquiError, RuntimeError):
                return

    def stream_queue(
        self,
        name: str,
        *,
        window: int = limits.STREAM_WINDOW_DEFAULT,
        visibility_timeout_s: float | None = None,
    ) -> Stream:
        """A push subscription to a queue over ConsumeStream, with at most `window` deliveries
        unacked; see `chasqui_client.stream.Stream`."""
        visibility_timeout_ms = calls.optional_ms(
            "visibility_timeout", visibility_timeout_s, limits.VISIBILITY_TIMEOUT_MS_MAX
        )
        return self._stream(Kind.QUEUE, name, window, visibility_timeout_ms)

    def stream_topic(self, name: str, *, window: int = limits.STREAM_WINDOW_DEFAULT) -> Stream:
        """A push subscription to a topic (past this user's cursor); see `stream_queue`."""
        return self._stream(Kind.TOPIC, name, window, 0)

    def _stream(self, kind: Kind, name: str, window: int, visibility_timeout_ms: int) -> Stream:
        from chasqui_client.stream import Stream

        stream = Stream(self, kind, name, window, visibility_timeout_ms)
        self._track(stream)
        return stream

    def _track(self, resource: Stream | Publisher | Acker) -> None:
        with self._lock:
            if self._router.closed:
                raise RuntimeError("client is closed")
            self._closing = [item for item in self._closing if not item.finished]
            self._closing.append(resource)

    # ---- acknowledging ---------------------------------------------------------------------

    def acker(self) -> Acker:
        """Pipelined acks: `acker.ack(message)` returns at once and acks travel in batches;
        `flush()` or `close()` waits for them. See `chasqui_client.acker.Acker`."""
        from chasqui_client.acker import Acker

        acker = Acker(self)
        self._track(acker)
        return acker

    def ack(self, messages: Message | Iterable[Message]) -> None:
        """Acks one delivery or many (split into calls of at most 1000). Idempotent."""
        for chunk, call in calls.acks(messages):
            try:
                self._run(call)
            except errors.FailedPrecondition:
                # The lease had expired: the delivery is no longer this caller's either way.
                if len(chunk) == 1:
                    settle_streams(chunk, acked=False)
                raise
            settle_streams(chunk, acked=True)

    def nack(self, message: Message, delay_s: float = 0) -> None:
        """Returns a leased delivery to its queue, deliverable again after `delay_s`.

        On a topic it rewinds this user's window to the oldest unacked message."""
        try:
            self._run(calls.nack(message, delay_s))
        except errors.FailedPrecondition:
            settle_streams([message], acked=False)
            raise
        settle_streams([message], acked=False)

    def extend(self, message: Message, seconds: float) -> None:
        """Moves a lease's deadline to `seconds` from now."""
        self._run(calls.extend(message, seconds))

    # ---- routing ---------------------------------------------------------------------------

    def _endpoint(self, address: str) -> _Endpoint:
        with self._lock:
            self._router.check_open()
            endpoint = self._endpoints.get(address)
            if endpoint is None:
                endpoint = _Endpoint(address, self._credentials)
                self._endpoints[address] = endpoint
            return endpoint

    def _run(self, call: calls.Call[ResponseT, ResultT]) -> ResultT:
        """Sends `call` to the leader, following hints and retrying within the budget
        (`routing.CallPlan` decides; this only does the I/O)."""
        plan = routing.CallPlan(call.rpc, self._router, self.timing, call.idempotent, call.wait_s)
        metadata = self._metadata if call.authenticated else ()
        request = call.request
        while True:
            step = plan.next_step()
            if isinstance(step, routing.Pause):
                time.sleep(step.seconds)
                continue
            endpoint = self._endpoint(step.address)
            if isinstance(request, chasqui_pb2.ConsumeRequest):
                # A retry waits only for what is left of the caller's wait.
                request.timeout_s = step.wait_s
            if not endpoint.connected and not endpoint.wait_settled(step.connect_timeout_s):
                plan.on_unreachable(step.address)
                continue
            plan.on_sent()
            try:
                response = getattr(endpoint.stub, call.rpc)(
                    request, timeout=step.send_timeout_s(), metadata=metadata
                )
            except grpc.RpcError as error:
                self._router.check_open()  # closed meanwhile: say so, not CANCELLED
                plan.on_failure(
                    step.address,
                    errors.status_code_of(error),
                    errors.details_of(error),
                    hint=routing.rpc_error_hint(error),
                    connected=endpoint.connected,
                )
                continue
            plan.succeeded(step.address)
            return call.result(response)
