"""Access rules (allow/deny): the most specific rule decides."""

from __future__ import annotations

import ipaddress

from ntspy.config import AccessRule as Rule
from ntspy.server.access import AccessTable


def test_access_rules_most_specific_wins() -> None:
    t = AccessTable([
        Rule(True, ipaddress.ip_network("10.0.0.0/8")),
        Rule(False, ipaddress.ip_network("10.1.0.0/16")),
        Rule(True, ipaddress.ip_network("10.1.2.0/24")),
    ])
    assert t.allowed("10.9.9.9") and not t.allowed("10.1.9.9") and t.allowed("10.1.2.3")
    assert not t.allowed("192.0.2.1") and not t.allowed("::1") and not t.allowed("junk")
    assert AccessTable([Rule(True, None, all=True)]).allowed("::1")
    assert t.allowed("::ffff:10.9.9.9")
