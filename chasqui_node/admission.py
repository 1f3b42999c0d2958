"""Admission: how many calls one connection, one key and the whole node may hold at once.

The node serves gRPC from a pool of `server.GRPC_WORKERS` threads, and a call holds its thread
until it answers: a long-poll for up to `limits.CONSUME_WAIT_S_MAX`, a stream for as long as it
is open. Without bounds one user's waiting calls could hold every thread, and the node would
stop answering everyone else (its health check included) while they wait. So calls are counted
where they start and refused at once with RESOURCE_EXHAUSTED over a bound, never queued:

- calls in flight per connection (`CALLS_IN_FLIGHT_PER_CONNECTION_MAX`), every call;
- waiting calls (long-polls with a timeout, streams) per key (`WAITING_CALLS_PER_KEY_MAX`) and
  per node (`WAITING_CALLS_MAX`). The node bound leaves `GRPC_WORKERS - WAITING_CALLS_MAX`
  threads that waiting calls can never take: the core that keeps health checks, status and
  every other user's publishes, acks and short consumes answered.

Open signup is rate-limited too (`RateLimit`, `SIGNUPS_PER_SECOND_MAX`): anyone may create a
user, so without it a script could fill the cluster's user table (USERS_MAX) in minutes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from chasqui_node import limits
from chasqui_node.errors import ResourceExhausted


class Slots:
    """Counts the calls each holder (a connection, a key) has open, with a bound per holder and
    optionally one over all holders; a call over either is refused, not queued. Counts of idle
    holders are dropped, so they cost nothing. Any thread."""

    def __init__(
        self,
        what: str,
        holder_limit_name: str,
        holder_max: int,
        total_limit_name: str = "",
        total_max: int | None = None,
        advice: str = "",
    ) -> None:
        """`what` names the calls counted ("calls in flight"); the limit names appear in the
        refusal with their values, and `advice` tells the caller what to do instead."""
        self._lock = threading.Lock()
        self._what = what
        self._holder_limit_name = holder_limit_name
        self._holder_max = holder_max
        self._total_limit_name = total_limit_name
        self._total_max = total_max
        self._advice = advice
        self._held: dict[str, int] = {}
        self._total = 0

    @contextlib.contextmanager
    def hold(self, holder: str, holder_name: str | None = None) -> Iterator[None]:
        """Hold one slot for `holder` while the block runs. Raises ResourceExhausted naming
        the holder as `holder_name` (default: `holder` itself) and the limit."""
        with self._lock:
            count = self._held.get(holder, 0)
            if count >= self._holder_max:
                raise ResourceExhausted(
                    f"{holder_name or holder} already has {count} {self._what}, at "
                    f"{self._holder_limit_name} {self._holder_max}; {self._advice}"
                )
            if self._total_max is not None and self._total >= self._total_max:
                raise ResourceExhausted(
                    f"this node already has {self._total} {self._what}, at "
                    f"{self._total_limit_name} {self._total_max}; {self._advice}"
                )
            self._held[holder] = count + 1
            self._total += 1
        try:
            yield
        finally:
            with self._lock:
                self._total -= 1
                remaining = self._held[holder] - 1
                if remaining:
                    self._held[holder] = remaining
                else:
                    del self._held[holder]

    def in_flight(self) -> dict[str, int]:
        """Slots held by holder, for tests and diagnostics."""
        with self._lock:
            return dict(self._held)


class RateLimit:
    """A token bucket: `burst` calls at once, then `per_second` on average; a call without a
    token is refused at once. Per node, not replicated: it bounds what one node admits (only
    the leader proposes, so it bounds the cluster while leadership stays put). Any thread."""

    def __init__(
        self,
        limit_name: str,
        per_second: float,
        burst: int,
        advice: str,
        monotonic_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._limit_name = limit_name
        self._per_second = per_second
        self._burst = burst
        self._advice = advice
        self._monotonic_s = monotonic_s
        self._tokens = float(burst)
        self._filled_at_s = monotonic_s()

    def take(self, what: str) -> None:
        """Spend a token for `what`, or raise ResourceExhausted naming the rate."""
        with self._lock:
            now_s = self._monotonic_s()
            elapsed_s = max(0.0, now_s - self._filled_at_s)
            self._tokens = min(self._burst, self._tokens + elapsed_s * self._per_second)
            self._filled_at_s = now_s
            if self._tokens < 1:
                raise ResourceExhausted(
                    f"{what} is over {self._limit_name} {self._per_second:g} on this node "
                    f"(bursts of {self._burst}); {self._advice}"
                )
            self._tokens -= 1


@dataclass(frozen=True)
class Admission:
    """A node's bounds for its gRPC service: calls per connection, waiting calls per key and
    per node, and the open-signup rate."""

    connection_slots: Slots  # by gRPC peer
    waiting_slots: Slots  # long-polls and streams, by key hash
    signups: RateLimit

    @classmethod
    def for_node(
        cls,
        calls_in_flight_per_connection_max: int = limits.CALLS_IN_FLIGHT_PER_CONNECTION_MAX,
        waiting_calls_max: int = limits.WAITING_CALLS_MAX,
        waiting_calls_per_key_max: int = limits.WAITING_CALLS_PER_KEY_MAX,
    ) -> Admission:
        return cls(
            connection_slots=Slots(
                "calls in flight",
                "calls_in_flight_per_connection_max",
                calls_in_flight_per_connection_max,
                advice="wait for one to finish or open another connection",
            ),
            waiting_slots=Slots(
                "waiting calls (long-polls and streams)",
                "waiting_calls_per_key_max",
                waiting_calls_per_key_max,
                "waiting_calls_max",
                waiting_calls_max,
                advice="close one, or consume with timeout_s 0 and a pause between calls",
            ),
            signups=RateLimit(
                "signups_per_second_max",
                limits.SIGNUPS_PER_SECOND_MAX,
                limits.SIGNUP_BURST_MAX,
                advice="retry in a moment, or have an admin create the user",
            ),
        )
