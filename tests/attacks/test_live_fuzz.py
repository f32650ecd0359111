"""Tens of thousands of random and mutated packets against a running ``ntspy serve``.

The server (a subprocess without CAP_SYS_TIME, on ephemeral loopback ports) must
never die, keep its memory bounded, keep answering a well-behaved NTS client
during and after the flood, never answer with more bytes than it got, and
account for every datagram and connection in its counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ntspy.client.ke import KeResult
from ntspy.client.session import NtsSession
from ntspy.net.tls.ntske import NTSKE_ALPN
from ntspy.net.tls.trust import TrustConfig
from ntspy.proto import ke, nts
from ntspy.proto.aead import Aead, supported
from ntspy.proto.ntp import HEADER_LEN, Mode, NtpHeader
from tests.peers import ServerProc, start_ntspy_server

LOOPBACK = "127.0.0.1"
UDP_PACKETS = 20_000
UDP_TIME_LIMIT = 30.0
BATCH = 40  # datagrams between yields: small enough that the server's socket never overflows
CHECKPOINT = 1_000  # wait for the server to catch up this often
KE_CONNECTIONS = 300
KE_PARALLEL = 16
RSS_GROWTH_LIMIT = 30 * 1024 * 1024
NTP_COUNTERS = ("ntp_received", "ntp_malformed", "ntp_denied", "ntp_dropped")
KE_OUTCOMES = ("ke_completed", "ke_errors", "ke_failed")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    # 16 fuzzing connections at once from 127.0.0.1, plus the good client: above the
    # default per-client share of 8 (tests/attacks/test_ke_starvation.py tests that).
    proc = start_ntspy_server(tmp_path_factory.mktemp("live-fuzz"),
                              [f"ntsclientconnections {KE_PARALLEL + 4}"])
    try:
        yield proc
    finally:
        proc.stop()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def socket_drops(port: int) -> int:
    """Datagrams the kernel dropped at the server's UDP socket (receive buffer full)."""
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return int(fields[-1])
    return 0


def good_session(server: ServerProc) -> NtsSession:
    trust = TrustConfig(use_system_store=False, extra=[server.certs.ca_cert])
    return NtsSession(LOOPBACK, server.ke_port, trust=trust, timeout=3.0)


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A few random edits: byte flips, overwrites, cuts, insertions, truncation."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(max(1, len(out)))
        op = rng.randrange(5)
        if op == 0 and out:
            out[pos] ^= rng.randrange(1, 256)
        elif op == 1:
            out[pos:pos + 4] = rng.randbytes(4)
        elif op == 2:
            del out[pos:pos + rng.randint(1, 64)]
        elif op == 3:
            out[pos:pos] = rng.randbytes(rng.randint(1, 64))
        else:
            del out[pos:]
    return bytes(out)


def nts_request(result: KeResult, cookie: bytes, rng: random.Random) -> bytes:
    c2s = Aead(result.aead_id, result.c2s)
    header = NtpHeader(mode=Mode.CLIENT, transmit_ts=rng.getrandbits(64))
    return nts.build_request(
        header, rng.randbytes(32), cookie, rng.randint(0, 7), c2s, rng.randbytes(c2s.nonce_length)
    )


def udp_corpus(rng: random.Random, result: KeResult, count: int) -> list[bytes]:
    plain = NtpHeader(mode=Mode.CLIENT, transmit_ts=1).pack()
    real = [nts_request(result, c, rng) for c in result.cookies]
    packets = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            p = rng.randbytes(rng.randrange(0, 1400))
        elif kind == 1:
            p = mutate(rng, rng.choice(real))
        elif kind == 2:
            p = mutate(rng, plain)
        else:  # well formed, but with a forged cookie: the server must NAK, not crash
            p = nts_request(result, rng.randbytes(len(result.cookies[0])), rng)
        if len(p) >= HEADER_LEN:
            # A unique transmit timestamp, to match each answer to its request.
            p = p[:40] + i.to_bytes(8, "big") + p[48:]
        packets.append(p)
    return packets


@dataclass
class GoodClient:
    """A well-behaved NTS client measuring in the background."""

    server: ServerProc
    ok: int = 0
    requests: int = 0
    failures: list[str] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        with good_session(self.server) as session:
            while not stop.is_set():
                try:
                    m = await session.measure()
                    assert m.authenticated
                    self.ok += 1
                except Exception as exc:  # recorded, asserted on by the test
                    self.failures.append(repr(exc))
                self.requests = session.stats["requests"]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.1)


async def wait_counted(server: ServerProc, base: dict[str, int], sent: int, drops0: int) -> None:
    """Wait until the server has counted ``sent`` datagrams (or the kernel dropped some)."""
    deadline = time.monotonic() + 10
    while True:
        stats = await server.astats()
        counted = sum(stats[n] - base[n] for n in NTP_COUNTERS)
        dropped = socket_drops(server.ntp_port) - drops0
        if counted + dropped >= sent or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.02)


async def test_udp_flood(server: ServerProc) -> None:
    rng = random.Random(8915)
    with good_session(server) as session:
        result = await session.key_exchange()
        assert (await session.measure()).authenticated  # warm up before measuring RSS
    packets = udp_corpus(rng, result, UDP_PACKETS)
    rss0 = rss_bytes(server.pid)
    base = await server.astats()
    drops0 = socket_drops(server.ntp_port)
    client = GoodClient(server)
    stop = asyncio.Event()
    background = asyncio.create_task(client.run(stop))
    answers: list[bytes] = []
    sent = 0
    started = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        s.bind((LOOPBACK, 0))
        for i in range(0, len(packets), BATCH):
            for p in packets[i:i + BATCH]:
                s.sendto(p, (LOOPBACK, server.ntp_port))
                sent += 1
            await asyncio.sleep(0.002)
            answers += drain(s)
            if sent % CHECKPOINT == 0:
                await wait_counted(server, base, sent, drops0)
            if time.monotonic() - started > UDP_TIME_LIMIT:
                break
        await wait_counted(server, base, sent, drops0)
        await asyncio.sleep(0.2)
        answers += drain(s)
    elapsed = time.monotonic() - started
    # The good client keeps being served after the flood too.
    await asyncio.sleep(0.5)
    stop.set()
    await background
    after = await server.astats()
    drops = socket_drops(server.ntp_port) - drops0
    rss1 = rss_bytes(server.pid)

    assert server.proc is not None and server.proc.poll() is None, server.log()
    assert client.failures == []
    assert client.ok >= 3
    deltas = {n: after[n] - base[n] for n in (*NTP_COUNTERS, "nts_authenticated", "nts_naks")}
    # Every datagram (the good client's too) is in exactly one counter, or was
    # dropped by the kernel before the server could read it.
    assert sum(deltas[n] for n in NTP_COUNTERS) + drops == sent + client.requests, deltas
    assert drops == 0, f"the kernel dropped {drops} datagrams: pacing too fast"
    assert deltas["nts_naks"] >= len(range(3, sent, 4))  # every forged cookie got a NAK
    by_xmt = {p[40:48]: p for p in packets[:sent] if len(p) >= HEADER_LEN}
    for a in answers:
        assert len(a) <= len(by_xmt[a[24:32]]), "amplification"
    assert rss1 - rss0 < RSS_GROWTH_LIMIT, (rss0, rss1)
    print(
        f"\nFIGURES live udp: sent={sent} in {elapsed:.1f}s, answered={len(answers)}, "
        f"received={deltas['ntp_received']}, malformed={deltas['ntp_malformed']}, "
        f"naks={deltas['nts_naks']}, kernel_drops={drops}, good_client_ok={client.ok}, "
        f"rss_before={rss0 >> 20}MiB, rss_after={rss1 >> 20}MiB"
    )


def drain(s: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(s.recv(4096))
        except BlockingIOError:
            return out


# --- NTS-KE ------------------------------------------------------------------------


def tls_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([NTSKE_ALPN.decode()])
    return ctx


def ke_corpus(rng: random.Random, count: int) -> list[bytes]:
    request = ke.build_client_request(supported())
    out = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            out.append(rng.randbytes(rng.randrange(0, 600)))
        elif kind == 1:
            out.append(mutate(rng, request))
        else:
            out.append(request[: rng.randrange(len(request))])  # cut short
    return out


async def ke_attempt(ctx: ssl.SSLContext, port: int, payload: bytes) -> bytes:
    """TLS handshake, send ``payload``, close our side, read what comes back."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(LOOPBACK, port, ssl=ctx, server_hostname="localhost"), 10
    )
    try:
        writer.write(payload)
        await writer.drain()
        # TLS has no half-close: wait briefly for an answer, then hang up (EOF to the server).
        try:
            return await asyncio.wait_for(reader.read(65536), 0.15)
        except TimeoutError:
            return b""
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def test_ke_garbage_after_handshake(server: ServerProc) -> None:
    rng = random.Random(4460)
    ctx = tls_context(server.certs.ca_cert)
    payloads = ke_corpus(rng, KE_CONNECTIONS)
    rss0 = rss_bytes(server.pid)
    base = await server.astats()
    gate = asyncio.Semaphore(KE_PARALLEL)
    replies: list[bytes] = []
    errors: list[str] = []

    async def one(payload: bytes) -> None:
        async with gate:
            try:
                replies.append(await ke_attempt(ctx, server.ke_port, payload))
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                errors.append(repr(exc))

    started = time.monotonic()
    client = GoodClient(server)
    stop = asyncio.Event()
    background = asyncio.create_task(client.run(stop))
    await asyncio.gather(*(one(p) for p in payloads))
    deadline = time.monotonic() + 15
    while True:
        after = await server.astats()
        finished = sum(after[n] - base[n] for n in KE_OUTCOMES)
        accepted = after["ke_accepted"] - base["ke_accepted"]
        if finished >= accepted or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    stop.set()
    await background
    elapsed = time.monotonic() - started
    rss1 = rss_bytes(server.pid)

    assert server.proc is not None and server.proc.poll() is None, server.log()
    assert errors == []  # every handshake completed: garbage comes after it
    assert client.failures == []
    assert client.ok >= 1
    after = await server.astats()
    accepted = after["ke_accepted"] - base["ke_accepted"]
    dropped = after["ke_dropped"] - base["ke_dropped"]
    # The good client's KE happens once, in its session: count it in.
    assert accepted + dropped == KE_CONNECTIONS + 1
    outcomes = {n: after[n] - base[n] for n in KE_OUTCOMES}
    assert sum(outcomes.values()) == accepted, outcomes
    # Whatever it got, what the server sends back is a well-formed KE message.
    answered = [r for r in replies if r]
    for reply in answered:
        ke.parse_records(reply)
    assert rss1 - rss0 < RSS_GROWTH_LIMIT, (rss0, rss1)
    print(
        f"\nFIGURES live ke: connections={KE_CONNECTIONS} in {elapsed:.1f}s, "
        f"answered={len(answered)}, {outcomes}, dropped={dropped}, "
        f"good_client_ok={client.ok}, rss_before={rss0 >> 20}MiB, rss_after={rss1 >> 20}MiB"
    )
