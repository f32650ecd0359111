"""``metricsaddress`` on a real ``ntspy serve`` with two worker processes: the
counters scraped over HTTP move by exactly the NTS-KE and NTP traffic done,
and the control socket's ``clients`` view shows the client with its counts."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from ntspy.client.session import NtsSession
from ntspy.control.protocol import request
from ntspy.net.tls.trust import TrustConfig
from tests.peers import (
    LOOPBACK,
    MetricSamples,
    free_port,
    ntp_client_packet,
    prepare_ntspy_server,
    run_ntspy_serve_once,
    scrape_metrics,
    start_ntspy_server,
)

NTS_REQUESTS = 5
PLAIN_REQUESTS = 3


def moved(before: MetricSamples, after: MetricSamples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after[key] - before.get(key, 0.0)


def plain_exchange(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(ntp_client_packet(), (LOOPBACK, port))
        assert len(s.recv(1024)) == 48


async def clients_until(path: Path, want: dict[str, Any], timeout: float = 5.0
                        ) -> dict[str, Any]:
    """The ``clients`` row of 127.0.0.1 once it shows ``want`` (a worker publishes its
    NTP hits once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await request(path, "clients", timeout=3.0)
        row = next((r for r in rows if r["address"] == LOOPBACK), {})
        if all(row.get(k) == v for k, v in want.items()) or time.monotonic() > deadline:
            return row
        await asyncio.sleep(0.2)


async def test_metrics_follow_real_traffic_across_workers(tmp_path: Path) -> None:
    port = free_port("tcp")
    server = start_ntspy_server(tmp_path, [f"metricsaddress {LOOPBACK} {port}"], ntsprocesses=2)
    try:
        before = scrape_metrics(port)
        assert before[("ntspy_server_keys", ())] >= 1
        trust = TrustConfig(use_system_store=False, extra=[server.certs.ca_cert])
        with NtsSession("localhost", server.ke_port, trust=trust, timeout=3.0) as session:
            for _ in range(NTS_REQUESTS):
                assert (await session.measure()).authenticated
            ntp_cookies = session.stats["cookies received"]
        for _ in range(PLAIN_REQUESTS):
            plain_exchange(server.ntp_port)
        after = scrape_metrics(port)

        def d(name: str, **labels: str) -> float:
            return moved(before, after, name, **labels)

        assert d("ntspy_server_ke_connections_total", outcome="accepted") == 1
        assert d("ntspy_server_ke_connections_total", outcome="completed") == 1
        assert d("ntspy_server_ke_connections_total", outcome="failed") == 0
        assert d("ntspy_server_ke_connections_total", outcome="error") == 0
        assert d("ntspy_server_nts_responses_total") == NTS_REQUESTS
        assert d("ntspy_server_nts_naks_total") == 0
        assert d("ntspy_server_ntp_packets_total", outcome="received") == (
            NTS_REQUESTS + PLAIN_REQUESTS)
        assert d("ntspy_server_cookies_issued_total", via="ke") == 8
        assert d("ntspy_server_cookies_issued_total", via="ntp") == ntp_cookies >= NTS_REQUESTS
        assert d("ntspy_server_ke_handshake_duration_seconds_count") == 1
        assert d("ntspy_server_ke_handshake_duration_seconds_bucket", le="+Inf") == 1
        assert 0 < d("ntspy_server_ke_handshake_duration_seconds_sum") < 2.0
        for reason in ("full", "client", "rate", "denied", "tls"):
            assert d("ntspy_server_ke_dropped_total", reason=reason) == 0
        assert 0 <= after[("ntspy_server_key_age_seconds", ())] < 60

        row = await clients_until(server.control, {
            "ntp_hits": NTS_REQUESTS + PLAIN_REQUESTS, "nke_hits": 1})
        assert row["ntp_hits"] == NTS_REQUESTS + PLAIN_REQUESTS, row
        assert row["ntp_drops"] == 0
        assert row["nke_hits"] == 1
        assert row["nke_drops"] == 0
        assert 0 <= row["last_ntp_ago"] < 10
        assert 0 <= row["last_nke_ago"] < 10
        assert scrape_metrics(port)[("ntspy_server_clients", ())] == 1
    finally:
        server.stop()
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_metrics_port_in_use_stops_the_start(tmp_path: Path, workers: int) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = prepare_ntspy_server(tmp_path, [f"metricsaddress {LOOPBACK} {port}"],
                                      ntsprocesses=workers)
        result = run_ntspy_serve_once(server.config_path, timeout=20)
    assert result.returncode == 1
    assert (f"ntspy: cannot start the server: metrics HTTP port {port} on {LOOPBACK} "
            "is already in use") in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
