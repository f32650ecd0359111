"""The Prometheus endpoint (``metricsaddress ADDRESS PORT``).

A small HTTP server in a thread of its own answers ``GET /metrics`` with the
Prometheus text format (OpenMetrics when the scraper asks for it).  Nothing
is counted per packet here: the daemons keep their counters as they always
do, and each scrape calls the *collectors* registered with
:meth:`MetricsServer.add_collector`, plain functions that read those
counters and return metric families.  The helpers below build the families
from plain numbers and dicts, so a collector needs no prometheus_client
knowledge::

    server = MetricsServer("127.0.0.1", 9123)
    server.add_collector("client", lambda: [
        gauge("ntspy_client_synchronised", "1 when the clock is synchronised", 1),
        *per_row_gauges("ntspy_source", rows, "source", {"offset_seconds": "Offset"}),
    ])
    server.start()   # raises MetricsBindError, one line, when it cannot listen
    ...
    server.stop()

A collector runs on the HTTP thread: it must only read (numbers, shared
memory, attributes replaced whole), never block.  One that raises is logged
once and skipped (counted in ``ntspy_metrics_collector_errors_total``); the
scrape still answers with everything else.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from socketserver import TCPServer, ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

log = logging.getLogger("ntspy.metrics")

MetricsCollect = Callable[[], Iterable[Metric]]
"""What :meth:`MetricsServer.add_collector` takes: called once per scrape."""

REQUEST_TIMEOUT = 10.0
"""Seconds a scraper's connection may stay silent before it is closed."""

MAX_CONNECTIONS = 16
"""Connections served at once; more are closed at once (each holds a thread)."""

PATHS = frozenset({"/metrics", "/"})

Samples = float | int | Mapping[tuple[str, ...], float | int]
"""One value, or values by label values (in the order of ``labels``)."""


class MetricsBindError(OSError):
    """The metrics endpoint could not listen; the message says where and why."""

    def __str__(self) -> str:
        return str(self.strerror)


# -- families from plain values ------------------------------------------------


def _items(samples: Samples, labels: Sequence[str]) -> Iterator[tuple[list[str], float]]:
    if isinstance(samples, Mapping):
        for values, value in samples.items():
            if len(values) != len(labels):
                raise ValueError(f"labels {values!r} do not match {list(labels)!r}")
            yield list(values), float(value)
    else:
        if labels:
            raise ValueError("a single value takes no labels")
        yield [], float(samples)


def counter(name: str, documentation: str, samples: Samples,
            labels: Sequence[str] = ()) -> CounterMetricFamily:
    """A counter family; ``name`` without ``_total`` or with it (the exposition adds it)."""
    family = CounterMetricFamily(name.removesuffix("_total"), documentation, labels=labels)
    for values, value in _items(samples, labels):
        family.add_metric(values, value)
    return family


def gauge(name: str, documentation: str, samples: Samples,
          labels: Sequence[str] = ()) -> GaugeMetricFamily:
    """A gauge family; a NaN value is left out (Prometheus reads no sample as unknown)."""
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for values, value in _items(samples, labels):
        if not math.isnan(value):
            family.add_metric(values, value)
    return family


def histogram(name: str, documentation: str, buckets: Sequence[tuple[float, int]],
              sum_value: float) -> HistogramMetricFamily:
    """A histogram from cumulative ``(upper bound, count)`` pairs, ``inf`` last."""
    family = HistogramMetricFamily(name, documentation)
    family.add_metric([], [(_bound(le), float(n)) for le, n in buckets], sum_value)
    return family


def _bound(le: float) -> str:
    return "+Inf" if math.isinf(le) else repr(float(le))


def per_row_gauges(prefix: str, rows: Iterable[Mapping[str, Any]], label: str,
                   fields: Mapping[str, str]) -> list[GaugeMetricFamily]:
    """One gauge ``{prefix}_{field}`` per entry of ``fields`` (field -> help text),
    one sample per row, labelled ``{label}=row[label]``.  A row without the
    field, or with a value that is not a number (None, text), adds no sample:
    e.g. per source ``offset_seconds``, ``stratum``, ``reach``."""
    families = {f: GaugeMetricFamily(f"{prefix}_{f}", doc, labels=[label])
                for f, doc in fields.items()}
    for row in rows:
        key = str(row.get(label, ""))
        for f, family in families.items():
            value = row.get(f)
            if isinstance(value, bool):
                value = int(value)
            if isinstance(value, int | float) and not math.isnan(value):
                family.add_metric([key], float(value))
    return list(families.values())


# -- the server ---------------------------------------------------------------


class _SafeCollector(Collector):
    """A registered function: its failure is logged once and costs only its families."""

    def __init__(self, name: str, collect: MetricsCollect, errors: dict[str, int]) -> None:
        self.name = name
        self._collect = collect
        self._errors = errors
        self._reported = False

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._collect())
        except Exception:
            self._errors[self.name] = self._errors.get(self.name, 0) + 1
            if not self._reported:
                self._reported = True
                log.exception("metrics collector %r failed (reported once)", self.name)
            else:
                log.debug("metrics collector %r failed again", self.name, exc_info=True)
            return []


class _Registry(CollectorRegistry):
    """The collectors in order, then the count of their failures (this scrape's included)."""

    def __init__(self, errors: dict[str, int]) -> None:
        super().__init__(auto_describe=False)
        self._failures = errors

    def collect(self) -> Iterator[Metric]:
        yield from super().collect()
        yield counter("ntspy_metrics_collector_errors", "Scrapes in which a collector failed",
                      {(name,): n for name, n in sorted(self._failures.items())}, ["collector"])


class _HttpServer(ThreadingMixIn, WSGIServer):
    """wsgiref's server, one thread per connection, at most MAX_CONNECTIONS of them."""

    daemon_threads = True  # a scraper hanging on to its connection never delays exit
    allow_reuse_address = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks socket.getfqdn() (maybe a slow DNS lookup): not needed.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # busy: the scraper will come back
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up, timed out or sent garbage: not worth a traceback on stderr.
        log.debug("metrics request from %s failed", client_address, exc_info=True)


class _HttpServer6(_HttpServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr; a silent client times out."""

    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics %s: " + format, self.address_string(), *args)


class MetricsServer:
    """``/metrics`` over HTTP on ``address``:``port`` (0: any free port, see :attr:`port`)."""

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.requested_port = port
        self._errors: dict[str, int] = {}
        self.registry = _Registry(self._errors)
        self._names: set[str] = set()
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        ref = weakref.ref(self)

        def forget() -> None:
            # A worker forked later must not hold our listening socket (nor try
            # to shut down a thread it does not have).
            server = ref()
            if server is not None and server._httpd is not None:
                server._httpd.socket.close()
                server._httpd = server._thread = None

        os.register_at_fork(after_in_child=forget)

    def add_collector(self, name: str, collect: MetricsCollect) -> None:
        """Call ``collect()`` at every scrape; ``name`` identifies it in the log and in
        ``ntspy_metrics_collector_errors_total``."""
        if name in self._names:
            raise ValueError(f"a collector named {name!r} is already registered")
        self._names.add(name)
        self.registry.register(_SafeCollector(name, collect, self._errors))

    @property
    def port(self) -> int:
        """The port listened on (the chosen one when 0 was asked for)."""
        if self._httpd is None:
            return self.requested_port
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        """Listen and serve in a daemon thread; :class:`MetricsBindError` if it cannot listen."""
        if self._httpd is not None:
            return
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
                start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
                return [b"only GET\n"]
            if environ.get("PATH_INFO") not in PATHS:
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"metrics are at /metrics\n"]
            result: Iterable[bytes] = metrics(environ, start_response)
            return result

        cls = _HttpServer6 if ":" in self.address else _HttpServer
        try:
            httpd = make_server(self.address, self.requested_port, app, cls, _QuietHandler)
        except OSError as exc:
            where = f"metrics HTTP port {self.requested_port} on {self.address}"
            if exc.errno == errno.EADDRINUSE:
                msg = f"{where} is already in use"
            elif exc.errno in (errno.EACCES, errno.EPERM) and 0 < self.requested_port < 1024:
                msg = f"cannot bind {where}: ports below 1024 need root or CAP_NET_BIND_SERVICE"
            else:
                msg = f"cannot bind {where}: {exc.strerror or exc}"
            raise MetricsBindError(exc.errno, msg) from None
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="ntspy-metrics",
                                        kwargs={"poll_interval": 0.5}, daemon=True)
        self._thread.start()
        log.info("serving metrics on http://%s/metrics",
                 f"[{self.address}]:{self.port}" if ":" in self.address
                 else f"{self.address}:{self.port}")

    def stop(self) -> None:
        """Stop listening (requests in progress finish on their own threads)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
