"""How long a step taken for a client's call may wait, given the call's own deadline.

The service, the long-poll (long_poll.py) and the membership steps (membership.py) all wait on
Raft for a client whose call may carry a deadline. Each wait is cut to end a little before that
deadline, so the client receives our answer (a result, or ABORTED with advice) rather than a
bare DEADLINE_EXCEEDED. Nothing here knows gRPC: `grpc.ServicerContext` is a `Call`.
"""

from __future__ import annotations

from typing import Protocol

from chasqui_node import limits


class Call(Protocol):
    """What waiting code needs from a client's call; `grpc.ServicerContext` provides it."""

    def is_active(self) -> bool:
        """False once the client cancelled, its deadline passed, or the call ended."""
        ...

    def time_remaining(self) -> float | None:
        """Seconds until the call's deadline, or None when it has none."""
        ...


def call_wait_s(call: Call, wait_s_max: float) -> float:
    """`wait_s_max`, or less when the call's deadline comes sooner: then the time left less
    `limits.CALL_ANSWER_MARGIN_S`, but never less than `limits.CALL_WAIT_S_MIN`."""
    remaining = call.time_remaining()
    if remaining is None:
        return wait_s_max
    return max(limits.CALL_WAIT_S_MIN, min(wait_s_max, remaining - limits.CALL_ANSWER_MARGIN_S))
