"""Consumes that wait: the long-poll behind Consume (`timeout_s` > 0) and behind ConsumeStream.

A consume that finds nothing ready waits for a publish or nack on its queue or topic, or for
the time a lease or delay ends there, until its deadline. Two pieces make that wait cheap and
prompt:

- The change board (`ChangeBoard`), fed from the apply path, counts changes per queue or topic,
  so a waiter sleeps on a condition instead of proposing consume after consume.
- Riders (`Replication.ride`): while it waits, the consume rides along with the next entry
  that publishes or nacks there, so a message published to an idle consumer reaches it in the
  Raft round that commits it rather than one round later.

The service calls `LongPoll.consume` and `LongPoll.stream`; it keeps the translation (protobuf
in, protobuf out) and the admission of waiting calls (admission.py). Nothing here knows gRPC:
a call is a `deadlines.Call`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple, Protocol

from chasqui_node import limits
from chasqui_node.commands import (
    Command,
    Consume,
    Deliveries,
    Delivery,
    Entry,
    Kind,
    Result,
    readies,
)
from chasqui_node.deadlines import Call, call_wait_s
from chasqui_node.errors import ChasquiError, Unavailable
from chasqui_node.replication import AtCommit, Rider, await_results


class LongPollReplication(Protocol):
    """What a long-poll needs from replication; `Replicator` and the tests' fake provide it."""

    def propose_many(
        self, commands: Sequence[Command], timeout_s: float, at_commit: AtCommit | None = None
    ) -> list[Result]: ...

    def ride(
        self, key: tuple[Kind, str], commands: Sequence[Command], at_commit: AtCommit | None = None
    ) -> Rider: ...

    def withdraw(self, rider: Rider) -> bool: ...

    def check_leader(self) -> None: ...

    def cluster_time_ms(self) -> int: ...


class ChangeBoard:
    """Wakes long-polling consumers when a queue or topic may have something for them.

    Fed from the apply path (any command that can make a message ready: publish, nack);
    waiters pass the version they saw before looking, so a change in between is not missed.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._versions: dict[tuple[Kind, str], int] = {}
        self.closed = False

    def version(self, kind: Kind, name: str) -> int:
        with self._condition:
            return self._versions.get((kind, name), 0)

    def wait(self, kind: Kind, name: str, seen: int, timeout_s: float) -> None:
        """Return when the version moves past `seen`, the board closes, or time is up."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while self._versions.get((kind, name), 0) == seen and not self.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._condition.wait(remaining)

    def close(self) -> None:
        """Wake every waiter for good: the node is shutting down."""
        with self._condition:
            self.closed = True
            self._condition.notify_all()

    def on_applied(self, entry: Entry, results: list[Result]) -> None:
        touched = {
            key
            for command, result in zip(entry.commands, results, strict=True)
            if (key := readies(command)) is not None and not isinstance(result, ChasquiError)
        }
        if not touched:
            return
        with self._condition:
            for key in touched:
                self._versions[key] = self._versions.get(key, 0) + 1
            self._condition.notify_all()


class _Quiet(NamedTuple):
    """What a consume found when nothing more was ready for its consumer: the change board's
    version for its queue or topic right after that consume applied, and when a lease or delay
    ends there (`Deliveries.next_ready_ms`, 0 for none). Until the version moves or that time
    comes, another consume would find nothing: the consumer waits for a publish to ride."""

    version: int
    next_ready_ms: int

    def stale(self, board: ChangeBoard, key: tuple[Kind, str], now_ms: int) -> bool:
        """`now_ms` is cluster time (`Replication.cluster_time_ms`), the clock leases use."""
        lease_ended = 0 < self.next_ready_ms <= now_ms
        return lease_ended or board.version(*key) != self.version


def _quiet_after(result: Deliveries, versions: list[int]) -> _Quiet | None:
    """What a consume's result says for the next one (see `_Quiet`); `versions` holds the
    change board's version noted when it applied."""
    if result.more_ready or not versions:
        return None
    return _Quiet(versions[0], result.next_ready_ms)


class _Credit:
    """Deliveries a streaming consumer may still receive: granted by the client, spent by the
    server, capped at limits.STREAM_CREDIT_MAX so a client cannot make the server lease more
    than it could ever hold."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._available = 0
        self.closed = False

    def grant(self, count: int) -> None:
        with self._condition:
            self._available = min(self._available + count, limits.STREAM_CREDIT_MAX)
            self._condition.notify_all()

    def spend(self, count: int) -> None:
        with self._condition:
            self._available = max(0, self._available - count)

    def close(self) -> None:
        with self._condition:
            self.closed = True
            self._condition.notify_all()

    def wait_available(self, timeout_s: float) -> int:
        with self._condition:
            self._condition.wait_for(lambda: self._available > 0 or self.closed, timeout_s)
            return 0 if self.closed else self._available


def consume_deadline(timeout_s: float, call: Call) -> float:
    """The `time.monotonic()` at which a long-poll of `timeout_s` answers, empty if need be:
    `limits.LONG_POLL_ANSWER_MARGIN_S` before the call's own deadline when that comes first."""
    deadline = time.monotonic() + timeout_s
    remaining = call.time_remaining()
    if remaining is not None:
        deadline = min(deadline, time.monotonic() + remaining - limits.LONG_POLL_ANSWER_MARGIN_S)
    return deadline


class LongPoll:
    """Runs the consumes that may wait, for the service; one per service, any gRPC worker
    thread. Domain errors (the consume's own result, NotLeader, OutcomeUnknown) are raised for
    the service to map; Unavailable once the change board closes (the node is stopping)."""

    def __init__(
        self,
        replication: LongPollReplication,
        change_board: ChangeBoard,
        proposal_timeout_s: float,
    ) -> None:
        self._replication = replication
        self._changes = change_board
        self._proposal_timeout_s = proposal_timeout_s

    def consume(self, command: Consume, deadline: float, call: Call) -> Deliveries:
        """The Consume call: what `command` gets by `deadline` (see `consume_deadline`); a
        deadline already passed makes it a plain consume that answers at once."""
        result, _ = self._consume_until(command, deadline, call)
        return result

    def stream(
        self, command: Consume, first_credit: int, grants: Iterator[int], call: Call
    ) -> Iterator[Sequence[Delivery]]:
        """The ConsumeStream call once admitted: repeat `command` and yield its deliveries as
        the client grants credit, each batch at most `command.max_messages` and the credit
        left. `first_credit` is the first request's grant; `grants` are the later ones, read on
        a thread of its own. On a topic, each batch moves `next_offset` past what it yielded.
        Ends when the call does or `grants` fails."""
        credit = _Credit()
        credit.grant(first_credit)

        def read_grants() -> None:
            # A client that half-closes its side still wants what it was granted; the stream
            # ends when the call does (cancelled, deadline, or the client went away).
            try:
                for granted in grants:
                    credit.grant(granted)
            except Exception:
                credit.close()

        threading.Thread(target=read_grants, name="chasqui-stream-credit", daemon=True).start()
        next_offset = command.next_offset
        quiet: _Quiet | None = None
        while call.is_active() and not credit.closed:
            available = credit.wait_available(limits.STREAM_RECHECK_S)
            if not available:
                self._replication.check_leader()
                continue
            batch = dataclasses.replace(
                command,
                max_messages=min(available, command.max_messages),
                next_offset=next_offset,
            )
            result, quiet = self._consume_until(
                batch, time.monotonic() + limits.STREAM_RECHECK_S, call, quiet
            )
            if result.deliveries:
                if command.kind is Kind.TOPIC:  # what this stream pushed, the client has received
                    next_offset = result.deliveries[-1].sequence + 1
                credit.spend(len(result.deliveries))
                yield result.deliveries

    def _consume_until(
        self,
        command: Consume,
        deadline: float,
        call: Call,
        quiet: _Quiet | None = None,
    ) -> tuple[Deliveries, _Quiet | None]:
        """Long-poll: propose the consume, and while nothing is ready wait for a publish or
        nack on that name (or the time a lease or delay ends), until `deadline`. Returns what
        it got, and whether that left nothing ready (`_Quiet`) for the caller's next call.

        While waiting, the consume rides along with the next entry that publishes or nacks
        there (`Replication.ride`), so a message published to an idle consumer reaches it in
        the Raft round that commits it. Changes applied meanwhile (`ChangeBoard`) cover a
        publish proposed before the rider was registered: then the consume is proposed again.
        With `quiet` from the caller's last call (a stream after a delivery), the consume is
        not proposed first: it rides at once, one entry less per delivery; it is still proposed
        once `deadline` comes.
        """
        key = (command.kind, command.name)
        if quiet is not None and quiet.stale(
            self._changes, key, self._replication.cluster_time_ms()
        ):
            quiet = None
        while True:
            if quiet is None:
                result, quiet = self._consume_now(command, call)
                if result.deliveries or time.monotonic() >= deadline or not call.is_active():
                    return result, quiet
                if quiet is None:
                    continue  # it dropped expired messages instead of delivering: look again
            elif not call.is_active():
                return Deliveries(()), quiet
            elif time.monotonic() >= deadline:
                # Look once per call all the same, for what the board does not show: the queue
                # deleted, access revoked, a subscription moved back, or an entry clock (which
                # set the lease deadlines) ahead of this node's wall clock.
                quiet = None
                continue
            wake_at = deadline
            if quiet.next_ready_ms:  # something leased or delayed becomes ready then
                ready_in_s = max(
                    limits.LONG_POLL_READY_WAIT_S_MIN,
                    (quiet.next_ready_ms - self._replication.cluster_time_ms()) / 1000,
                )
                wake_at = min(wake_at, time.monotonic() + ready_in_s)
            versions: list[int] = []
            rider = self._replication.ride(key, [command], self._note_version(key, versions))
            try:
                # Wait in slices so a cancelled call frees its thread within a second.
                while (
                    call.is_active()
                    and not self._changes.closed
                    and self._changes.version(*key) == quiet.version
                    and (slice_s := wake_at - time.monotonic()) > 0
                ):
                    self._changes.wait(
                        *key, quiet.version, min(slice_s, limits.LONG_POLL_WAIT_SLICE_S)
                    )
            finally:
                joined = not self._replication.withdraw(rider)
            if joined:
                (ridden,) = await_results(rider.future, call_wait_s(call, self._proposal_timeout_s))
                if isinstance(ridden, ChasquiError):
                    raise ridden
                assert isinstance(ridden, Deliveries)
                if ridden.deliveries:
                    return ridden, _quiet_after(ridden, versions)
            if self._changes.closed:
                raise Unavailable("the node is shutting down; retry on another node")
            self._replication.check_leader()
            if joined or quiet.stale(self._changes, key, self._replication.cluster_time_ms()):
                quiet = None  # others took what that publish brought, or something changed

    def _consume_now(self, command: Consume, call: Call) -> tuple[Deliveries, _Quiet | None]:
        key = (command.kind, command.name)
        versions: list[int] = []
        at_commit = self._note_version(key, versions)
        (result,) = self._replication.propose_many(
            [command], call_wait_s(call, self._proposal_timeout_s), at_commit
        )
        if isinstance(result, ChasquiError):
            raise result
        assert isinstance(result, Deliveries)
        return result, _quiet_after(result, versions)

    def _note_version(self, key: tuple[Kind, str], versions: list[int]) -> AtCommit:
        """An `AtCommit` that notes the change board's version of `key` in `versions`.

        It runs right after the entry holding the consume applied, before the next entry
        applies (see `AtCommit`), so the version noted is the one this consume's result
        reflects: a publish applied later moves it, and `_Quiet.stale` sees that it did."""
        return lambda: versions.append(self._changes.version(*key))
