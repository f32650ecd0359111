"""``allow``/``deny`` as the NTP responder applies them (server/access.py): chrony's
order (the most specific subnet decides, a later line for the same subnet replaces an
earlier one, ``allow all``/``deny all`` override what they cover), written as an
operator writes them in the configuration file."""

from __future__ import annotations

import ipaddress

import pytest

from ntspy.config import AccessRule as Rule
from ntspy.config import parse_config
from ntspy.server import access
from ntspy.server.access import AccessTable


def table(text: str) -> AccessTable:
    return AccessTable(parse_config(text).access)


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


def test_no_rules_serves_nobody() -> None:
    # chronyd serves no NTP client until an allow line says so.
    t = table("")
    assert not t.allowed("127.0.0.1") and not t.allowed("::1") and not t.allowed("192.0.2.1")


def test_the_order_of_lines_does_not_matter_between_subnets() -> None:
    lines = ["allow 10.0.0.0/8", "deny 10.1.0.0/16", "allow 10.1.2.0/24"]
    for order in (lines, lines[::-1], [lines[1], lines[2], lines[0]]):
        t = table("\n".join(order) + "\n")
        assert [t.allowed(a) for a in ("10.9.9.9", "10.1.9.9", "10.1.2.3")] == [
            True, False, True], order


def test_a_later_line_for_the_same_subnet_replaces_the_earlier_one() -> None:
    assert not table("allow 192.0.2.0/24\ndeny 192.0.2.0/24\n").allowed("192.0.2.7")
    assert table("deny 192.0.2.0/24\nallow 192.0.2.0/24\n").allowed("192.0.2.7")


def test_allow_without_a_subnet_is_everyone_both_families() -> None:
    t = table("allow\ndeny 192.0.2.0/24\n")
    assert t.allowed("198.51.100.1") and t.allowed("2001:db8::1")
    assert not t.allowed("192.0.2.1")  # a subnet is more specific than everyone


def test_all_erases_the_rules_inside_it_that_came_before() -> None:
    # "deny all 10/8" after "allow 10.1/16": 10.1/16 is denied too ...
    t = table("allow 10.1.0.0/16\ndeny all 10.0.0.0/8\n")
    assert not t.allowed("10.1.2.3") and not t.allowed("10.9.9.9")
    # ... where "deny 10/8" leaves the more specific allow standing.
    t = table("allow 10.1.0.0/16\ndeny 10.0.0.0/8\n")
    assert t.allowed("10.1.2.3") and not t.allowed("10.9.9.9")
    # A rule after the "all" one still counts.
    t = table("allow 10.1.0.0/16\ndeny all 10.0.0.0/8\nallow 10.1.2.0/24\n")
    assert t.allowed("10.1.2.3") and not t.allowed("10.1.3.1")
    # "allow all" with no subnet opens everything that was closed before it.
    t = table("deny 192.0.2.0/24\ndeny 2001:db8::/32\nallow all\n")
    assert t.allowed("192.0.2.1") and t.allowed("2001:db8::1")


def test_ipv6_subnets() -> None:
    t = table("allow 2001:db8::/32\ndeny 2001:db8:1::/48\n")
    assert t.allowed("2001:db8:2::1")
    assert not t.allowed("2001:db8:1::1")
    assert not t.allowed("2001:db9::1")
    assert not t.allowed("192.0.2.1")  # an IPv6 rule says nothing of IPv4


def test_mapped_and_scoped_addresses_are_judged_by_their_address() -> None:
    t = table("allow 192.0.2.0/24\nallow fe80::/10\n")
    assert t.allowed("::ffff:192.0.2.9")  # how a dual-stack socket shows an IPv4 client
    assert not t.allowed("::ffff:198.51.100.9")
    assert t.allowed("fe80::1%eth0")  # the zone is not part of the address
    assert not t.allowed("fd00::1%eth0")


def test_garbage_addresses_are_denied_not_raised() -> None:
    t = table("allow\n")
    for junk in ("", "junk", "300.1.2.3", "::g", "%eth0", "10.0.0.1/8"):
        assert not t.allowed(junk), junk


def test_verdicts_are_cached_and_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    limit = 64
    monkeypatch.setattr(access, "CACHE_LIMIT", limit)
    t = table("allow 10.0.0.0/8\n")
    for i in range(5 * limit):  # a flood of spoofed sources cannot grow it
        assert t.allowed(f"10.0.{i // 256}.{i % 256}")
        assert len(t._cache) <= limit
    # After the cache was emptied and refilled, verdicts are still the rules'.
    assert not t.allowed("192.0.2.1") and t.allowed("10.200.0.1")
    assert t._cache["192.0.2.1"] is False
