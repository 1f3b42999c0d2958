"""Streaming subscriptions: deliveries pushed over one ConsumeStream call, within a credit window.

`Client.stream_queue(name, window=100)` and `Client.stream_topic(...)` return a `Stream`, an
iterator of `Message`s that is also a context manager:

    with client.stream_queue("jobs", window=50) as stream:
        for message in stream:
            with message.process():      # acks on success, nacks on an exception
                handle(message.body)

Credit. The stream grants the broker `window` deliveries when it opens and one more each time a
delivery it handed out is acked or nacked through the client (`client.ack`, `client.nack`,
`message.process()`), so at most `window` deliveries are ever unacked in the caller's hands or
in the stream's buffer. The node never sends more than the credit granted. Topic acks are
cumulative: acking offset 7 settles every earlier delivery of that topic from this stream. A
topic stream hands out each offset once and in order, also across failovers; run one stream
(or iterator) per user and topic.

Failover. When the stream fails with UNAVAILABLE (a follower's answer, with or without a
`chasqui-leader` hint) or the connection drops (the node died), it is reopened on the leader by
the same routing rules as unary calls: follow the hint at once, else try the next endpoint,
pausing with jittered backoff (50 ms doubling to 1 s) after each round in which all failed. The
reopened stream grants `window` minus the deliveries still unacked. If no stream could be
opened for `call_timeout_s`, iteration raises `NoEndpointAvailable`; any other status
(NOT_FOUND, PERMISSION_DENIED, ...) is raised as its typed exception at once.

Deliveries handed out before a failover stay leased to this user: acking them still works
through the new leader (acks are replicated state, not stream state). Deliveries never acked are
redelivered by the broker once their lease ends (the queue's visibility timeout, 30 s by
default), with a higher delivery count, possibly on this same stream.

Threads: iterate from one thread; acks may come from any thread. `close()` (from any thread, or
`Client.close()`) ends the iteration cleanly.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import grpc

from chasqui_client import calls, errors, limits, routing
from chasqui_client.models import ClosedOnExit, Kind, Message
from chasqui_proto import chasqui_pb2

if TYPE_CHECKING:
    from chasqui_client.client import Client


class Stream(ClosedOnExit):
    """An iterator of pushed deliveries; see the module docstring for credit and failover."""

    def __init__(
        self, client: Client, kind: Kind, name: str, window: int, visibility_timeout_ms: int
    ) -> None:
        calls.check_name(kind.value, name)
        if not 1 <= window <= limits.STREAM_CREDIT_MAX:
            raise errors.InvalidArgument(
                f"window of {window} is outside 1..stream_credit_max {limits.STREAM_CREDIT_MAX}"
            )
        self.kind = kind
        self.name = name
        self.window = window
        self._client = client
        self._visibility_timeout_ms = visibility_timeout_ms
        self._lock = threading.Lock()
        # Deliveries received and not yet acked or given back (what the window counts), as
        # sequence -> delivery count. A topic's are in ascending offset order (they arrive in
        # order, and a redelivery first drops every later offset: see `_receive`).
        self._outstanding: dict[int, int] = {}
        self._buffer: collections.deque[Message] = collections.deque()
        self._requests: queue.SimpleQueue[chasqui_pb2.ConsumeStreamRequest | None] | None = None
        self._call: grpc.Future | None = None  # the open ConsumeStream call, to cancel it
        self._responses: Iterator[chasqui_pb2.ConsumeResponse] | None = None
        self._address: str | None = None
        self._opened_at = 0.0
        self._plan: routing.CallPlan | None = None
        self._next_offset: int | None = None  # topics: the offset after the last one received
        self._closed = False
        self.reopened = 0  # how many times a failed stream was opened again (for tests, metrics)

    # ---- iteration -------------------------------------------------------------------------

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Message:
        while True:
            if self._buffer:
                return self._buffer.popleft()
            if self._closed:
                raise StopIteration
            self._receive()

    @property
    def unacked(self) -> int:
        """Deliveries received (buffered or handed out) and not yet acked or given back."""
        with self._lock:
            return len(self._outstanding)

    # ---- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Ends the stream; a thread blocked in `next()` gets StopIteration. Unacked deliveries
        stay leased and are redelivered after their lease (ack them first if they were done)."""
        with self._lock:
            self._closed = True
            requests, call = self._requests, self._call
            self._requests = None
        if requests is not None:
            requests.put(None)
        if call is not None:
            call.cancel()

    def abort(self) -> None:
        self.close()

    @property
    def finished(self) -> bool:
        return self._closed

    # ---- credit ----------------------------------------------------------------------------

    def settled(self, messages: Sequence[Message], *, acked: bool) -> None:
        """Called by the client after an ack or nack of some of this stream's deliveries: one
        credit grant for all of them (one stream message, however many were acked)."""
        with self._lock:
            before = len(self._outstanding)
            outstanding = self._outstanding
            if self.kind is Kind.TOPIC and acked:
                # Cumulative: everything up to the highest offset acked is done.
                highest = max(message.sequence for message in messages)
                for offset in [offset for offset in outstanding if offset <= highest]:
                    del outstanding[offset]
            elif self.kind is Kind.TOPIC:
                # A topic nack rewinds the window: every unacked delivery will come again.
                outstanding.clear()
            else:
                for message in messages:
                    if outstanding.get(message.sequence) == message.delivery_count:
                        del outstanding[message.sequence]
            self._grant(before - len(outstanding))

    def _grant(self, credit: int) -> None:
        """Sends `credit` to the open stream. Call with the lock held; if no stream is open the
        next one grants what the window allows when it opens."""
        if credit > 0 and self._requests is not None:
            self._requests.put(chasqui_pb2.ConsumeStreamRequest(credit=credit))

    # ---- the stream ------------------------------------------------------------------------

    def _receive(self) -> None:
        """Waits for the next response and buffers its deliveries; reopens a failed stream."""
        if self._responses is None:
            self._open()
            if self._responses is None:
                return
        try:
            response = next(self._responses)
        except StopIteration:
            self._failed(grpc.StatusCode.UNAVAILABLE, "the node ended the stream", None)
            return
        except grpc.RpcError as error:
            code = errors.status_code_of(error)
            if code is grpc.StatusCode.CANCELLED:
                # Cancelled by close(), or by a node that shut down: the latter is a failover.
                code = grpc.StatusCode.UNAVAILABLE
            self._failed(code, errors.details_of(error), routing.rpc_error_hint(error))
            return
        if self._plan is not None and self._address is not None:
            self._plan.succeeded(self._address)
            self._plan = None
        deliveries = list(response.deliveries)
        if self.kind is Kind.TOPIC and deliveries and self._next_offset is not None:
            if deliveries[0].sequence > self._next_offset:
                self._rewind(deliveries)
                return
            duplicates = [d for d in deliveries if d.sequence < self._next_offset]
            deliveries = [d for d in deliveries if d.sequence >= self._next_offset]
            with self._lock:
                self._grant(len(duplicates))
        with self._lock:
            outstanding = self._outstanding
            for delivery in deliveries:
                message = Message.from_proto(delivery, owner=self._client, stream=self)
                sequence = message.sequence
                self._next_offset = sequence + 1
                if self.kind is Kind.QUEUE:
                    # A redelivery replaces an expired lease of the same message.
                    stale = [sequence] if sequence in outstanding else []
                elif outstanding and next(reversed(outstanding)) >= sequence:
                    # The topic's window rewound: this replaces every offset from here on.
                    stale = [held for held in outstanding if held >= sequence]
                else:
                    stale = []
                for held in stale:
                    del outstanding[held]
                self._grant(len(stale))
                outstanding[sequence] = message.delivery_count
                self._buffer.append(message)

    def _rewind(self, deliveries: list[chasqui_pb2.Delivery]) -> None:
        """A topic push skipped offsets (its predecessor was lost with the old leader): nack,
        which rewinds the window to the oldest unacked offset and settles every outstanding
        delivery, and give back the credit of the pushed ones, which are never handed out.
        Offsets already handed out are filtered when they come again, so each offset is
        handed out once and in order (see `Client.iter_topic`)."""
        first = Message.from_proto(deliveries[0], owner=self._client, stream=self)
        with self._lock:
            self._grant(len(deliveries))
        with contextlib.suppress(errors.FailedPrecondition):
            self._client.nack(first)

    def _failed(self, code: grpc.StatusCode, details: str, hint: str | None) -> None:
        """Drops the failed call and lets the plan decide: raises, or the next `_receive`
        reopens (after a pause when a whole round failed)."""
        with self._lock:
            requests, self._requests = self._requests, None
            self._call = None
        self._responses = None
        if requests is not None:
            requests.put(None)
        if self._closed:
            return
        address = self._address or ""
        if self._plan is None or time.monotonic() - self._opened_at >= limits.STREAM_HEALTHY_S:
            # The stream was up: this is a new outage with its own budget.
            self._plan = self._new_plan()
        endpoint_connected = self._client._endpoint(address).connected if address else False
        self._plan.on_failure(address, code, details, hint=hint, connected=endpoint_connected)

    def _new_plan(self) -> routing.CallPlan:
        return routing.CallPlan(
            "ConsumeStream", self._client._router, self._client.timing, idempotent=True
        )

    def _open(self) -> None:
        """Opens the stream on the next endpoint the plan names, sleeping through its pauses."""
        if self._plan is None:
            self._plan = self._new_plan()
        while not self._closed:
            try:
                step = self._plan.next_step()
            except errors.ChasquiError:
                self._plan = None
                raise
            if isinstance(step, routing.Pause):
                time.sleep(step.seconds)
                continue
            endpoint = self._client._endpoint(step.address)
            if not endpoint.connected and not endpoint.wait_settled(step.connect_timeout_s):
                self._plan.on_unreachable(step.address)
                continue
            self._plan.on_sent()
            requests: queue.SimpleQueue[chasqui_pb2.ConsumeStreamRequest | None] = (
                queue.SimpleQueue()
            )
            with self._lock:
                if self._closed:
                    return
                first = chasqui_pb2.ConsumeStreamRequest(
                    kind=self.kind.to_proto(),
                    name=self.name,
                    credit=self.window - len(self._outstanding),
                    visibility_timeout_ms=self._visibility_timeout_ms,
                )
                if self.kind is Kind.TOPIC and self._next_offset is not None:
                    # Resume where this stream's deliveries stopped: a push lost with the
                    # old stream is sent again first.
                    first.next_offset = self._next_offset
                requests.put(first)
                self._requests = requests
                call = endpoint.stub.ConsumeStream(
                    _drain(requests), metadata=self._client._metadata
                )
                self._call = call
            if self._address is not None:
                self.reopened += 1
            self._address = step.address
            self._opened_at = time.monotonic()
            self._responses = call
            return


def _drain(
    requests: queue.SimpleQueue[chasqui_pb2.ConsumeStreamRequest | None],
) -> Iterator[chasqui_pb2.ConsumeStreamRequest]:
    """The request side of one ConsumeStream call: credit grants until the stream ends."""
    while True:
        request = requests.get()
        if request is None:
            return
        yield request
