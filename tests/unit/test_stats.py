"""The server's counters (server/stats.py): what ``serverstats`` shows, added up over
the worker processes' rows, and the NTS-KE latency histogram kept after them."""

from __future__ import annotations

import os

import pytest

from ntspy.server.stats import (
    COUNTERS,
    HANDSHAKE_BUCKETS,
    StatsTable,
    counter_index,
    format_serverstats,
)


def test_serverstats_format() -> None:
    table = StatsTable(workers=2, shared=True)
    table.row(0).add("ntp_received", 5)
    table.row(1).add("ntp_received", 7)
    text = format_serverstats(table.totals())
    assert "NTP packets received       : 12\n" in text
    assert "NTS-KE connections accepted: 0\n" in text


def test_handshake_histogram_buckets_sum_and_workers() -> None:
    table = StatsTable(workers=2, shared=True)
    table.row(0).observe_handshake(0.0005)
    table.row(0).observe_handshake(0.001)  # on a bound: in that bucket (le is <=)
    table.row(1).observe_handshake(0.03)
    table.row(1).observe_handshake(99.0)
    h = table.handshake_histogram()
    assert h.count == 4
    assert h.sum == pytest.approx(0.0005 + 0.001 + 0.03 + 99.0)
    cumulative = dict(h.cumulative())
    assert cumulative[0.001] == 2
    assert cumulative[0.025] == 2
    assert cumulative[0.05] == 3
    assert cumulative[HANDSHAKE_BUCKETS[-1]] == 3
    assert cumulative[float("inf")] == 4
    assert len(h.cumulative()) == len(HANDSHAKE_BUCKETS) + 1


def test_histogram_does_not_disturb_the_counters() -> None:
    table = StatsTable()
    table.row().observe_handshake(0.2)
    assert set(table.totals().values()) == {0}


def test_every_counter_starts_at_zero_and_is_shown_in_chronyc_layout() -> None:
    text = format_serverstats(StatsTable().totals())
    lines = text.splitlines()
    assert len(lines) == len(COUNTERS)
    for line, (_, label) in zip(lines, COUNTERS, strict=True):
        assert line == f"{label:<27}: 0"  # chronyc serverstats' 27-character labels
    assert len({name for name, _ in COUNTERS}) == len(COUNTERS)


def test_rows_are_the_workers_own_and_totals_add_them_up() -> None:
    table = StatsTable(workers=3)
    for worker, n in enumerate((1, 10, 100)):
        table.row(worker).add("nts_naks", n)
    table.row(2).add("ke_accepted")
    assert [table.row(w).get("nts_naks") for w in range(3)] == [1, 10, 100]
    totals = table.totals()
    assert (totals["nts_naks"], totals["ke_accepted"], totals["ntp_received"]) == (111, 1, 0)


def test_a_shared_table_sees_what_a_forked_worker_counts() -> None:
    table = StatsTable(workers=2, shared=True)
    table.row(0).add("ntp_received", 3)
    pid = os.fork()
    if pid == 0:  # the worker: count, observe, leave
        try:
            table.row(1).add("ntp_received", 4)
            table.row(1).add("nts_authenticated", 2)
            table.row(1).observe_handshake(0.02)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    totals = table.totals()
    assert (totals["ntp_received"], totals["nts_authenticated"]) == (7, 2)
    assert table.handshake_histogram().count == 1


def test_a_private_table_is_not_shared_across_fork() -> None:
    table = StatsTable(workers=2)
    pid = os.fork()
    if pid == 0:
        try:
            table.row(1).add("ntp_received", 4)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert table.totals()["ntp_received"] == 0


def test_counter_index_is_where_add_counts() -> None:
    table = StatsTable(workers=2)
    row = table.row(1)
    # The responder's hot path adds to view[base + index] directly: the same counter.
    row.view[row.base + counter_index("nts_cookies")] += 5
    assert row.get("nts_cookies") == 5 and table.totals()["nts_cookies"] == 5
    assert table.row(0).get("nts_cookies") == 0
    with pytest.raises(KeyError):
        counter_index("no_such_counter")


def test_a_negative_latency_counts_in_the_first_bucket_and_adds_nothing_to_the_sum() -> None:
    table = StatsTable()
    table.row().observe_handshake(-0.5)  # a clock step during the session
    table.row().observe_handshake(0.002)
    h = table.handshake_histogram()
    assert h.count == 2 and h.counts[0] == 1
    assert h.sum == pytest.approx(0.002)
    assert sum(h.counts) == h.count
