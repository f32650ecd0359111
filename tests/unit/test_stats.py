"""Server counters: rows added up, serverstats' format."""

from __future__ import annotations

from ntspy.server.stats import StatsTable, format_serverstats


def test_serverstats_format() -> None:
    table = StatsTable(workers=2, shared=True)
    table.row(0).add("ntp_received", 5)
    table.row(1).add("ntp_received", 7)
    text = format_serverstats(table.totals())
    assert "NTP packets received       : 12\n" in text
    assert "NTS-KE connections accepted: 0\n" in text
