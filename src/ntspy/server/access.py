"""``allow`` / ``deny`` for NTP clients, with chrony's semantics.

The most specific subnet that matches an address decides; between rules for
the same subnet the later one wins; with no matching rule access is denied
(chrony serves nobody until the configuration has an ``allow``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(slots=True)
class Rule:
    allow: bool
    network: Network | None  # None: every address of both families


class AccessTable:
    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self._rules = list(rules)
        self._cache: dict[str, bool] = {}

    def allowed(self, address: str) -> bool:
        hit = self._cache.get(address)
        if hit is None:
            hit = self._decide(address)
            if len(self._cache) > 65536:
                self._cache.clear()
            self._cache[address] = hit
        return hit

    def _decide(self, address: str) -> bool:
        try:
            ip: Address = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        best_len = -1
        verdict = False
        for rule in self._rules:
            if rule.network is None:
                length = 0
            elif rule.network.version == ip.version and ip in rule.network:
                length = rule.network.prefixlen
            else:
                continue
            if length >= best_len:
                best_len, verdict = length, rule.allow
        return verdict
