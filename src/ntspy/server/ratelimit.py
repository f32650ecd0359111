"""Per-client rate limiting like chrony's ``ratelimit`` / ``ntsratelimit``.

Each client address has a bucket of ``burst`` tokens refilled at one token
every ``2**interval`` seconds. A request with no token left is limited; of
the limited requests, one in ``2**leak`` is let through anyway (chrony's
leak) so that a client behind a shared address is not cut off entirely.
Time is handed in; the table is bounded so a flood of spoofed addresses
cannot grow it without limit.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum


class Verdict(Enum):
    PASS = "pass"
    LEAK = "leak"  # over the limit, but answered (with a RATE kiss for NTP)
    DROP = "drop"


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp_ns: int
    limited: int = 0


class RateLimiter:
    def __init__(self, interval: int, burst: int, leak: int, max_clients: int = 65536) -> None:
        self.period_ns = int(2.0**interval * 1e9)
        self.burst = max(1, burst)
        self.leak_every = 1 << max(0, leak)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def check(self, address: str, now_ns: int) -> Verdict:
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._buckets.popitem(last=False)
            bucket = _Bucket(float(self.burst), now_ns)
            self._buckets[address] = bucket
        else:
            self._buckets.move_to_end(address)
            elapsed = max(0, now_ns - bucket.stamp_ns)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed / self.period_ns)
            bucket.stamp_ns = now_ns
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return Verdict.PASS
        bucket.limited += 1
        return Verdict.LEAK if bucket.limited % self.leak_every == 0 else Verdict.DROP
