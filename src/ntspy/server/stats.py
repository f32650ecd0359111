"""Server counters, like ``chronyc serverstats``.

The counters live in a flat array of 64-bit integers, one row per worker
process, so forked workers can count without locks and the control socket
can add the rows up. A single process just uses one row in private memory.
"""

from __future__ import annotations

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
    ("kernel_tx", "NTP kernel TX timestamps"),
    # Appended: the indices before them are fixed.
    ("ke_denied", "NTS-KE connections denied"),
    ("ke_timeouts", "NTS-KE sessions timed out"),
    ("ke_drop_full", "NTS-KE dropped: server full"),
    ("ke_drop_client", "NTS-KE dropped: client cap"),
    ("ke_drop_rate", "NTS-KE dropped: rate limit"),
)
_INDEX = {name: i for i, (name, _) in enumerate(COUNTERS)}
_WIDTH = len(COUNTERS)


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


@dataclass(slots=True)
class ServerStats:
    """One worker's counters: ``stats.add("ntp_received")``."""

    view: memoryview
    base: int

    def add(self, name: str, n: int = 1) -> None:
        self.view[self.base + _INDEX[name]] += n

    def get(self, name: str) -> int:
        return int(self.view[self.base + _INDEX[name]])


def format_serverstats(totals: dict[str, int]) -> str:
    """The counters as ``chronyc serverstats`` lays them out (27-char labels)."""
    return "".join(f"{label:<27}: {totals[name]}\n" for name, label in COUNTERS)
