"""``ntspy demo``: a whole NTS deployment on loopback, offline, in a few seconds.

It makes a throwaway CA and server certificate, starts an ntspy NTS server on
ephemeral loopback ports, has a client do NTS-KE with it (trusting only the
throwaway CA) and take authenticated samples, prints what chronyc users would
look at, and shuts everything down. It never touches the system clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from .certs import CertPaths, make_test_pki
from .client.session import Measurement, NtsSession
from .config import parse_config
from .control.format import (
    AUTHDATA_HEADER,
    SOURCES_HEADER,
    AuthRow,
    SourceRow,
    auth_line,
    header,
    source_line,
)
from .errors import NtsError
from .net.tls.trust import TrustConfig
from .proto.aead import info
from .server.daemon import ServerDaemon, Sockets, open_tcp_socket, open_udp_socket
from .server.stats import format_serverstats

HOST = "127.0.0.1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=8, help="samples to take (default 8)")
    parser.add_argument(
        "--interval", type=float, default=0.25, help="seconds between samples (default 0.25)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_demo(max(1, args.samples), max(0.0, args.interval)))
    except NtsError as exc:
        print(f"ntspy demo: {exc}", file=sys.stderr)
        return 1


def _say(text: str = "") -> None:
    print(text, flush=True)


@contextlib.asynccontextmanager
async def loopback_server(pki: CertPaths, keydir: Path) -> AsyncIterator[ServerDaemon]:
    """An ntspy NTS server on ephemeral loopback ports, in this process and event loop.

    The demo runs one; tests use it too.
    """
    config = parse_config(
        "\n".join([
            f"bindaddress {HOST}",
            f"allow {HOST}",
            "local stratum 2",
            f"ntsservercert {pki.server_cert}",
            f"ntsserverkey {pki.server_key}",
            f"ntsdumpdir {keydir}",
        ]),
        "<loopback server>",
    )
    sockets = Sockets([open_udp_socket(HOST, 0)], [open_tcp_socket(HOST, 0)])
    server = ServerDaemon(config, sockets)
    try:
        await server.start()
        yield server
    finally:
        await server.stop()
        sockets.close()


async def _demo(samples: int, interval: float) -> int:
    with tempfile.TemporaryDirectory(prefix="ntspy-demo-") as tmp:
        work = Path(tmp)
        pki = make_test_pki(work, hostnames=("localhost",), ips=(HOST,))
        async with loopback_server(pki, work / "keys") as server:
            return await _client(server, pki.ca_cert, samples, interval)


async def _client(server: ServerDaemon, ca: Path, samples: int, interval: float) -> int:
    _say("ntspy demo: an NTS server and client on loopback, with a throwaway certificate")
    _say(f"  server: NTS-KE on {HOST}:{server.ke_port} (TLS 1.3), NTP on {HOST}:{server.ntp_port},"
         " local stratum 2")
    trust = TrustConfig(use_system_store=False, extra=[ca])
    session = NtsSession(HOST, server.ke_port, trust=trust, server_name="localhost")
    last_rx = time.monotonic()
    with session:
        result = await session.key_exchange()
        ke_done = time.monotonic()
        _say(f"  NTS-KE: {result.tls_version}, certificate {result.cert_subject} "
             f"(trusted via the throwaway CA), AEAD {result.aead_name} ({result.aead_id}), "
             f"{len(result.cookies)} cookies of {len(result.cookies[0])} bytes, "
             f"NTP server {result.ntp_server} port {result.ntp_port}")
        _say()
        _say("  sample      offset       delay  stratum  authenticated  cookies")
        taken: list[Measurement] = []
        reach = 0
        for i in range(samples):
            if i:
                await asyncio.sleep(interval)
            try:
                m = await session.measure()
            except NtsError as exc:
                reach = (reach << 1) & 0xFF
                _say(f"  {i + 1:6d}  lost: {exc}")
                continue
            reach = ((reach << 1) | 1) & 0xFF
            last_rx = time.monotonic()
            taken.append(m)
            _say(f"  {i + 1:6d}  {m.offset:+.6f}s  {m.delay:.6f}s  {m.stratum:7d}  "
                 f"{'yes' if m.authenticated else 'NO':>13}  {len(session.cookies):7d}")
        _say()
        key_bits = info(result.aead_id).key_length * 8
        _say(header(AUTHDATA_HEADER) + auth_line(AuthRow(
            HOST, "NTS", int(session.stats["key exchanges"]), result.aead_id, key_bits,
            time.monotonic() - ke_done, 0, int(session.stats["naks"]), len(session.cookies),
            len(session.cookies[0]) if session.cookies else 0,
        )))
        _say()
        if taken:
            best = min(taken, key=lambda m: m.delay)
            last = taken[-1]
            error = best.delay / 2 + best.root_delay / 2 + best.root_dispersion
            _say(header(SOURCES_HEADER) + source_line(SourceRow(
                HOST, "^", "*", last.stratum, -2, reach,
                time.monotonic() - last_rx,
                # chronyc's sign: positive when the local clock is ahead.
                -last.offset, -last.offset, error,
            )))
            _say()
        server.refresh_counters()
        counters = server.stats_table.totals()
        _say("  server counters (like chronyc serverstats):")
        for line in format_serverstats(counters).splitlines():
            if line.startswith(("NTP packets received", "NTP packets dropped", "Authenticated",
                                "NTS NAKs", "NTS-KE connections accepted",
                                "NTP kernel RX")):
                _say(f"    {line}")
        _say()
        authenticated = sum(1 for m in taken if m.authenticated)
        if authenticated != samples or not taken:
            _say(f"  FAILED: {authenticated} of {samples} samples authenticated")
            return 1
        offset = sum(m.offset for m in taken) / len(taken)
        _say(f"  all {samples} samples authenticated; "
             f"median delay {sorted(m.delay for m in taken)[len(taken) // 2] * 1e6:.0f} us")
        # chronyd -Q's wording: the correction the local clock would need.
        _say(f"  System clock wrong by {offset:.6f} seconds (not corrected: "
             "the demo never touches the clock)")
    return 0
