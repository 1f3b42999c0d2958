"""Cluster time: the clock a leader stamps into entries, which no single wall clock can bend.

The rule. Cluster time is what the state machine stores (`m:clock`, the largest stamp applied,
so it never runs backwards on any replica). Each node keeps an estimate of it: the latest
cluster time it has seen, advanced by this node's *monotonic* clock since it saw it. It sees
cluster time in every entry it applies and in every append-entries message of the leader,
heartbeats included (raft/node.py), so a follower's estimate is the leader's even while
nothing is written, and a node that caught up on old entries resumes from the present, not
from its last entry's stamp. A leader stamps its estimate. So a leader advances cluster time
by the real time that passed on it, whatever its wall clock says: a node whose wall clock is
an hour ahead or behind, or that is stepped by NTP mid-run, leads with the same time as any
other, and leases, TTLs and delays last what they were asked to last. Only clock *rate*
matters, and ordinary clocks agree on rate within a few parts per million.

A wall clock is read in two places only:
- a brand-new cluster (stored clock 0) starts cluster time from its first leader's wall clock,
  so publish times read as dates; a wrong clock there offsets every publish time by its error,
  but no duration;
- every node compares its wall clock with its estimate and exports the difference
  (`chasqui_clock_skew_seconds`), logging a warning when it passes CLOCK_SKEW_WARN_S: either
  that node's clock is wrong, or cluster time was set by a wrong one.

What this gives up: while no node runs (a whole-cluster stop), cluster time stands still, so
leases, delays and TTLs do not run down during the outage, and publish times after it trail
the wall clock by the outage's length (the skew metric shows it). A rolling restart loses
nothing: the running nodes keep the time.

Thread rules: `observe` runs on the replication (tick) thread, after each apply and on each
append-entries message; `now_ms`,
`stamp_ms` and `skew_s` may be called from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from chasqui_node import limits

logger = logging.getLogger(__name__)


class ClusterClock:
    """This node's estimate of cluster time, in milliseconds since the Unix epoch."""

    def __init__(
        self,
        applied_ms: int,
        *,
        monotonic_s: Callable[[], float] = time.monotonic,
        wall_s: Callable[[], float] = time.time,
    ) -> None:
        self._monotonic_s = monotonic_s
        self._wall_s = wall_s
        self._lock = threading.Lock()
        # Cluster time `_base_ms` held at this node's monotonic `_base_s`.
        self._base_ms = applied_ms
        self._base_s = monotonic_s()
        self._warned_at_s: float | None = None

    def now_ms(self) -> int:
        """The estimate: never behind the last clock applied here, and moving at the rate of
        this node's monotonic clock. 0 while the cluster has never stamped a time."""
        with self._lock:
            return self._now_locked(self._monotonic_s())

    def _now_locked(self, monotonic_s: float) -> int:
        if self._base_ms == 0:
            return 0
        return self._base_ms + int((monotonic_s - self._base_s) * 1000)

    def stamp_ms(self) -> int:
        """The time a leader stamps into the entry it proposes now. A brand-new cluster's first
        stamp is this node's wall clock (see the module docstring)."""
        with self._lock:
            monotonic_s = self._monotonic_s()
            if self._base_ms == 0:
                self._base_ms = max(1, int(self._wall_s() * 1000))
                self._base_s = monotonic_s
            return self._now_locked(monotonic_s)

    def observe(self, applied_ms: int) -> None:
        """`applied_ms` is cluster time as an entry or the leader's message says. If it is
        ahead of this estimate (the leader's monotonic clock ran faster, or this node just
        started or caught up) the estimate takes it from here; one behind changes nothing."""
        with self._lock:
            monotonic_s = self._monotonic_s()
            if applied_ms > self._now_locked(monotonic_s):
                self._base_ms = applied_ms
                self._base_s = monotonic_s
            skew_s = self._skew_locked(monotonic_s)
            warn = abs(skew_s) > limits.CLOCK_SKEW_WARN_S and (
                self._warned_at_s is None
                or monotonic_s - self._warned_at_s > limits.CLOCK_SKEW_WARN_INTERVAL_S
            )
            if warn:
                self._warned_at_s = monotonic_s
        if warn:
            logger.warning(
                "this node's wall clock is %+.3f s off cluster time (warning above %.1f s): "
                "check its time source; leases, TTLs and delays follow cluster time and are "
                "not affected, publish times are",
                skew_s,
                limits.CLOCK_SKEW_WARN_S,
            )

    def skew_s(self) -> float:
        """This node's wall clock minus cluster time, in seconds (0 before any stamp)."""
        with self._lock:
            return self._skew_locked(self._monotonic_s())

    def _skew_locked(self, monotonic_s: float) -> float:
        now_ms = self._now_locked(monotonic_s)
        if now_ms == 0:
            return 0.0
        return self._wall_s() - now_ms / 1000
