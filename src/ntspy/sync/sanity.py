"""Checks a sample must pass before it may reach a source's filter.

RFC 5905 s8 and chrony's packet tests: an exchange whose four timestamps cannot
describe a real round trip, or whose error bound is already too large to be
useful, says nothing about the time and must not steer anything.  Each check
returns a :class:`SampleReject` reason (counted per source by the adapter) or
None; none of them raises, whatever numbers come in.

Times are Unix ns as the adapter unfolded them (``t1``, ``t4`` local, ``t2``,
``t3`` the server's); everything else float seconds.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

SERVER_TIME_MIN_NS = 946_684_800 * 1_000_000_000
"""2000-01-01 00:00 UTC: a server that says it is earlier is broken or lying
(simulators start at 2010, so the floor stays well below that)."""
SERVER_TIME_SPAN_NS = 100 * 365 * 86400 * 1_000_000_000
"""A server's time must lie within this span after :data:`SERVER_TIME_MIN_NS`.
A server that is merely far off (an hour, a year) passes: telling it apart from
the others is selection's job, not this sanity check's."""
LOCAL_PRECISION = 1e-6
"""Our own timestamps' resolution as assumed here, seconds (kernel timestamps
are finer; a microsecond covers the user-space fallback)."""
DEFAULT_MAX_DELAY = 3.0
"""chrony's ``maxdelay``: a round trip longer than this is no measurement."""


def precision_seconds(log2: int) -> float:
    """An NTP precision field (log2 seconds) in seconds, bounded to what can be meant."""
    return 2.0 ** max(-64, min(0, log2))


class SampleReject(enum.StrEnum):
    """Why a sample was dropped (the key it is counted under)."""

    NON_FINITE = "non-finite value"
    NEGATIVE_DELAY = "negative delay"
    DELAY_TOO_LONG = "delay over maxdelay"
    SERVER_TIME_REVERSED = "server transmit before receive (T3 < T2)"
    ZERO_TIMESTAMP = "zero timestamp"
    SERVER_TIME_IMPLAUSIBLE = "server time out of range"
    LOCAL_TIME_REVERSED = "local receive before transmit (T4 < T1)"
    ROOT_DISTANCE = "root distance over maxdistance"


@dataclass(slots=True, frozen=True)
class SampleLimits:
    """The thresholds of :func:`check_exchange` (chrony's directives)."""

    max_distance: float = 3.0
    max_delay: float = DEFAULT_MAX_DELAY


def check_exchange(
    t1: int,
    t2: int,
    t3: int,
    t4: int,
    *,
    root_delay: float,
    root_dispersion: float,
    dispersion: float,
    precision: int = -20,
    limits: SampleLimits | None = None,
) -> SampleReject | None:
    """Whether the exchange ``t1..t4`` may become a sample; the reason if not.

    ``precision`` is the server's announced precision (log2 seconds).

    The root distance checked is the one the sample would enter selection
    with: the server's root delay / 2 + root dispersion plus our half round
    trip and the sample's own dispersion.
    """
    lim = limits or SampleLimits()
    if t2 == 0 or t3 == 0 or t1 == 0 or t4 == 0:
        return SampleReject.ZERO_TIMESTAMP
    for value in (root_delay, root_dispersion, dispersion):
        if not math.isfinite(value) or value < 0:
            return SampleReject.NON_FINITE
    for t in (t2, t3):
        if not SERVER_TIME_MIN_NS <= t <= SERVER_TIME_MIN_NS + SERVER_TIME_SPAN_NS:
            return SampleReject.SERVER_TIME_IMPLAUSIBLE
    # Timestamps are only as good as their precision: servers (chronyd
    # among them) fuzz the bits below it, so T3 can read a hair before T2 and
    # a round trip on a fast path a hair below zero.  Within the precisions
    # that is rounding; beyond them the times cannot be of a real exchange.
    tolerance = precision_seconds(precision) + LOCAL_PRECISION
    if t4 < t1:
        return SampleReject.LOCAL_TIME_REVERSED
    if (t2 - t3) / 1e9 > tolerance:
        return SampleReject.SERVER_TIME_REVERSED
    delay = ((t4 - t1) - (t3 - t2)) / 1e9
    if delay < -tolerance:
        return SampleReject.NEGATIVE_DELAY
    if delay > lim.max_delay:
        return SampleReject.DELAY_TOO_LONG
    distance = root_delay / 2 + root_dispersion + max(delay, 0.0) / 2 + dispersion
    if not distance <= lim.max_distance:
        return SampleReject.ROOT_DISTANCE
    return None
