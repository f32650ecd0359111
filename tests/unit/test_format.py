"""chronyc-compatible table formatting."""

from __future__ import annotations

from ntspy.control.format import (
    AUTHDATA_HEADER,
    SOURCES_HEADER,
    AuthRow,
    SourceRow,
    auth_line,
    header,
    interval,
    nanoseconds,
    signed_nanoseconds,
    source_line,
)


def test_headers_match_chronyc() -> None:
    assert len(SOURCES_HEADER) == 79
    assert header(SOURCES_HEADER).splitlines()[1] == "=" * 79
    assert header(AUTHDATA_HEADER).splitlines()[1] == "=" * 73


def test_interval_units() -> None:
    assert interval(None) == "   -"
    assert interval(11) == "  11"
    assert interval(1199) == "1199"
    assert interval(1200) == " 20m"
    assert interval(135 * 60) == "135m"
    assert interval(36000) == " 10h"
    assert interval(4 * 86400) == "  4d"
    assert interval(3000 * 86400) == "  8y"


def test_nanosecond_units_switch_like_chronyc() -> None:
    assert nanoseconds(134e-9) == " 134ns"
    assert nanoseconds(9999e-9) == "9999ns"
    assert nanoseconds(10000e-9) == "  10us"
    assert nanoseconds(43e-3) == "  43ms"
    assert nanoseconds(12.5) == " 12.5s"
    assert signed_nanoseconds(-479e-9) == " -479ns"
    assert signed_nanoseconds(-2629e-6) == "-2629us"
    assert signed_nanoseconds(140e-6) == " +140us"
    assert signed_nanoseconds(-3.25) == "-3250ms"
    assert signed_nanoseconds(-12.5) == " -12.5s"


def test_source_line_matches_the_chronyc_example() -> None:
    line = source_line(SourceRow("GPS0", "#", "*", 0, 4, 0o377, 11, -479e-9, -621e-9, 134e-9))
    assert line == "#* GPS0                          0   4   377    11   -479ns[ -621ns] +/-  134ns"
    cf = source_line(SourceRow("time.cloudflare.com", "^", "+", 3, 6, 0o377, 31,
                               -140e-6, -140e-6, 13e-3))
    assert cf == "^+ time.cloudflare.com           3   6   377    31   -140us[ -140us] +/-   13ms"


def test_auth_line_matches_the_chronyc_example() -> None:
    row = AuthRow("time.cloudflare.com", "NTS", 6, 15, 256, 4 * 86400, 0, 0, 8, 100)
    assert auth_line(row) == (
        "time.cloudflare.com          NTS     6   15  256   4d    0    0    8  100"
    )
