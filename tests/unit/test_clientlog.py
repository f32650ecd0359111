"""The server's client log (``clients``): counts, bound and eviction, the view merged
across worker processes, what the responder writes to it."""

from __future__ import annotations

import os
import random

import pytest

from ntspy.proto.cookies import KeyRing, MasterKey
from ntspy.proto.ntp import Mode, NtpHeader
from ntspy.server.clientlog import (
    DEFAULT_LIMIT,
    ENTRY_BYTES,
    SLOT_WORDS,
    ClientLogTable,
    capacity_for,
)
from ntspy.server.ratelimit import RateLimiter
from ntspy.server.responder import Responder
from ntspy.server.stats import StatsTable

S = 10**9
NOW = 1_800_000_000 * S
RING = KeyRing([MasterKey(1, bytes(32), 0)])


def by_address(table: ClientLogTable) -> dict[str, dict[str, object]]:
    return {r["address"]: r for r in table.to_json(NOW + 5 * S)}


def test_counts_and_fields() -> None:
    table = ClientLogTable()
    log = table.log()
    log.ntp("192.0.2.1", NOW)
    log.ntp("192.0.2.1", NOW)
    log.ntp_drop("192.0.2.1", NOW + S)
    log.nke("192.0.2.1", NOW + 2 * S, dropped=False)
    log.nke("192.0.2.1", NOW + 3 * S, dropped=True)
    log.nke("2001:db8::1", NOW + 4 * S, dropped=False)
    log.flush(NOW + 2 * S)
    rows = by_address(table)
    assert rows["192.0.2.1"] == {
        "address": "192.0.2.1", "ntp_hits": 3, "ntp_drops": 1, "nke_hits": 2, "nke_drops": 1,
        "last_ntp_ago": 3.0, "last_nke_ago": 2.0,
    }
    assert rows["2001:db8::1"]["ntp_hits"] == 0
    assert rows["2001:db8::1"]["last_ntp_ago"] is None  # never
    assert rows["2001:db8::1"]["last_nke_ago"] == 1.0
    assert list(rows) == ["192.0.2.1", "2001:db8::1"]  # most hits first


def test_ntp_hits_are_published_by_flush() -> None:
    table = ClientLogTable()
    log = table.log()
    log.ntp("192.0.2.1", NOW)
    assert by_address(table)["192.0.2.1"]["ntp_hits"] == 0  # another process sees this
    log.flush(NOW + S)
    row = by_address(table)["192.0.2.1"]
    assert row["ntp_hits"] == 1
    assert row["last_ntp_ago"] == 4.0  # stamped at the flush: 1 s resolution
    log.flush(NOW + 3 * S)  # nothing new: the stamp stays
    assert by_address(table)["192.0.2.1"]["last_ntp_ago"] == 4.0


def test_capacity_follows_the_limit() -> None:
    assert capacity_for(DEFAULT_LIMIT) == DEFAULT_LIMIT // ENTRY_BYTES == 2048
    assert capacity_for(DEFAULT_LIMIT, 2) == 1024  # the limit is for all processes
    assert capacity_for(0) == 1
    assert ClientLogTable(1, 64 * ENTRY_BYTES).capacity == 64


def test_full_table_evicts_the_least_recently_seen() -> None:
    table = ClientLogTable(1, 32 * ENTRY_BYTES)
    log = table.log()
    for i in range(32):
        log.nke(f"10.0.0.{i}", NOW + i * S, dropped=False)
    # 10.0.0.0 and .1 are the oldest; seeing them again makes .2 and .3 the oldest
    log.ntp("10.0.0.0", NOW + 100 * S)
    log.ntp_drop("10.0.0.1", NOW + 100 * S)
    log.ntp("10.0.0.99", NOW + 101 * S)  # full: evicts 32 / 16 = 2 entries
    assert len(log) == 31
    present = set(by_address(table))
    assert "10.0.0.2" not in present and "10.0.0.3" not in present
    assert {"10.0.0.0", "10.0.0.1", "10.0.0.4", "10.0.0.99"} <= present
    for i in range(1000):  # a flood of new addresses never grows it
        log.ntp(f"198.51.{i // 256}.{i % 256}", NOW + (200 + i) * S)
        assert len(log) <= 32
    log.flush(NOW + 2000 * S)
    assert len(table.records()) == len(log) <= 32


def test_unflushed_hits_count_as_seen_when_evicting() -> None:
    table = ClientLogTable(1, 16 * ENTRY_BYTES)
    log = table.log()
    for i in range(16):
        log.ntp(f"10.0.0.{i}", NOW + i * S)
    log.flush(NOW + 20 * S)
    log.ntp("10.0.0.15", NOW + 30 * S)
    for i in range(14):
        log.ntp(f"10.0.0.{i}", NOW + 30 * S)  # hit, not yet published
    log.ntp("10.0.1.1", NOW + 40 * S)  # evicts one: the flush at eviction time stamps the others
    assert "10.0.0.14" not in log.index
    assert "10.0.0.13" in log.index


def test_table_of_one() -> None:
    table = ClientLogTable(1, 0)
    log = table.log()
    log.ntp("192.0.2.1", NOW)
    log.ntp("192.0.2.2", NOW + S)
    log.flush(NOW + S)
    assert [r.address for r in table.records()] == ["192.0.2.2"]


def test_processes_merge_by_address_across_a_fork() -> None:
    table = ClientLogTable(2, DEFAULT_LIMIT, shared=True)
    mine = table.log(0)
    mine.ntp("192.0.2.1", NOW)
    mine.nke("192.0.2.1", NOW + S, dropped=False)
    mine.flush(NOW + S)
    pid = os.fork()
    if pid == 0:  # a worker: its own region, seen by the parent through shared memory
        code = 1
        try:
            theirs = table.log(1)
            for _ in range(5):
                theirs.ntp("::ffff:192.0.2.1", NOW + 2 * S)  # a dual-stack socket's form
            theirs.ntp_drop("192.0.2.1", NOW + 3 * S)
            theirs.ntp("192.0.2.9", NOW + 3 * S)
            theirs.flush(NOW + 4 * S)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    rows = by_address(table)
    assert rows["192.0.2.1"]["ntp_hits"] == 1 + 5 + 1
    assert rows["192.0.2.1"]["ntp_drops"] == 1
    assert rows["192.0.2.1"]["nke_hits"] == 1
    assert rows["192.0.2.1"]["last_ntp_ago"] == 1.0  # the newest of the two processes
    assert rows["192.0.2.9"]["ntp_hits"] == 1


def test_a_restarted_worker_takes_over_its_region() -> None:
    table = ClientLogTable(2, DEFAULT_LIMIT, shared=True)
    first = table.log(1)
    first.ntp("192.0.2.1", NOW)
    first.flush(NOW)
    again = table.log(1)
    assert set(again.index) == {"192.0.2.1"}
    again.ntp("192.0.2.1", NOW + S)
    again.flush(NOW + S)
    assert by_address(table)["192.0.2.1"]["ntp_hits"] == 2


def test_a_slot_being_rewritten_is_not_shown() -> None:
    table = ClientLogTable()
    log = table.log()
    log.ntp("192.0.2.1", NOW)
    log.flush(NOW)
    slot = log.index["192.0.2.1"] * SLOT_WORDS
    table._view[slot] += 1  # odd: a writer is in the middle of reusing it
    assert table.records() == []
    table._view[slot] += 1
    assert [r.address for r in table.records()] == ["192.0.2.1"]


def plain_request() -> bytes:
    return NtpHeader(mode=Mode.CLIENT, transmit_ts=random.getrandbits(64)).pack()


@pytest.mark.parametrize("fastpath", [True, False])
def test_the_responder_logs_answered_and_rate_dropped_requests(fastpath: bool) -> None:
    table, stats = ClientLogTable(), StatsTable()
    log = table.log()
    responder = Responder(RING, stats.row(), random.randbytes, fastpath=fastpath,
                          ratelimit=RateLimiter(interval=4, burst=2, leak=10), clients=log)
    for _ in range(5):
        responder.handle(plain_request(), "192.0.2.1", NOW, lambda: NOW)
    responder.handle(plain_request(), "192.0.2.2", NOW, lambda: NOW)
    responder.handle(b"\x00" * 10, "192.0.2.3", NOW, lambda: NOW)  # malformed: not logged
    log.flush(NOW)
    rows = by_address(table)
    assert rows["192.0.2.1"]["ntp_hits"] == 5  # answered or not, as chrony counts
    assert rows["192.0.2.1"]["ntp_drops"] == stats.totals()["ntp_dropped"] >= 2
    assert rows["192.0.2.2"]["ntp_hits"] == 1
    assert "192.0.2.3" not in rows


def test_the_responder_without_a_log() -> None:
    responder = Responder(RING, StatsTable().row(), random.randbytes)
    assert responder.clients is None
    assert responder.handle(plain_request(), "192.0.2.1", NOW, lambda: NOW) is not None
