"""The Prometheus endpoint (ntspy/metrics.py): exposition parsed back with
prometheus_client's parser.  The server's collector: test_collector.py."""

from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ntspy.config import parse_config
from ntspy.errors import ConfigError
from ntspy.metrics import (
    MetricsBindError,
    MetricsServer,
    counter,
    gauge,
    histogram,
    per_row_gauges,
)

LOOPBACK = "127.0.0.1"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(server: MetricsServer, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{server.port}{path}", timeout=5) as r:
        assert r.status == 200
        return str(r.read().decode())


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    s = MetricsServer(LOOPBACK, 0)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_families_from_plain_values() -> None:
    c = counter("x_requests_total", "Requests", {("a",): 3, ("b",): 4}, ["kind"])
    assert c.name == "x_requests"
    assert [(s.name, s.labels, s.value) for s in c.samples] == [
        ("x_requests_total", {"kind": "a"}, 3.0), ("x_requests_total", {"kind": "b"}, 4.0)]
    g = gauge("x_temp", "T", float("nan"))
    assert g.samples == []  # unknown: no sample
    h = histogram("x_seconds", "S", [(0.1, 1), (1.0, 3), (float("inf"), 4)], 2.5)
    assert {s.name: s.value for s in h.samples if s.name != "x_seconds_bucket"} == {
        "x_seconds_count": 4.0, "x_seconds_sum": 2.5}
    with pytest.raises(ValueError):
        counter("x", "X", {("a", "b"): 1}, ["one"])
    with pytest.raises(ValueError):
        gauge("x", "X", 1, ["one"])


def test_per_row_gauges_skip_what_is_not_a_number() -> None:
    rows = [{"source": "a", "offset_seconds": 0.5, "stratum": 2, "selected": True},
            {"source": "b", "offset_seconds": None, "stratum": "?"}]
    fams = {f.name: f for f in per_row_gauges(
        "ntspy_source", rows, "source",
        {"offset_seconds": "Offset", "stratum": "Stratum", "selected": "Selected"})}
    assert [(s.labels, s.value) for s in fams["ntspy_source_offset_seconds"].samples] == [
        ({"source": "a"}, 0.5)]
    assert [s.value for s in fams["ntspy_source_selected"].samples] == [1.0]
    assert len(fams["ntspy_source_stratum"].samples) == 1


def test_scrape_calls_the_collectors_each_time(server: MetricsServer) -> None:
    calls = []

    def collect() -> list[object]:
        calls.append(1)
        return [gauge("ntspy_test_value", "A value", len(calls))]

    server.add_collector("test", collect)  # type: ignore[arg-type]
    assert samples(scrape(server))[("ntspy_test_value", ())] == 1
    assert samples(scrape(server))[("ntspy_test_value", ())] == 2
    with pytest.raises(ValueError):
        server.add_collector("test", collect)  # type: ignore[arg-type]


def test_openmetrics_when_asked(server: MetricsServer) -> None:
    server.add_collector("t", lambda: [counter("ntspy_test_events", "Events", 7)])
    req = urllib.request.Request(f"http://{LOOPBACK}:{server.port}/metrics",
                                 headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        text = r.read().decode()
    assert "ntspy_test_events_total 7.0" in text
    assert text.endswith("# EOF\n")


def test_a_failing_collector_is_logged_once_and_the_rest_still_answers(
        server: MetricsServer, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> list[object]:
        raise RuntimeError("boom")

    server.add_collector("broken", broken)  # type: ignore[arg-type]
    server.add_collector("fine", lambda: [gauge("ntspy_test_ok", "OK", 1)])
    with caplog.at_level(logging.INFO, logger="ntspy.metrics"):
        for _ in range(3):
            got = samples(scrape(server))
            assert got[("ntspy_test_ok", ())] == 1
    assert got[("ntspy_metrics_collector_errors_total", (("collector", "broken"),))] == 3
    reports = [r for r in caplog.records if "broken" in r.getMessage()
               and r.levelno >= logging.ERROR]
    assert len(reports) == 1


def test_garbage_and_other_paths_do_not_hurt(server: MetricsServer) -> None:
    server.add_collector("t", lambda: [gauge("ntspy_test_ok", "OK", 1)])
    for junk in (b"\x00\xff" * 3000 + b"\r\n\r\n", b"GET\r\n\r\n", b"NONSENSE / HTTP/9.9\r\n\r\n",
                 b"GET /metrics HTTP/1.1\r\nHost: " + b"x" * 70000 + b"\r\n\r\n", b""):
        with socket.create_connection((LOOPBACK, server.port), timeout=5) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
    with pytest.raises(urllib.error.HTTPError) as err:
        scrape(server, "/elsewhere")
    assert err.value.code == 404
    req = urllib.request.Request(f"http://{LOOPBACK}:{server.port}/metrics", data=b"x",
                                 method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 405
    assert samples(scrape(server))[("ntspy_test_ok", ())] == 1  # still serving


def test_a_port_in_use_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsBindError) as err:
            MetricsServer(LOOPBACK, port).start()
    assert str(err.value) == f"metrics HTTP port {port} on {LOOPBACK} is already in use"
    with pytest.raises(MetricsBindError, match="cannot bind metrics HTTP port"):
        MetricsServer("192.0.2.1", 0).start()  # not an address of this host


def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.fail("the tests need IPv6 loopback")
    with MetricsServer("::1", 0) as s:
        s.add_collector("t", lambda: [gauge("ntspy_test_ok", "OK", 1)])
        with urllib.request.urlopen(f"http://[::1]:{s.port}/metrics", timeout=5) as r:
            assert b"ntspy_test_ok 1.0" in r.read()


def test_the_directive() -> None:
    assert parse_config("").metricsaddress is None
    assert parse_config("metricsaddress 127.0.0.1 9123\n").metricsaddress == ("127.0.0.1", 9123)
    assert parse_config("metricsaddress ::1 9123\n").metricsaddress == ("::1", 9123)
    for bad in ("metricsaddress localhost 9123", "metricsaddress 127.0.0.1 0",
                "metricsaddress 127.0.0.1", "metricsaddress 127.0.0.1 70000"):
        with pytest.raises(ConfigError):
            parse_config(bad + "\n")
    config = parse_config("clientloglimit 1000\nnoclientlog\n")
    assert (config.clientloglimit, config.noclientlog) == (1000, True)
    assert not [d for _, _, d in config.ignored if d in ("clientloglimit", "noclientlog")]
    with pytest.raises(ConfigError):
        parse_config("clientloglimit lots\n")
