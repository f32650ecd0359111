"""``metricsaddress`` on ``ntspy run``: the client's metrics scraped over HTTP (parsed
with prometheus_client's own parser) show the source syncing, its cookies and its one
NTS-KE, and move with the polls; the values are the ones ``ntspy ctl`` shows."""

from __future__ import annotations

from pathlib import Path

from tests.daemon_helpers import ClientProc, server_line, wait_until
from tests.peers import LOOPBACK, MetricSamples, ServerProc, free_port, scrape_metrics


def one(samples: MetricSamples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_client_metrics_before_and_after_sync(tmp_path: Path, ntspy_server: ServerProc) -> None:
    port = free_port("tcp")
    srv = ntspy_server
    client = ClientProc(tmp_path / "client", [
        server_line(LOOPBACK, srv.ntp_port, srv.ke_port),
        f"ntstrustedcerts {srv.certs.ca_cert}",
    ], [f"metricsaddress {LOOPBACK} {port}"])
    client.start()
    try:
        first = scrape_metrics(port)
        assert ("ntspy_client_synchronised", ()) in first
        wait_until(lambda: one(scrape_metrics(port), "ntspy_client_synchronised") == 1, 20.0,
                   "synchronised in the metrics")
        before = scrape_metrics(port)
        wait_until(lambda: one(scrape_metrics(port), "ntspy_source_requests_total", source=LOOPBACK)
                   >= one(before, "ntspy_source_requests_total", source=LOOPBACK) + 3, 10.0,
                   "more requests counted")
        after = scrape_metrics(port)
        assert one(after, "ntspy_source_state", source=LOOPBACK, state="selected") == 1
        assert one(after, "ntspy_source_reach", source=LOOPBACK) > 0
        assert one(after, "ntspy_source_nts_cookies", source=LOOPBACK) > 0
        assert one(after, "ntspy_source_nts_key_exchanges_total", source=LOOPBACK) == 1
        assert one(after, "ntspy_source_nts_naks_total", source=LOOPBACK) == 0
        assert one(after, "ntspy_client_stratum") == 2
        assert one(after, "ntspy_client_clock_updates_total") > \
            one(before, "ntspy_client_clock_updates_total")
        auth = client.query("authdata")[0]
        assert one(after, "ntspy_source_nts_key_exchanges_total", source=LOOPBACK) == \
            auth["key_id"]
        assert abs(one(after, "ntspy_client_skew_ppm")) < 1e6
    finally:
        client.stop()
