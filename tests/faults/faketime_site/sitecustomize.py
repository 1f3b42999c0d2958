"""Python start-up hook for a node the clock-skew tests run under libfaketime.

The tests fake only the wall clock (FAKETIME_DONT_FAKE_MONOTONIC=1), as an NTP step would leave
the monotonic clock alone. libfaketime 0.9.10 (Debian 12) then breaks `clock_nanosleep` on
CLOCK_MONOTONIC with TIMER_ABSTIME, which is what `time.sleep` calls from Python 3.11 on: every
sleep fails with EINVAL (libfaketime issue #426). Where that is so, and only there, `time.sleep`
waits on an event that is never set instead, which waits on the real monotonic clock as well.
The tests put this directory first on PYTHONPATH of the skewed node alone; nothing else of the
node changes.
"""

from __future__ import annotations

import threading
import time


def _sleep_is_broken() -> bool:
    try:
        time.sleep(0.001)
    except OSError:
        return True
    return False


if _sleep_is_broken():
    _never_set = threading.Event()

    def _sleep(seconds: float) -> None:
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        _never_set.wait(seconds)

    time.sleep = _sleep
