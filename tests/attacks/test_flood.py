"""A bounded flood at well over what the server can answer.

The server must keep answering a share of a good NTS client's requests during
the flood, keep its memory bounded, and answer every request again as soon as
the flood ends. The flood is plain NTP from two processes on loopback, bounded
in time and count.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import time
from pathlib import Path

from ntspy.client.session import NtsSession
from ntspy.errors import NtsError
from ntspy.net.tls.trust import TrustConfig
from ntspy.proto.ntp import Mode, NtpHeader
from tests.peers import ServerProc

FLOOD_SECONDS = 4.0
FLOOD_MAX_PACKETS = 3_000_000
FLOOD_PROCESSES = 2
RSS_GROWTH_LIMIT = 20 * 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def flood(port: int, seconds: float, max_packets: int, sent: multiprocessing.Value) -> None:  # type: ignore[type-arg]
    """Send prebuilt client requests as fast as one process can, never reading."""
    packets = [NtpHeader(mode=Mode.CLIENT, transmit_ts=i).pack() for i in range(1, 257)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    count = 0
    deadline = time.monotonic() + seconds
    while count < max_packets and time.monotonic() < deadline:
        for pkt in packets:
            try:
                sock.send(pkt)
                count += 1
            except (BlockingIOError, ConnectionRefusedError):
                pass
    sock.close()
    with sent.get_lock():
        sent.value += count


async def measure_many(session: NtsSession, n: int, spacing: float) -> int:
    ok = 0
    for _ in range(n):
        try:
            m = await session.measure()
            ok += int(m.authenticated)
        except NtsError:
            pass
        await asyncio.sleep(spacing)
    return ok


async def test_flood_leaves_good_clients_a_share_and_recovers(ntspy_server: ServerProc) -> None:
    trust = TrustConfig(use_system_store=False, extra=[ntspy_server.certs.ca_cert])
    session = NtsSession("127.0.0.1", ntspy_server.ke_port, trust=trust, timeout=0.5)
    assert await measure_many(session, 2, 0.0) == 2
    before_rss = rss(ntspy_server.pid)
    before = await ntspy_server.astats()

    sent = multiprocessing.Value("Q", 0)
    ctx = multiprocessing.get_context("fork")
    flooders = [ctx.Process(target=flood, args=(ntspy_server.ntp_port, FLOOD_SECONDS,
                                                FLOOD_MAX_PACKETS // FLOOD_PROCESSES, sent))
                for _ in range(FLOOD_PROCESSES)]
    for p in flooders:
        p.start()
    try:
        await asyncio.sleep(0.5)
        during = await measure_many(session, 12, 0.05)
    finally:
        for p in flooders:
            p.join(timeout=FLOOD_SECONDS + 10)
            if p.is_alive():
                p.kill()
    after_flood = await ntspy_server.astats()
    answered = after_flood["ntp_received"] - before["ntp_received"]
    print(f"\nflood: {sent.value} packets sent, {answered} answered by the server, "
          f"good client {during}/12 during the flood")
    # The flood really was more than the server could answer...
    assert sent.value > 1.5 * answered
    # ...and yet a good client got some of its authenticated answers through.
    assert during >= 1
    # Right after it ends, everything is answered again.
    assert await measure_many(session, 5, 0.0) == 5
    assert rss(ntspy_server.pid) - before_rss < RSS_GROWTH_LIMIT
    session.close()
