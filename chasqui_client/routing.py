"""Routing and retry decisions shared by the sync and the asyncio clients, without any I/O.

`Router` holds what a client knows about the cluster (endpoints, the cached leader). A `CallPlan`
walks one call through its attempts: it says which endpoint to try next, with what deadline and
long-poll wait, when to pause between rounds, and what every failure means (follow a leader hint,
move on, retry an ambiguous outcome, or raise). The two clients only perform the I/O the plan
asks for, so both follow exactly the rules described in `chasqui_client.client`.

Everything here is safe to call from several threads; nothing blocks or sleeps.
"""

from __future__ import annotations

import enum
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from chasqui_client import errors, limits

# Channel options shared by the sync and asyncio clients. gRPC's reconnect backoff grows to
# 120 s by default, during which calls to a node that came back fail at once; a broker's nodes
# restart in seconds, so reconnect within about 1 s.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", limits.GRPC_MESSAGE_BYTES_MAX),
    ("grpc.max_receive_message_length", limits.GRPC_MESSAGE_BYTES_MAX),
    ("grpc.initial_reconnect_backoff_ms", limits.RECONNECT_BACKOFF_INITIAL_MS),
    ("grpc.max_reconnect_backoff_ms", limits.RECONNECT_BACKOFF_MAX_MS),
]
# States in which a call is answered without waiting for a connection: connected or failing fast.
SETTLED_STATES = frozenset(
    {
        grpc.ChannelConnectivity.READY,
        grpc.ChannelConnectivity.TRANSIENT_FAILURE,
        grpc.ChannelConnectivity.SHUTDOWN,
    }
)

LEADER_METADATA_KEY = "chasqui-leader"

_AMBIGUOUS_CODES = (grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED)


class Action(enum.Enum):
    """What to do after one failed attempt."""

    REDIRECT = "redirect"  # UNAVAILABLE with a leader hint: try the hinted leader next
    NEXT = "next"  # the node could not serve it and nothing happened: try the next endpoint
    RETRY_AMBIGUOUS = "retry_ambiguous"  # may have happened, but repeating it is safe
    RAISE_AMBIGUOUS = "raise_ambiguous"  # may have happened and is not idempotent
    RAISE = "raise"  # a definite answer (INVALID_ARGUMENT, NOT_FOUND, ...)


def classify(
    code: grpc.StatusCode, *, hint: str | None, connected: bool, idempotent: bool
) -> Action:
    """The decision for one failed attempt with status `code`.

    `connected` says whether the channel was connected when the attempt failed: a deadline on a
    channel that never connected cannot have reached the node, so it is not ambiguous.
    """
    if code is grpc.StatusCode.UNAVAILABLE:
        return Action.REDIRECT if hint else Action.NEXT
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and not connected:
        return Action.NEXT
    if code in _AMBIGUOUS_CODES:
        return Action.RETRY_AMBIGUOUS if idempotent else Action.RAISE_AMBIGUOUS
    return Action.RAISE


def leader_hint(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The leader address a follower named in its trailing metadata, if any."""
    for key, value in trailing_metadata or ():
        if key == LEADER_METADATA_KEY:
            hint = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            return hint.strip() or None
    return None


def rpc_error_hint(error: grpc.RpcError) -> str | None:
    """`leader_hint` of a failed sync call (the asyncio client reads its metadata itself)."""
    trailing_method = getattr(error, "trailing_metadata", None)
    trailing = trailing_method() if callable(trailing_method) else None
    return leader_hint(trailing)


def check_endpoints(endpoints: Iterable[str]) -> list[str]:
    """The endpoint list without duplicates; raises for a single string or empty entries."""
    if isinstance(endpoints, str):
        raise TypeError("endpoints must be a list of 'host:port' strings, not one string")
    addresses = list(dict.fromkeys(endpoint.strip() for endpoint in endpoints))
    if not addresses or not all(addresses):
        raise ValueError(f"endpoints must be non-empty 'host:port' strings, got {endpoints!r}")
    return addresses


@dataclass(frozen=True)
class Timing:
    """A client's time bounds (see `Client` for what each one means)."""

    call_timeout_s: float = limits.CALL_TIMEOUT_S_DEFAULT
    attempt_timeout_s: float = limits.CALL_TIMEOUT_S_DEFAULT
    connect_timeout_s: float = limits.CONNECT_TIMEOUT_S_DEFAULT
    backoff_initial_s: float = limits.BACKOFF_INITIAL_S
    backoff_max_s: float = limits.BACKOFF_MAX_S

    def __post_init__(self) -> None:
        if min(self.call_timeout_s, self.attempt_timeout_s, self.connect_timeout_s) <= 0:
            raise ValueError("call_timeout_s, attempt_timeout_s and connect_timeout_s must be > 0")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("backoff_initial_s must be positive and at most backoff_max_s")


# Shared by every Backoff without its own: seeding a new Random from os.urandom cost 20 us
# per call, for a pause most calls never take (its draws are thread-safe under the GIL).
_JITTER = random.Random()


class Backoff:
    """Jittered pauses between rounds in which every endpoint failed: uniform in [d/2, d], with
    d doubling from `initial_s` to `max_s`. Not thread-safe: one per call or stream."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._current_s = initial_s
        self._random = rng or _JITTER

    def next_pause_s(self) -> float:
        pause_s = self._random.uniform(self._current_s / 2, self._current_s)
        self._current_s = min(self._max_s, self._current_s * 2)
        return pause_s

    def reset(self) -> None:
        self._current_s = self._initial_s


class Router:
    """The endpoints a client knows and the one it believes leads. Thread-safe; the lock is
    never held while waiting, so the asyncio client uses it from its event loop as well."""

    def __init__(self, addresses: list[str]) -> None:
        self._lock = threading.Lock()
        self._addresses = list(addresses)
        self._leader: str | None = None
        self._closed = False

    @property
    def addresses(self) -> list[str]:
        with self._lock:
            return list(self._addresses)

    @property
    def leader(self) -> str | None:
        with self._lock:
            return self._leader

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def check_open(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("client is closed")

    def round_order(self) -> list[str]:
        """The leader first (if known), then every other endpoint in list order."""
        with self._lock:
            if self._closed:
                raise RuntimeError("client is closed")
            leader = self._leader
            others = [address for address in self._addresses if address != leader]
        return [leader, *others] if leader is not None else others

    def follow_hint(self, hint: str) -> None:
        with self._lock:
            if hint not in self._addresses:
                self._addresses.append(hint)
            self._leader = hint

    def forget_leader(self, address: str) -> None:
        with self._lock:
            if self._leader == address:
                self._leader = None

    def remember_leader(self, address: str) -> None:
        with self._lock:
            self._leader = address


@dataclass(frozen=True)
class Attempt:
    """Try `address` now: wait at most `connect_timeout_s` for a connection, then send with the
    deadline `send_timeout_s()`; a consume asks the node to hold the call for `wait_s`."""

    address: str
    connect_timeout_s: float
    wait_s: float
    attempt_budget_s: float
    call_deadline: float  # time.monotonic() value

    def send_timeout_s(self) -> float:
        """The attempt's gRPC deadline, measured when it is sent (after any connect wait)."""
        return max(0.001, min(self.call_deadline - time.monotonic(), self.attempt_budget_s))


@dataclass(frozen=True)
class Pause:
    """Every endpoint of this round failed: sleep `seconds`, then ask again."""

    seconds: float


@dataclass
class CallPlan:
    """The attempts of one call: `next_step()` until an attempt succeeds (`succeeded`) or a
    step raises. `on_failure` / `on_unreachable` record what each attempt saw and raise when
    the call must end."""

    rpc: str
    router: Router
    timing: Timing
    idempotent: bool
    wait_s: float = 0.0
    _deadline: float = 0.0
    _budget_s: float = 0.0
    _order: list[str] = field(default_factory=list)
    _index: int = 0
    _redirects: int = 0
    _attempts_made: int = 0
    _attempts: dict[str, str] = field(default_factory=dict)
    _ambiguous_error: str | None = None
    _backoff: Backoff | None = None

    def __post_init__(self) -> None:
        self._budget_s = self.timing.call_timeout_s + self.wait_s
        self._deadline = time.monotonic() + self._budget_s
        self._order = self.router.round_order()
        self._backoff = Backoff(self.timing.backoff_initial_s, self.timing.backoff_max_s)

    def next_step(self) -> Attempt | Pause:
        remaining_s = self._deadline - time.monotonic()
        if remaining_s <= 0:
            raise self.budget_error()
        if self._index >= len(self._order):
            assert self._backoff is not None
            self._order = self.router.round_order()
            self._index = 0
            self._redirects = 0
            return Pause(min(remaining_s, self._backoff.next_pause_s()))
        address = self._order[self._index]
        self._index += 1
        wait_s = self.wait_s
        if self._attempts_made and wait_s > 0:
            # A retry waits only for what is left of the caller's wait.
            wait_s = min(wait_s, max(0.0, remaining_s - self.timing.call_timeout_s))
        return Attempt(
            address=address,
            connect_timeout_s=min(remaining_s, self.timing.connect_timeout_s),
            wait_s=wait_s,
            attempt_budget_s=self.timing.attempt_timeout_s + wait_s,
            call_deadline=self._deadline,
        )

    def on_unreachable(self, address: str) -> None:
        """The endpoint did not connect within the connect timeout: nothing was sent."""
        self._attempts[address] = (
            f"could not connect within connect_timeout_s {self.timing.connect_timeout_s:g}"
        )
        self.router.forget_leader(address)

    def on_sent(self) -> None:
        self._attempts_made += 1

    def on_failure(
        self,
        address: str,
        code: grpc.StatusCode,
        details: str,
        *,
        hint: str | None,
        connected: bool,
    ) -> None:
        """Records a failed attempt; raises the call's error when it must not go on."""
        description = f"{code.name}: {details}"
        self._attempts[address] = description
        action = classify(code, hint=hint, connected=connected, idempotent=self.idempotent)
        if action is Action.RAISE:
            raise errors.from_status(code, details)
        if action is Action.RAISE_AMBIGUOUS:
            raise errors.OutcomeUnknown(
                f"{self.rpc} on {address} failed with {description}; it may or may not have "
                "happened",
                code=code.name,
            )
        if action is Action.RETRY_AMBIGUOUS:
            self._ambiguous_error = f"{address}: {description}"
        self.router.forget_leader(address)
        if (
            action is Action.REDIRECT
            and hint is not None
            and hint != address
            and self._redirects < limits.REDIRECTS_PER_ROUND_MAX
        ):
            self._redirects += 1
            self.router.follow_hint(hint)
            self._order.insert(self._index, hint)

    def succeeded(self, address: str) -> None:
        self.router.remember_leader(address)

    def budget_error(self) -> errors.ChasquiError:
        if self._ambiguous_error is not None:
            return errors.OutcomeUnknown(
                f"no confirmed answer within {self._budget_s:g} s after {self._ambiguous_error}; "
                "it may or may not have happened; safe to retry with the same id"
            )
        return errors.NoEndpointAvailable(self._budget_s, self._attempts)
