"""Clocks: where the adapters read the time.

Protocol code never reads a clock; the I/O adapters (``ntspy.net``,
``ntspy.client``, ``ntspy.server``) take a :class:`Clock` and pass the
readings in.  Tests hand them a :class:`ManualClock` instead.

Only reading lives here for now.  Disciplining the system clock (slewing and
stepping through ``adjtimex`` / ``clock_adjtime``) belongs to the sync loop and
will extend this module with its own interface; reading must never need
CAP_SYS_TIME.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Anything that tells the current real (wall-clock) time."""

    def now_ns(self) -> int:
        """Current time as Unix nanoseconds (CLOCK_REALTIME scale)."""
        ...


class SystemClock:
    """The kernel's CLOCK_REALTIME, the same clock SO_TIMESTAMPNS stamps with."""

    __slots__ = ()

    def now_ns(self) -> int:
        return time.clock_gettime_ns(time.CLOCK_REALTIME)


class ManualClock:
    """A clock that only moves when told to; for tests and simulation."""

    __slots__ = ("_now",)

    def __init__(self, start_ns: int = 0) -> None:
        self._now = start_ns

    def now_ns(self) -> int:
        return self._now

    def set(self, now_ns: int) -> None:
        """Jump to ``now_ns``."""
        self._now = now_ns

    def advance(self, delta_ns: int) -> None:
        """Move forward (or back, if negative) by ``delta_ns``."""
        self._now += delta_ns
