"""Pipelined acks: `ack(message)` returns at once, acks travel in Ack calls of up to 1000.

    stream = client.stream_queue("jobs", window=1000)
    with client.acker() as acker:
        for message in stream:
            handle(message)
            acker.ack(message)        # no round trip here
    # leaving the block flushed every ack (or raised what stopped them)

Sender threads (`ACKER_CALLS_IN_FLIGHT`) each take every ack waiting (up to ack_batch_max) into
one Ack call, sent through the client's usual routing and retries; while calls are in flight
the next batch gathers. Acks need no order, so several calls overlap their Raft rounds, but a
call starts beside another only for `ACKER_OVERLAP_ACKS_MIN` acks or more (or to flush): at a
trickle one call at a time carries what gathered during the last one, rather than every ack
becoming a call and a Raft entry of its own.

Credit. A stream's credit for a delivery comes back when its ack is sent, not when the ack is
confirmed (`Client.ack`, which blocks, gives it back on confirmation): the delivery has left
the caller's hands, and the broker has the next ones leased and on their way while the acks
are replicated, as AMQP's basic.ack frees a prefetch slot when it is sent. So the stream still
holds at most `window` deliveries, while the broker may hold up to `window` more leased whose
acks are in flight. Waiting for confirmation instead idled the stream for a Raft round per
window (W3 in `make bench`: about 30% slower).

Outcomes. A delivery whose lease ended before its ack arrived is delivered again, whatever
happens here (at-least-once). An Ack call refused for such a delivery (FailedPrecondition)
still applied the other acks of its batch (each is its own command), so the sender moves on and
counts the batch in `refused_batches` (a refused topic ack rewound the subscription: its stream
is told, and hands out each offset once as always). Any other failure (the cluster unreachable
past the retry budget) is kept and raised by the next `flush` or `close`; those deliveries come
again after their lease, taking credit again.

Threads: `ack`, `flush` and `close` may be called from any thread.
"""

from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING

from chasqui_client import calls, errors, limits
from chasqui_client.models import ClosedOnExit, Message, settle_streams

if TYPE_CHECKING:
    from chasqui_client.client import Client


class Acker(ClosedOnExit):
    """Acks deliveries in pipelined batches; see the module docstring."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._condition = threading.Condition()
        self._pending: collections.deque[Message] = collections.deque()
        self._accepted = 0  # acks ever taken by ack()
        self._done = 0  # acks whose call finished, either way
        self._failure: errors.ChasquiError | None = None  # raised by the next flush/close
        self._in_flight = 0  # Ack calls being sent
        self._flushing = 0  # flush() calls waiting: send whatever is pending at once
        self.refused_batches = 0  # batches with an ack of a delivery whose lease had ended
        self._closed = False
        self._senders = [
            threading.Thread(target=self._send_loop, name="chasqui-acker", daemon=True)
            for _ in range(limits.ACKER_CALLS_IN_FLIGHT)
        ]
        for sender in self._senders:
            sender.start()

    def ack(self, message: Message) -> None:
        """Queues the ack of one delivery and returns at once. Raises `RuntimeError` once the
        acker is closed."""
        with self._condition:
            if self._closed:
                raise RuntimeError("acker is closed")
            self._pending.append(message)
            self._accepted += 1
            self._condition.notify_all()

    @property
    def unconfirmed(self) -> int:
        """Acks taken whose call has not finished yet."""
        with self._condition:
            return self._accepted - self._done

    def flush(self, timeout_s: float | None = None) -> bool:
        """Waits until every ack taken so far was sent and answered; False on timeout. Raises
        the failure that stopped an earlier batch, once."""
        with self._condition:
            target = self._accepted
            self._flushing += 1
            self._condition.notify_all()
            try:
                finished = self._condition.wait_for(lambda: self._done >= target, timeout=timeout_s)
            finally:
                self._flushing -= 1
            failure, self._failure = self._failure, None
        if failure is not None:
            raise failure
        return finished

    def close(self, timeout_s: float | None = None) -> None:
        """Flushes, then stops the sender. Later `ack` calls raise `RuntimeError`."""
        try:
            self.flush(timeout_s)
        finally:
            with self._condition:
                self._closed = True
                self._condition.notify_all()
            for sender in self._senders:
                sender.join(timeout_s)

    def abort(self) -> None:
        """Stops at once (the client is closing): unsent acks are dropped; their deliveries
        come again after their lease."""
        with self._condition:
            self._closed = True
            self._done += len(self._pending)
            self._pending.clear()
            self._condition.notify_all()

    @property
    def finished(self) -> bool:
        return self._closed and not any(sender.is_alive() for sender in self._senders)

    # ---- the sender thread -----------------------------------------------------------------

    def _may_send(self) -> bool:
        """(Holding the condition.) Whether a sender should take a batch now."""
        if not self._pending:
            return self._closed
        return (
            self._in_flight == 0
            or len(self._pending) >= limits.ACKER_OVERLAP_ACKS_MIN
            or self._flushing > 0
            or self._closed
        )

    def _send_loop(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(self._may_send)
                if not self._pending:
                    return
                count = min(len(self._pending), limits.ACK_BATCH_MAX)
                batch = [self._pending.popleft() for _ in range(count)]
                self._in_flight += 1
            self._send(batch)

    def _send(self, batch: list[Message]) -> None:
        failure: errors.ChasquiError | None = None
        refused = False
        settle_streams(batch, acked=True)  # the credit comes back as the acks leave
        try:
            [(_chunk, call)] = calls.acks(batch)  # one call: a batch is at most ack_batch_max
            self._client._run(call)
        except errors.FailedPrecondition:
            refused = True  # some lease had ended; the other acks of the batch were applied
        except errors.ChasquiError as error:
            failure = error
        except Exception as error:  # the thread boundary: keep it for flush()
            failure = errors.ChasquiError(f"acks failed: {error!r}")
        if refused:
            settle_streams(batch, acked=False)  # a topic's stream rewinds with its subscription
        with self._condition:
            self._in_flight -= 1
            self.refused_batches += refused
            self._done += len(batch)
            if failure is not None and self._failure is None:
                self._failure = failure
            self._condition.notify_all()
