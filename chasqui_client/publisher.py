"""A pipelined publisher: many messages per PublishBatch call, futures instead of blocking calls.

    with client.publisher("jobs", window=1000) as publisher:
        futures = [publisher.publish(f"job-{i}") for i in range(10_000)]
    receipts = [future.result() for future in futures]   # close() flushed them all

`publish(body)` checks the body and returns a `concurrent.futures.Future[Receipt]` at once; it
blocks only while `window` messages are unconfirmed, so memory stays bounded. Each batch takes
the client's next consecutive `(producer_id, sequence)` numbers before it is first sent, and
its retries keep them, so the broker recognises a retried message (and stores a batch's
deduplication record as one run). One sender thread takes everything waiting (up to 500
messages and 4 MiB) into one PublishBatch call, sent through the client's usual routing and
retries; while that call is in flight, the next batch gathers. If the sender is idle, it waits
`linger_s` once for a batch to fill. A second thread resolves a finished batch's futures while
the sender already sends the next one (resolving 500 futures took about a third of the time
between two calls). Nothing per message is scheduled: no timer, no task, no thread.

Order and outcomes. Batches go one at a time, so the broker stores messages in publish order
and futures resolve in publish order. A batch that fails sets the same typed exception on each
of its futures (`OutcomeUnknown` when it may have been committed: each message kept its own id,
so publishing the same bodies again through `Client.publish_*` would not deduplicate, but the
client's own retries within the budget already did). Later batches are still sent.

Threads: `publish`, `flush` and `close` may be called from any thread. Future callbacks run on
the publisher's resolver thread, one at a time in publish order; keep them short (the window
counts a message until its future is resolved).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, NamedTuple

from chasqui_client import calls, errors, limits
from chasqui_client.models import ClosedOnExit, Kind, Receipt

if TYPE_CHECKING:
    from chasqui_client.client import Client


class _Pending(NamedTuple):
    """A published message waiting for its batch (a named tuple: one is built per message)."""

    payload: bytes
    future: Future[Receipt]


class Publisher(ClosedOnExit):
    """Publishes to one queue or topic in pipelined batches; see the module docstring."""

    def __init__(
        self, client: Client, kind: Kind, name: str, *, window: int, linger_s: float
    ) -> None:
        calls.check_name(kind.value, name)
        if not 1 <= window <= limits.PUBLISHER_WINDOW_MAX:
            raise errors.InvalidArgument(
                f"window of {window} is outside 1..publisher_window_max "
                f"{limits.PUBLISHER_WINDOW_MAX}"
            )
        if not 0 <= linger_s <= limits.PUBLISHER_LINGER_S_MAX:
            raise errors.InvalidArgument(
                f"linger_s of {linger_s:g} is outside 0..publisher_linger_s_max "
                f"{limits.PUBLISHER_LINGER_S_MAX:g}"
            )
        self.kind = kind
        self.name = name
        self.window = window
        self.linger_s = linger_s
        self._client = client
        self._condition = threading.Condition()
        self._pending: collections.deque[_Pending] = collections.deque()
        self._accepted = 0  # messages ever accepted by publish()
        self._resolved = 0  # messages whose future is resolved
        self._flush_target = 0  # a flush() waits for `_resolved` to reach this; skips linger
        self._closed = False
        # Sent batches with their receipts (or the call's exception), in send order; None
        # once the sender has stopped.
        self._outcomes: queue.SimpleQueue[tuple[list[_Pending], list[Receipt] | Exception] | None]
        self._outcomes = queue.SimpleQueue()
        self._sender = threading.Thread(
            target=self._send_loop, name=f"chasqui-publisher-{name}", daemon=True
        )
        self._resolver = threading.Thread(
            target=self._resolve_loop, name=f"chasqui-publisher-{name}-resolver", daemon=True
        )
        self._resolver.start()
        self._sender.start()

    # ---- publishing ------------------------------------------------------------------------

    def publish(self, body: bytes | str) -> Future[Receipt]:
        """Queues one message; returns its future. Blocks while `window` are unconfirmed.

        Raises `InvalidArgument` at once for a body the broker would refuse, and `RuntimeError`
        once the publisher is closed.
        """
        payload = calls.encode_body(body)
        with self._condition:
            while self._accepted - self._resolved >= self.window and not self._closed:
                self._condition.wait()
            if self._closed:
                raise RuntimeError("publisher is closed")
            future: Future[Receipt] = Future()
            future.set_running_or_notify_cancel()  # a queued publish cannot be taken back
            self._pending.append(_Pending(payload, future))
            self._accepted += 1
            self._condition.notify_all()
        return future

    @property
    def unconfirmed(self) -> int:
        """Messages accepted whose future is not resolved yet."""
        with self._condition:
            return self._accepted - self._resolved

    def flush(self, timeout_s: float | None = None) -> bool:
        """Waits until every message published so far has its outcome; False on timeout."""
        with self._condition:
            target = self._accepted
            self._flush_target = max(self._flush_target, target)
            self._condition.notify_all()
            return self._condition.wait_for(lambda: self._resolved >= target, timeout=timeout_s)

    def close(self, timeout_s: float | None = None) -> None:
        """Flushes, then stops the sender. Later `publish` calls raise `RuntimeError`."""
        self.flush(timeout_s)
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._sender.join(timeout_s)
        self._resolver.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def abort(self) -> None:
        """Stops at once (the client is closing): unsent messages fail with `RuntimeError`."""
        with self._condition:
            self._closed = True
            dropped = list(self._pending)
            self._pending.clear()
            self._condition.notify_all()
        for item in dropped:
            item.future.set_exception(RuntimeError("client is closed"))
        with self._condition:
            self._resolved += len(dropped)
            self._condition.notify_all()

    @property
    def finished(self) -> bool:
        return self._closed and not self._sender.is_alive() and not self._resolver.is_alive()

    # ---- the sender thread -----------------------------------------------------------------

    def _send_loop(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._send(batch)
        finally:
            self._outcomes.put(None)

    def _next_batch(self) -> list[_Pending] | None:
        """Waits for messages and takes the next batch; None once closed and drained."""
        with self._condition:
            self._condition.wait_for(lambda: bool(self._pending) or self._closed)
            if not self._pending:
                return None
            if self.linger_s > 0 and len(self._pending) < limits.PUBLISH_BATCH_MESSAGES_MAX:
                # One wait per batch (not per message) to let a burst fill it.
                linger_until = time.monotonic() + self.linger_s
                self._condition.wait_for(
                    lambda: (
                        self._closed
                        or self._flush_target > self._resolved
                        or len(self._pending) >= limits.PUBLISH_BATCH_MESSAGES_MAX
                    ),
                    timeout=max(0.0, linger_until - time.monotonic()),
                )
            batch: list[_Pending] = []
            batch_bytes = 0
            while self._pending:
                size = len(self._pending[0].payload)
                if batch and (
                    len(batch) >= limits.PUBLISH_BATCH_MESSAGES_MAX
                    or batch_bytes + size > limits.PUBLISH_BATCH_BYTES_MAX
                ):
                    break
                batch.append(self._pending.popleft())
                batch_bytes += size
            return batch

    def _send(self, batch: list[_Pending]) -> None:
        call = calls.publish_batch(
            self.kind,
            self.name,
            [item.payload for item in batch],
            0,
            self._client.producer_id,
            self._client._next_sequences(len(batch)),
        )
        outcome: list[Receipt] | Exception
        try:
            outcome = self._client._run(call)
        except Exception as error:  # the thread boundary: every failure belongs to the futures
            outcome = error
        self._outcomes.put((batch, outcome))

    # ---- the resolver thread ---------------------------------------------------------------

    def _resolve_loop(self) -> None:
        while (sent := self._outcomes.get()) is not None:
            batch, outcome = sent
            if isinstance(outcome, Exception):
                for item in batch:
                    item.future.set_exception(outcome)
            else:
                for item, receipt in zip(batch, outcome, strict=True):
                    item.future.set_result(receipt)
            with self._condition:
                self._resolved += len(batch)
                self._condition.notify_all()
