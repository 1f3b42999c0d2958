"""Admission bounds (admission.py): slots per holder and per node, and the signup rate.

Pure: no sockets or threads; the rate limit runs on a hand-moved monotonic clock. Each bound is
checked just under, exactly at and just over, and a refusal must name the limit and its value.
"""

from __future__ import annotations

import pytest

from chasqui_node.admission import RateLimit, Slots
from chasqui_node.errors import ResourceExhausted


def _slots(holder_max: int, total_max: int | None = None) -> Slots:
    return Slots("waiting calls", "per_key_max", holder_max, "node_max", total_max, "wait")


def test_a_holder_gets_its_bound_and_not_one_more() -> None:
    slots = _slots(holder_max=2)
    with slots.hold("a", "key a"), slots.hold("a", "key a"):  # just under, then at
        assert slots.in_flight() == {"a": 2}
        with pytest.raises(ResourceExhausted) as refused, slots.hold("a", "key a"):
            pass  # just over
        assert refused.value.message == (
            "key a already has 2 waiting calls, at per_key_max 2; wait"
        )
        with slots.hold("b"):  # another holder is not affected
            assert slots.in_flight() == {"a": 2, "b": 1}
    assert slots.in_flight() == {}


def test_the_node_bound_covers_every_holder() -> None:
    slots = _slots(holder_max=5, total_max=2)
    with slots.hold("a"), slots.hold("b"):
        with pytest.raises(ResourceExhausted) as refused, slots.hold("c"):
            pass
        assert refused.value.message == (
            "this node already has 2 waiting calls, at node_max 2; wait"
        )
    with slots.hold("c"):  # freed slots come back
        assert slots.in_flight() == {"c": 1}


def test_a_slot_is_given_back_when_the_call_fails() -> None:
    slots = _slots(holder_max=1)
    with pytest.raises(RuntimeError), slots.hold("a"):
        raise RuntimeError("the call failed")
    assert slots.in_flight() == {}


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_the_rate_allows_a_burst_then_refills_at_its_rate() -> None:
    clock = Clock()
    rate = RateLimit("signups_per_second_max", 2.0, 3, "retry later", monotonic_s=clock)
    for _ in range(3):  # the burst: under, under, at
        rate.take("open signup")
    with pytest.raises(ResourceExhausted) as refused:  # over
        rate.take("open signup")
    assert refused.value.message == (
        "open signup is over signups_per_second_max 2 on this node (bursts of 3); retry later"
    )
    clock.now_s += 0.5  # one token at 2 per second
    rate.take("open signup")
    with pytest.raises(ResourceExhausted):
        rate.take("open signup")
    clock.now_s += 60  # refills to the burst, never beyond
    for _ in range(3):
        rate.take("open signup")
    with pytest.raises(ResourceExhausted):
        rate.take("open signup")
