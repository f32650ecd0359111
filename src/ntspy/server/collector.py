"""The server's Prometheus metrics, read from its counters at scrape time.

Everything here reads what the server keeps anyway (the shared counter
table, the key ring, the client log's shared slots), so a scrape costs the
serving processes nothing.  docs/monitoring.md lists the metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import Metric

from ..metrics import counter, gauge, histogram
from ..proto.cookies import KeyRing
from .clientlog import ClientLogTable
from .stats import StatsTable

NTP_OUTCOMES = {
    "received": "ntp_received",
    "dropped": "ntp_dropped",
    "malformed": "ntp_malformed",
    "denied": "ntp_denied",
}
KE_OUTCOMES = {
    "accepted": "ke_accepted",
    "completed": "ke_completed",
    "error": "ke_errors",
    "failed": "ke_failed",
}
KE_DROP_REASONS = {"full": "ke_drop_full", "client": "ke_drop_client", "rate": "ke_drop_rate"}
TIMESTAMPS = {
    ("daemon", "rx"): "daemon_rx",
    ("daemon", "tx"): "daemon_tx",
    ("kernel", "rx"): "kernel_rx",
}


@dataclass(slots=True)
class ServerCollector:
    """``collect()`` for :meth:`ntspy.metrics.MetricsServer.add_collector`.

    ``keyring`` is asked for the ring at every scrape (it may be replaced);
    ``now_s`` gives Unix seconds (the key ages).
    """

    stats: StatsTable
    keyring: Callable[[], KeyRing]
    now_s: Callable[[], float]
    clients: ClientLogTable | None = None
    fleet: Callable[[], Any] | None = None
    """``ntskeystore``: the fleet's status (:class:`~ntspy.server.fleet.FleetStatus`) or None."""

    def __call__(self) -> list[Metric]:
        t = self.stats.totals()
        out: list[Metric] = [
            counter("ntspy_server_ntp_packets", "NTP packets by what became of them "
                    "(received: answered, RATE kisses and NTS NAKs included)",
                    {(k,): t[v] for k, v in NTP_OUTCOMES.items()}, ["outcome"]),
            counter("ntspy_server_ntp_rate_kod", "RATE kiss-o'-death responses sent",
                    t["ntp_rate_kod"]),
            counter("ntspy_server_nts_responses", "Authenticated NTS responses sent",
                    t["nts_authenticated"]),
            counter("ntspy_server_nts_naks", "NTS NAKs sent", t["nts_naks"]),
            counter("ntspy_server_nts_auth_failures",
                    "NTS requests that did not authenticate (unusable cookie or bad MAC)",
                    t["nts_auth_failures"]),
            counter("ntspy_server_ke_connections", "NTS-KE connections: accepted, and how "
                    "the accepted ones ended", {(k,): t[v] for k, v in KE_OUTCOMES.items()},
                    ["outcome"]),
            counter("ntspy_server_ke_dropped", "NTS-KE connections refused at accept, by "
                    "reason", _ke_drops(t), ["reason"]),
            counter("ntspy_server_ke_timeouts", "NTS-KE sessions ended by the session timeout",
                    t["ke_timeouts"]),
            counter("ntspy_server_cookies_issued", "NTS cookies issued, in NTS-KE answers "
                    "and in NTS responses", {("ke",): t["ke_cookies"],
                                             ("ntp",): t["nts_cookies"]}, ["via"]),
            counter("ntspy_server_timestamps", "Receive and transmit timestamps by source "
                    "(kernel or daemon)", {k: t[v] for k, v in TIMESTAMPS.items()},
                    ["source", "direction"]),
        ]
        h = self.stats.handshake_histogram()
        out.append(histogram("ntspy_server_ke_handshake_duration_seconds",
                             "NTS-KE sessions answered with cookies: seconds from accept to "
                             "the answer", h.cumulative(), h.sum))
        keys = self.keyring().keys  # newest first
        if keys:
            now = self.now_s()
            out.append(gauge("ntspy_server_key_age_seconds",
                             "Age of the master key new cookies are sealed with",
                             max(0.0, now - keys[0].created)))
            out.append(gauge("ntspy_server_oldest_key_age_seconds",
                             "Age of the oldest master key still accepted",
                             max(0.0, now - keys[-1].created)))
        out.append(gauge("ntspy_server_keys", "Master keys in the ring", len(keys)))
        status = self.fleet() if self.fleet is not None else None
        if status is not None:
            out.append(gauge("ntspy_server_keystore_connected",
                             "1 while the fleet's key store (ntskeystore) answers",
                             int(status.connected)))
            out.append(gauge("ntspy_server_keystore_leader",
                             "1 while this server holds the lease to rotate the fleet's keys",
                             int(status.leader)))
            out.append(gauge("ntspy_server_keystore_serial",
                             "Serial of the fleet's key ring this server holds", status.serial))
            out.append(counter("ntspy_server_keystore_errors",
                               "Looks at the key store that failed", status.errors))
        if self.clients is not None:
            out.append(gauge("ntspy_server_clients", "Client addresses in the client log",
                             len(self.clients.records())))
            out.append(gauge("ntspy_server_clients_capacity",
                             "Client addresses the client log holds at most per process",
                             self.clients.capacity))
        return out


def _ke_drops(t: dict[str, int]) -> dict[tuple[str, ...], int]:
    drops: dict[tuple[str, ...], int] = {(k,): t[v] for k, v in KE_DROP_REASONS.items()}
    drops[("denied",)] = t["ke_denied"]
    # ke_dropped counts every refusal by a limit, and TLS set-up failures alone
    drops[("tls",)] = max(0, t["ke_dropped"] - sum(t[v] for v in KE_DROP_REASONS.values()))
    return drops
