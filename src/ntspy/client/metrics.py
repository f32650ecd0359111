"""The client daemon's Prometheus metrics (``metricsaddress``, see ntspy.metrics).

A scrape runs on the metrics server's HTTP thread; the daemon's state belongs
to its event loop.  So the collector asks the loop for a snapshot of the same
views ``ntspy ctl`` shows (one callback, no I/O, bounded by a timeout) and
builds the families from that copy: the loop never waits for a scrape.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..metrics import counter, gauge, per_row_gauges

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from .daemon import ClientDaemon

SNAPSHOT_TIMEOUT = 2.0  # seconds a scrape waits for the event loop
_STATES = {"*": "selected", "+": "combined", "-": "not_combined", "x": "falseticker",
           "~": "jittery", "?": "unusable"}


def snapshot(client: ClientDaemon) -> dict[str, Any]:
    """Everything a scrape needs, copied (runs on the event loop)."""
    selection = client.selection
    rows = []
    # sources_view() and authdata_view() list the sources in client.sources' order.
    for src, s, a in zip(client.sources, client.sources_view(), client.authdata_view(),
                         strict=True):
        rows.append({
            "source": s["name"],
            "offset_seconds": s["adjusted_offset"] if s["reach"] else math.nan,
            "delay_seconds": src.last.delay if src.last is not None else math.nan,
            "jitter_seconds": src.stats.std_dev if src.stats.np else math.nan,
            "reach": s["reach"], "stratum": s["stratum"], "poll_log2_seconds": s["poll"],
            "state": s["state"], "nts": s["nts"],
            "nts_cookies": a["cookies"], "nts_key_exchanges": a["key_id"],
            "nts_last_key_exchange_age_seconds": a["last"], "nts_naks": a["naks"],
            "requests": int(src.session.stats["requests"]),
            "bad_samples": sum(src.sync.rejected.values()),
        })
    t = client.tracking()
    return {
        "rows": rows,
        "synchronised": bool(selection and selection.synchronised),
        # chronyc's signs: positive offset = the clock is ahead
        "offset": -t.last_offset, "frequency_ppm": -t.frequency_ppm, "skew_ppm": t.skew_ppm,
        "root_distance": t.root_delay / 2 + t.root_dispersion, "stratum": t.stratum,
        "updates": client.clock_updates, "loop_errors": client.loop_errors,
    }


def client_collector(client: ClientDaemon, loop: asyncio.AbstractEventLoop) -> Any:
    """A collector for :meth:`ntspy.metrics.MetricsServer.add_collector`."""

    def collect() -> Iterable[Metric]:
        done: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def take() -> None:
            try:
                done.set_result(snapshot(client))
            except Exception as exc:  # reported by the metrics server, once
                done.set_exception(exc)

        loop.call_soon_threadsafe(take)
        return families(done.result(SNAPSHOT_TIMEOUT))

    return collect


def families(snap: dict[str, Any]) -> list[Any]:
    rows = snap["rows"]
    out: list[Any] = [
        gauge("ntspy_client_synchronised", "1 when the clock is synchronised to a source",
              int(snap["synchronised"])),
        gauge("ntspy_client_offset_seconds",
              "Offset of the system clock at the last update (positive: ahead)", snap["offset"]),
        gauge("ntspy_client_frequency_ppm",
              "Frequency error of the system clock being corrected (positive: fast)",
              snap["frequency_ppm"]),
        gauge("ntspy_client_skew_ppm", "Error bound of the frequency", snap["skew_ppm"]),
        gauge("ntspy_client_root_distance_seconds",
              "Root delay / 2 + root dispersion of the system clock", snap["root_distance"]),
        gauge("ntspy_client_stratum", "Stratum of the system clock", snap["stratum"]),
        counter("ntspy_client_clock_updates_total", "Clock updates made", snap["updates"]),
        counter("ntspy_client_loop_errors_total",
                "Poll rounds that raised (bugs; each is logged)", snap["loop_errors"]),
    ]
    out += per_row_gauges("ntspy_source", rows, "source", {
        "offset_seconds": "Offset of the source's estimate (positive: local clock ahead)",
        "delay_seconds": "Round-trip delay of the last sample",
        "jitter_seconds": "Standard deviation of the source's samples",
        "reach": "Reachability register (8 bits, 255: the last 8 polls answered)",
        "stratum": "Stratum of the source", "poll_log2_seconds": "Poll interval, log2 seconds",
        "nts_cookies": "NTS cookies held",
        "nts_last_key_exchange_age_seconds": "Seconds since the last NTS-KE",
    })
    out.append(gauge("ntspy_source_state", "Selection state of the source (1 for its state)",
                     {(r["source"], _STATES.get(str(r["state"]), "unusable")): 1 for r in rows},
                     labels=("source", "state")))
    for name, key, doc in (
        ("ntspy_source_nts_key_exchanges", "nts_key_exchanges", "NTS-KE sessions done"),
        ("ntspy_source_nts_naks", "nts_naks", "NTS NAKs received"),
        ("ntspy_source_requests", "requests", "NTP requests sent"),
        ("ntspy_source_bad_samples", "bad_samples", "Answers rejected by the sanity checks"),
    ):
        out.append(counter(name, doc, {(r["source"],): r[key] for r in rows},
                           labels=("source",)))
    return out
