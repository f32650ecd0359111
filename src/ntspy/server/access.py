"""``allow`` / ``deny`` for NTP clients, with a per-address cache.

The rules and their chrony semantics live in :func:`ntspy.config.is_allowed`;
this only remembers each address's verdict so the hot path does one dict
lookup per packet.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..config import AccessRule, is_allowed

CACHE_LIMIT = 65536


class AccessTable:
    def __init__(self, rules: Iterable[AccessRule] = ()) -> None:
        self._rules = list(rules)
        self._cache: dict[str, bool] = {}

    def allowed(self, address: str) -> bool:
        hit = self._cache.get(address)
        if hit is None:
            try:
                hit = is_allowed(self._rules, address.split("%", 1)[0])
            except ValueError:
                hit = False
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[address] = hit
        return hit
