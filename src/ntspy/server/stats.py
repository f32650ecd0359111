"""Server counters, like ``chronyc serverstats``.

The counters live in a flat array of 64-bit integers, one row per worker
process, so forked workers can count without locks and the control socket
can add the rows up. A single process just uses one row in private memory.

After the named counters, each row holds the NTS-KE handshake latency
histogram: one count per bucket of :data:`HANDSHAKE_BUCKETS` (not
cumulative: one addition per observation), then the sum in nanoseconds and
the number of observations.  Only :meth:`StatsTable.handshake_histogram`
reads them; ``serverstats`` shows the named counters.
"""

from __future__ import annotations

import bisect
import mmap
from dataclasses import dataclass

# Order matters only for the shared array; names are what users see.
COUNTERS: tuple[tuple[str, str], ...] = (
    ("ntp_received", "NTP packets received"),
    ("ntp_dropped", "NTP packets dropped"),
    ("ntp_malformed", "NTP packets malformed"),
    ("ntp_denied", "NTP packets denied"),
    ("ntp_rate_kod", "NTP RATE kiss-o'-death sent"),
    ("nts_authenticated", "Authenticated NTP packets"),
    ("nts_naks", "NTS NAKs sent"),
    ("nts_auth_failures", "NTS authentication failures"),
    ("ke_accepted", "NTS-KE connections accepted"),
    ("ke_dropped", "NTS-KE connections dropped"),
    ("ke_completed", "NTS-KE exchanges completed"),
    ("ke_errors", "NTS-KE errors sent"),
    ("ke_failed", "NTS-KE connections failed"),
    ("daemon_rx", "NTP daemon RX timestamps"),
    ("daemon_tx", "NTP daemon TX timestamps"),
    ("kernel_rx", "NTP kernel RX timestamps"),
    # Appended: the indices before them are fixed.
    ("ke_denied", "NTS-KE connections denied"),
    ("ke_timeouts", "NTS-KE sessions timed out"),
    ("ke_drop_full", "NTS-KE dropped: server full"),
    ("ke_drop_client", "NTS-KE dropped: client cap"),
    ("ke_drop_rate", "NTS-KE dropped: rate limit"),
    ("ke_cookies", "NTS-KE cookies issued"),
    ("nts_cookies", "NTS cookies in NTP replies"),
)
_INDEX = {name: i for i, (name, _) in enumerate(COUNTERS)}

HANDSHAKE_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)
"""Upper bounds (seconds) of the NTS-KE latency buckets, +Inf after them; the
session timeout (``ntssessiontimeout``, 2 s by default) ends every session
before the last finite one."""

_HIST_BASE = len(COUNTERS)  # first bucket; one more for +Inf
_HIST_SUM = _HIST_BASE + len(HANDSHAKE_BUCKETS) + 1  # nanoseconds
_HIST_COUNT = _HIST_SUM + 1
_WIDTH = _HIST_COUNT + 1


def counter_index(name: str) -> int:
    """Position of counter ``name`` within a row: hot paths add ``view[base + index]``
    directly instead of looking the name up per packet."""
    return _INDEX[name]


class StatsTable:
    """Rows of counters, one per worker; shared across fork() when ``shared``."""

    def __init__(self, workers: int = 1, shared: bool = False) -> None:
        size = max(1, workers) * _WIDTH * 8
        self._buf: mmap.mmap | bytearray = (
            mmap.mmap(-1, size, flags=mmap.MAP_SHARED) if shared else bytearray(size)
        )
        self._view = memoryview(self._buf).cast("q")
        self.workers = max(1, workers)

    def row(self, worker: int = 0) -> ServerStats:
        return ServerStats(self._view, worker * _WIDTH)

    def totals(self) -> dict[str, int]:
        sums = dict.fromkeys(_INDEX, 0)
        for w in range(self.workers):
            base = w * _WIDTH
            for name, i in _INDEX.items():
                sums[name] += self._view[base + i]
        return sums

    def handshake_histogram(self) -> Histogram:
        """The NTS-KE latency histogram of all workers together."""
        width = _WIDTH - _HIST_BASE
        sums = [0] * width
        view = self._view
        for w in range(self.workers):
            base = w * _WIDTH + _HIST_BASE
            for i, n in enumerate(view[base:base + width].tolist()):
                sums[i] += n
        buckets = len(HANDSHAKE_BUCKETS) + 1
        return Histogram(HANDSHAKE_BUCKETS, tuple(sums[:buckets]),
                         sums[buckets] / 1e9, sums[buckets + 1])


@dataclass(frozen=True, slots=True)
class Histogram:
    """Observations per bucket (``counts[i]``: those <= ``bounds[i]`` and above the
    bound before; the last one: above every bound), their sum and number."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float
    count: int

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` per bucket, ``inf`` last (Prometheus)."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


@dataclass(slots=True)
class ServerStats:
    """One worker's counters: ``stats.add("ntp_received")``."""

    view: memoryview
    base: int

    def add(self, name: str, n: int = 1) -> None:
        self.view[self.base + _INDEX[name]] += n

    def get(self, name: str) -> int:
        return int(self.view[self.base + _INDEX[name]])

    def observe_handshake(self, seconds: float) -> None:
        """One NTS-KE session's latency into the histogram."""
        view, base = self.view, self.base
        view[base + _HIST_BASE + bisect.bisect_left(HANDSHAKE_BUCKETS, seconds)] += 1
        view[base + _HIST_SUM] += max(0, int(seconds * 1e9))
        view[base + _HIST_COUNT] += 1


def format_serverstats(totals: dict[str, int]) -> str:
    """The counters as ``chronyc serverstats`` lays them out (27-char labels)."""
    return "".join(f"{label:<27}: {totals[name]}\n" for name, label in COUNTERS)
