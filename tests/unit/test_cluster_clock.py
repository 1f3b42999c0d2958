"""ClusterClock: cluster time moves with the monotonic clock, whatever the wall clock says.

A hand-moved monotonic clock and wall clock stand in for the node's; each test sets them apart
the way a skewed or stepped host would and checks the stamps a leader would write.
"""

from __future__ import annotations

import logging

import pytest

from chasqui_node import limits
from chasqui_node.clock import ClusterClock

HOUR_S = 3600.0
START_MS = 1_800_000_000_000  # a cluster time in 2027


class Clocks:
    def __init__(self, wall_s: float, monotonic_s: float = 1000.0) -> None:
        self.wall = wall_s
        self.monotonic = monotonic_s

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.monotonic += seconds

    def clock(self, applied_ms: int) -> ClusterClock:
        return ClusterClock(
            applied_ms, monotonic_s=lambda: self.monotonic, wall_s=lambda: self.wall
        )


def test_a_new_cluster_starts_from_the_first_leaders_wall_clock() -> None:
    clocks = Clocks(wall_s=START_MS / 1000)
    clock = clocks.clock(applied_ms=0)
    assert clock.now_ms() == 0
    assert clock.stamp_ms() == START_MS
    clocks.advance(2.5)
    assert clock.stamp_ms() == START_MS + 2500


def test_a_leader_whose_wall_clock_is_an_hour_ahead_stamps_elapsed_time_only() -> None:
    clocks = Clocks(wall_s=START_MS / 1000 + HOUR_S)
    clock = clocks.clock(applied_ms=START_MS)
    assert clock.stamp_ms() == START_MS
    clocks.advance(2.0)
    assert clock.stamp_ms() == START_MS + 2000
    assert clock.skew_s() == pytest.approx(HOUR_S)


def test_a_leader_whose_wall_clock_is_an_hour_behind_does_not_hold_time_back() -> None:
    clocks = Clocks(wall_s=START_MS / 1000 - HOUR_S)
    clock = clocks.clock(applied_ms=START_MS)
    clocks.advance(5.0)
    assert clock.stamp_ms() == START_MS + 5000
    assert clock.skew_s() == pytest.approx(-HOUR_S)


def test_a_wall_clock_step_mid_run_changes_no_stamp() -> None:
    clocks = Clocks(wall_s=START_MS / 1000)
    clock = clocks.clock(applied_ms=START_MS)
    clocks.advance(1.0)
    clocks.wall += 600.0  # NTP steps the wall clock 10 min forward; monotonic does not jump
    clocks.advance(1.0)
    assert clock.stamp_ms() == START_MS + 2000


def test_a_follower_takes_a_stamp_ahead_of_its_estimate_and_ignores_one_behind() -> None:
    clocks = Clocks(wall_s=START_MS / 1000)
    clock = clocks.clock(applied_ms=START_MS)
    clock.observe(START_MS + 10_000)  # this node just started: the leader's time is ahead
    assert clock.now_ms() == START_MS + 10_000
    clocks.advance(1.0)
    clock.observe(START_MS + 10_500)  # a stamp made before this node's estimate: no change
    assert clock.now_ms() == START_MS + 11_000


def test_a_large_skew_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clocks = Clocks(wall_s=START_MS / 1000 + HOUR_S)
    clock = clocks.clock(applied_ms=START_MS)
    with caplog.at_level(logging.WARNING, logger="chasqui_node.clock"):
        clock.observe(START_MS)
        clocks.advance(1.0)
        clock.observe(START_MS)
        assert len(caplog.records) == 1
        assert "+3600.000 s off cluster time" in caplog.records[0].getMessage()
        clocks.advance(limits.CLOCK_SKEW_WARN_INTERVAL_S + 1)
        clock.observe(START_MS)
    assert len(caplog.records) == 2


def test_a_skew_within_the_bound_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    clocks = Clocks(wall_s=START_MS / 1000 + limits.CLOCK_SKEW_WARN_S / 2)
    clock = clocks.clock(applied_ms=START_MS)
    with caplog.at_level(logging.WARNING, logger="chasqui_node.clock"):
        clock.observe(START_MS)
    assert caplog.records == []
