"""The server's Prometheus metrics (server/collector.py), read at scrape time from the
shared counters, the key ring, the client log and the fleet's status, and parsed back
from the endpoint's exposition as a scraper would see them."""

from __future__ import annotations

import pytest

from ntspy.metrics import MetricsServer
from ntspy.proto.cookies import KeyRing, MasterKey
from ntspy.server.clientlog import ClientLogTable
from ntspy.server.collector import ServerCollector
from ntspy.server.fleet import FleetStatus
from ntspy.server.stats import StatsTable
from tests.peers import LOOPBACK, MetricSamples, scrape_metrics


def scrape(collect: ServerCollector) -> MetricSamples:
    with MetricsServer(LOOPBACK, 0) as server:
        server.add_collector("server", collect)
        return scrape_metrics(server.port)


def names(got: MetricSamples) -> set[str]:
    return {name for name, _ in got}


def test_the_server_collector() -> None:
    table = StatsTable(workers=2, shared=True)
    a, b = table.row(0), table.row(1)
    a.add("ntp_received", 10)
    b.add("ntp_received", 5)
    b.add("ntp_denied", 2)
    a.add("nts_authenticated", 4)
    a.add("nts_cookies", 4)
    b.add("ke_accepted", 3)
    b.add("ke_completed", 2)
    b.add("ke_failed", 1)
    b.add("ke_cookies", 16)
    a.add("ke_dropped", 4)  # two by the rate limit, one by the client cap, one TLS set-up
    a.add("ke_drop_rate", 2)
    a.add("ke_drop_client", 1)
    a.add("ke_denied", 5)
    a.observe_handshake(0.004)
    b.observe_handshake(0.3)
    ring = KeyRing([MasterKey(1, bytes(32), 1000), MasterKey(2, bytes(32), 4600)])
    clients = ClientLogTable(2, shared=True)
    clients.log(1).nke("192.0.2.1", 1, dropped=False)
    collect = ServerCollector(table, lambda: ring, lambda: 5000.0, clients)
    with MetricsServer(LOOPBACK, 0) as server:
        server.add_collector("server", collect)
        got = scrape_metrics(server.port)

    def v(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    assert v("ntspy_server_ntp_packets_total", outcome="received") == 15
    assert v("ntspy_server_ntp_packets_total", outcome="denied") == 2
    assert v("ntspy_server_nts_responses_total") == 4
    assert v("ntspy_server_ke_connections_total", outcome="accepted") == 3
    assert v("ntspy_server_ke_connections_total", outcome="completed") == 2
    assert v("ntspy_server_ke_connections_total", outcome="failed") == 1
    assert v("ntspy_server_ke_dropped_total", reason="rate") == 2
    assert v("ntspy_server_ke_dropped_total", reason="client") == 1
    assert v("ntspy_server_ke_dropped_total", reason="full") == 0
    assert v("ntspy_server_ke_dropped_total", reason="tls") == 1
    assert v("ntspy_server_ke_dropped_total", reason="denied") == 5
    assert v("ntspy_server_cookies_issued_total", via="ke") == 16
    assert v("ntspy_server_cookies_issued_total", via="ntp") == 4
    assert v("ntspy_server_ke_handshake_duration_seconds_count") == 2
    assert v("ntspy_server_ke_handshake_duration_seconds_sum") == pytest.approx(0.304)
    assert v("ntspy_server_ke_handshake_duration_seconds_bucket", le="0.005") == 1
    assert v("ntspy_server_ke_handshake_duration_seconds_bucket", le="0.5") == 2
    assert v("ntspy_server_ke_handshake_duration_seconds_bucket", le="+Inf") == 2
    assert v("ntspy_server_key_age_seconds") == 400  # the newest key seals
    assert v("ntspy_server_oldest_key_age_seconds") == 4000
    assert v("ntspy_server_keys") == 2
    assert v("ntspy_server_clients") == 1

def test_a_scrape_reads_the_counters_at_that_moment() -> None:
    table = StatsTable()
    collect = ServerCollector(table, KeyRing, lambda: 0.0)
    assert scrape(collect)[("ntspy_server_nts_naks_total", ())] == 0
    table.row().add("nts_naks", 3)
    table.row().add("ntp_rate_kod", 2)
    got = scrape(collect)
    assert got[("ntspy_server_nts_naks_total", ())] == 3
    assert got[("ntspy_server_ntp_rate_kod_total", ())] == 2


def test_an_empty_ring_no_client_log_and_no_fleet_leave_their_metrics_out() -> None:
    got = scrape(ServerCollector(StatsTable(), KeyRing, lambda: 5000.0))
    assert got[("ntspy_server_keys", ())] == 0
    assert "ntspy_server_key_age_seconds" not in names(got)  # no key, no age
    assert not {n for n in names(got) if n.startswith(("ntspy_server_clients",
                                                       "ntspy_server_keystore"))}


def test_the_ring_is_asked_for_at_every_scrape() -> None:
    rings = [KeyRing([MasterKey(1, bytes(32), 1000)])]
    collect = ServerCollector(StatsTable(), lambda: rings[-1], lambda: 2000.0)
    assert scrape(collect)[("ntspy_server_key_age_seconds", ())] == 1000
    # A rotation or the fleet replaces the ring object: the next scrape sees the new one.
    rings.append(KeyRing([MasterKey(2, bytes(32), 1900), MasterKey(1, bytes(32), 1000)]))
    got = scrape(collect)
    assert got[("ntspy_server_key_age_seconds", ())] == 100
    assert got[("ntspy_server_oldest_key_age_seconds", ())] == 1000
    assert got[("ntspy_server_keys", ())] == 2


def test_a_key_from_the_future_is_age_zero_not_negative() -> None:
    ring = KeyRing([MasterKey(1, bytes(32), 9000)])  # created by a member whose clock is ahead
    got = scrape(ServerCollector(StatsTable(), lambda: ring, lambda: 5000.0))
    assert got[("ntspy_server_key_age_seconds", ())] == 0


def test_the_fleets_status() -> None:
    status = FleetStatus(connected=True, leader=False, serial=42, errors=3, members=2)
    got = scrape(ServerCollector(StatsTable(), KeyRing, lambda: 0.0, fleet=lambda: status))
    assert got[("ntspy_server_keystore_connected", ())] == 1
    assert got[("ntspy_server_keystore_leader", ())] == 0
    assert got[("ntspy_server_keystore_serial", ())] == 42
    assert got[("ntspy_server_keystore_errors_total", ())] == 3
    # Configured but not running yet (the callable answers None): no keystore metrics.
    got = scrape(ServerCollector(StatsTable(), KeyRing, lambda: 0.0, fleet=lambda: None))
    assert not {n for n in names(got) if n.startswith("ntspy_server_keystore")}


def test_tls_drops_are_what_the_limits_do_not_explain_and_never_negative() -> None:
    table = StatsTable()
    table.row().add("ke_drop_full", 2)  # a limit counted before the total moved
    got = scrape(ServerCollector(table, KeyRing, lambda: 0.0))
    assert got[("ntspy_server_ke_dropped_total", (("reason", "tls"),))] == 0
    assert got[("ntspy_server_ke_dropped_total", (("reason", "full"),))] == 2


def test_the_client_log_gauges_count_addresses_of_every_worker() -> None:
    clients = ClientLogTable(2, 256 * 10, shared=True)
    clients.log(0).nke("192.0.2.1", 1, dropped=False)
    clients.log(1).nke("192.0.2.2", 1, dropped=False)
    clients.log(1).nke("192.0.2.1", 2, dropped=True)  # one address, two workers: one row
    got = scrape(ServerCollector(StatsTable(), KeyRing, lambda: 0.0, clients))
    assert got[("ntspy_server_clients", ())] == 2
    assert got[("ntspy_server_clients_capacity", ())] == clients.capacity
