#!/usr/bin/env python3
"""Load generator for NTP and NTS servers on loopback.

One NTS-KE (TLS 1.3, trusting the given CA) gives the cookies and the C2S/S2C
keys; then each generator process sends requests it built beforehand, keeping
``--window`` of them in flight for ``--seconds``, and counts the responses:

* valid: the origin timestamp echoes a request still awaited and the packet is
  a server response (for NTS: not a kiss, and longer than a bare header); one
  NTS response in ``--verify-every`` is fully verified with the S2C key (unique
  identifier, origin, AEAD, cookies), and a failure counts as invalid;
* invalid: anything else a server sent us;
* stale: an answer to a request we had already written off as lost;
* lost: requests still awaited when no answer came for ``RECV_TIMEOUT``.

Why it is shaped like this: Python has no ``recvmmsg``, so the cost per packet
is two system calls plus a few bytecodes.  Requests are prebuilt (distinct
transmit timestamps and, for NTS, distinct unique identifiers, nonces and
cookies, cycled through) so that sending is one ``send`` of a ready ``bytes``;
the socket is blocking with a kernel receive timeout (``SO_RCVTIMEO``) so that
``recv`` is one system call with no ``poll`` before it, and an exception only
happens when a packet is lost.  A stateless NTS server answers a reused cookie
every time, so a handful of cookies serve millions of requests.

Run ``python3 bench/loadgen.py --help``; ``bench/compare`` drives it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ntspy.client.ke import key_exchange
from ntspy.errors import NtsError
from ntspy.net.tls.trust import TrustConfig
from ntspy.proto import nts
from ntspy.proto.aead import Aead, AeadId
from ntspy.proto.ntp import HEADER_LEN, Mode, NtpHeader

RECV_TIMEOUT_US = 100_000
"""A request window with no answer for this long is written off as lost."""

BUSY_SPINS = 50_000
"""Empty non-blocking reads (about 2 us each) before a busy window counts as lost."""

CLOCK_CHECK_EVERY = 512
"""Packets between two reads of the clock: reading it per packet costs ~5%."""

MIN_PREBUILT = 2048
"""Requests built per process at least; far more than ever in flight."""

_ORIGIN = slice(24, 32)  # origin timestamp in the NTP header (RFC 5905 s7.3)
_TIMEVAL = struct.Struct("@ll")
_MAX_DATAGRAM = 2048


@dataclass(slots=True)
class NtsCredentials:
    """What NTS-KE gave us: the keys and the cookies to put in requests."""

    aead_id: int
    c2s: bytes
    s2c: bytes
    cookies: list[bytes]
    ntp_host: str
    ntp_port: int


@dataclass(slots=True)
class Prebuilt:
    """Requests ready to send, with what each response must echo."""

    packets: list[bytes]
    origins: list[bytes]  # the 8 transmit-timestamp bytes of each request
    unique_ids: list[bytes]  # empty for plain NTP


@dataclass(slots=True)
class Counts:
    """What one run saw; ``rate`` is valid responses per second."""

    sent: int = 0
    valid: int = 0
    invalid: int = 0
    stale: int = 0
    lost: int = 0
    verified: int = 0
    seconds: float = 0.0
    processes: int = 1
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.valid / self.seconds if self.seconds > 0 else 0.0

    def merge(self, other: Counts) -> None:
        """Add another process's counts (their seconds overlap: keep the longest)."""
        self.sent += other.sent
        self.valid += other.valid
        self.invalid += other.invalid
        self.stale += other.stale
        self.lost += other.lost
        self.verified += other.verified
        self.seconds = max(self.seconds, other.seconds)
        self.errors.extend(other.errors)

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out["rate"] = round(self.rate, 1)
        return out


# ---------------------------------------------------------------------------
# NTS-KE


def trust_for(ca: Path | None) -> TrustConfig:
    """Trust only the throwaway CA when one is given."""
    if ca is None:
        return TrustConfig()
    return TrustConfig(use_system_store=False, extra=[ca])


def fetch_credentials(
    host: str, ke_port: int, ca: Path | None, aead_id: int = AeadId.AES_SIV_CMAC_256
) -> NtsCredentials:
    """One NTS-KE with ``host``:``ke_port``, offering only ``aead_id``."""
    result = asyncio.run(key_exchange(host, ke_port, trust=trust_for(ca), aeads=[aead_id]))
    return NtsCredentials(
        result.aead_id, result.c2s, result.s2c, list(result.cookies),
        result.ntp_server, result.ntp_port,
    )


@dataclass(slots=True)
class KeRun:
    """A batch of NTS-KE handshakes."""

    ok: int
    failed: int
    seconds: float
    first_error: str = ""


async def _handshakes(
    host: str, ke_port: int, ca: Path | None, count: int, concurrency: int, aead_id: int
) -> KeRun:
    trust = trust_for(ca)
    gate = asyncio.Semaphore(concurrency)
    errors: list[str] = []

    async def one() -> bool:
        async with gate:
            try:
                result = await key_exchange(host, ke_port, trust=trust, aeads=[aead_id])
            except NtsError as exc:
                errors.append(str(exc))
                return False
            return bool(result.cookies)

    start = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(count)))
    seconds = time.perf_counter() - start
    ok = sum(results)
    return KeRun(ok, count - ok, seconds, errors[0] if errors else "")


def ke_handshakes(
    host: str,
    ke_port: int,
    ca: Path | None,
    count: int,
    *,
    concurrency: int = 4,
    aead_id: int = AeadId.AES_SIV_CMAC_256,
) -> KeRun:
    """Run ``count`` complete NTS-KE sessions, ``concurrency`` at a time."""
    return asyncio.run(_handshakes(host, ke_port, ca, count, concurrency, aead_id))


# ---------------------------------------------------------------------------
# Requests


def _client_header(transmit: bytes) -> NtpHeader:
    return NtpHeader(version=4, mode=Mode.CLIENT, transmit_ts=int.from_bytes(transmit, "big"))


def _transmit_stamps(count: int) -> list[bytes]:
    """Distinct random non-zero transmit timestamps (a client's origin values)."""
    seen: set[bytes] = set()
    out: list[bytes] = []
    while len(out) < count:
        ts = os.urandom(8)
        if ts not in seen and any(ts):
            seen.add(ts)
            out.append(ts)
    return out


def build_plain(count: int) -> Prebuilt:
    """``count`` NTPv4 client requests (48 bytes each)."""
    stamps = _transmit_stamps(count)
    return Prebuilt([_client_header(ts).pack() for ts in stamps], stamps, [])


def build_nts(count: int, creds: NtsCredentials) -> Prebuilt:
    """``count`` NTS requests, each with its own unique id and nonce, one cookie, no placeholder.

    That is the steady state of a client: one cookie out, one new cookie back.
    """
    c2s = Aead(creds.aead_id, creds.c2s)
    stamps = _transmit_stamps(count)
    uids = [os.urandom(nts.UNIQUE_ID_LEN) for _ in range(count)]
    packets = [
        nts.build_request(
            _client_header(ts), uid, creds.cookies[i % len(creds.cookies)], 0, c2s,
            os.urandom(16),
        )
        for i, (ts, uid) in enumerate(zip(stamps, uids, strict=True))
    ]
    return Prebuilt(packets, stamps, uids)


# ---------------------------------------------------------------------------
# The loop


def _open_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(
        socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(0, RECV_TIMEOUT_US)
    )
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.connect((host, port))
    return sock


def run_worker(
    host: str,
    port: int,
    reqs: Prebuilt,
    s2c: Aead | None,
    seconds: float,
    window: int,
    verify_every: int = 100,
    start_at: float | None = None,
    busy: bool = True,
) -> Counts:
    """Send ``reqs`` round-robin with ``window`` in flight for ``seconds``; count answers.

    ``s2c`` given means NTS: responses must also be non-kiss and carry
    extension fields, and one in ``verify_every`` is verified completely.
    """
    counts = Counts()
    packets, origins, uids = reqs.packets, reqs.origins, reqs.unique_ids
    n = len(packets)
    if n <= 2 * window:
        raise ValueError("need more prebuilt requests than twice the window")
    known = set(origins)
    is_nts = s2c is not None
    sock = _open_socket(host, port)
    send, recv = sock.send, sock.recv
    pending: dict[bytes, int] = {}
    i = empty = 0
    # Busy polling keeps this process from ever sleeping, so the benchmark does
    # not measure wake-up latency (two sleeping ends ping-pong in small batches).
    flags = socket.MSG_DONTWAIT if busy else 0
    sent = valid = invalid = stale = lost = verified = 0
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.monotonic()))
    start = time.monotonic()
    deadline = start + seconds
    try:
        while True:
            while len(pending) < window:
                send(packets[i])
                pending[origins[i]] = i
                i += 1
                if i == n:
                    i = 0
                sent += 1
            for _ in range(CLOCK_CHECK_EVERY):
                try:
                    data = recv(_MAX_DATAGRAM, flags)
                except BlockingIOError:
                    # Busy mode: nothing queued yet, spin a while.  Blocking
                    # mode: SO_RCVTIMEO expired.  Either way, after long enough
                    # the whole window is written off as lost.
                    if flags:
                        empty += 1
                        if empty < BUSY_SPINS:
                            continue
                    empty = 0
                    lost += len(pending)
                    pending.clear()
                    break
                empty = 0
                idx = pending.pop(data[_ORIGIN], None)
                if idx is None:
                    if data[_ORIGIN] in known:
                        stale += 1
                    else:
                        invalid += 1
                    continue
                # Keep the window full before looking closer at the answer.
                send(packets[i])
                pending[origins[i]] = i
                i += 1
                if i == n:
                    i = 0
                sent += 1
                if data[0] & 7 != Mode.SERVER or (
                    is_nts and (data[1] == 0 or len(data) <= HEADER_LEN)
                ):
                    invalid += 1
                    continue
                valid += 1
                if is_nts and valid % verify_every == 0:
                    assert s2c is not None
                    try:
                        nts.verify_response(
                            data, uids[idx], int.from_bytes(origins[idx], "big"), s2c
                        )
                        verified += 1
                    except NtsError as exc:
                        invalid += 1
                        valid -= 1
                        if len(counts.errors) < 3:
                            counts.errors.append(str(exc))
            if time.monotonic() >= deadline:
                break
    finally:
        sock.close()
    counts.seconds = time.monotonic() - start
    counts.sent, counts.valid, counts.invalid = sent, valid, invalid
    counts.stale, counts.lost, counts.verified = stale, lost, verified
    return counts


@dataclass(slots=True)
class LoadSpec:
    """One load run, picklable for the worker processes."""

    host: str
    port: int
    seconds: float
    window: int
    creds: NtsCredentials | None = None
    verify_every: int = 100
    start_at: float | None = None
    busy: bool = True


def _worker_main(spec: LoadSpec) -> Counts:
    count = max(MIN_PREBUILT, 4 * spec.window)
    if spec.creds is None:
        return run_worker(
            spec.host, spec.port, build_plain(count), None, spec.seconds, spec.window,
            start_at=spec.start_at, busy=spec.busy,
        )
    reqs = build_nts(count, spec.creds)
    s2c = Aead(spec.creds.aead_id, spec.creds.s2c)
    return run_worker(
        spec.host, spec.port, reqs, s2c, spec.seconds, spec.window, spec.verify_every,
        start_at=spec.start_at, busy=spec.busy,
    )


def run_load(
    host: str,
    port: int,
    *,
    seconds: float = 5.0,
    window: int = 64,
    processes: int = 1,
    creds: NtsCredentials | None = None,
    verify_every: int = 100,
    busy: bool = True,
) -> Counts:
    """Load ``host``:``port`` from ``processes`` processes; NTS when ``creds`` are given."""
    # Start every process at the same moment, after all of them built their requests.
    start_at = time.monotonic() + 0.3 + 0.05 * processes
    spec = LoadSpec(host, port, seconds, window, creds, verify_every, start_at, busy)
    if processes == 1:
        return _worker_main(spec)
    total = Counts(processes=processes)
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        for part in pool.map(_worker_main, [spec] * processes):
            total.merge(part)
    return total


# ---------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1", help="NTP (and NTS-KE) server address")
    p.add_argument("--port", type=int, help="NTP port (default: what NTS-KE says)")
    p.add_argument("--nts", action="store_true", help="authenticated NTS requests")
    p.add_argument("--ke-port", type=int, default=4460, help="NTS-KE port")
    p.add_argument("--ke-host", default="localhost", help="name the certificate must carry")
    p.add_argument("--ca", type=Path, help="trusted CA file (e.g. the throwaway ca.pem)")
    p.add_argument("--aead", type=int, default=AeadId.AES_SIV_CMAC_256, help="AEAD id to offer")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--window", type=int, default=64, help="requests in flight per process")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--verify-every", type=int, default=100,
                   help="fully verify one NTS response in this many")
    p.add_argument("--blocking", action="store_true",
                   help="sleep in recv instead of busy polling (measures wake-ups too)")
    p.add_argument("--handshakes", type=int, default=0,
                   help="instead of NTP load: run this many NTS-KE sessions")
    p.add_argument("--concurrency", type=int, default=4, help="NTS-KE sessions at a time")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.handshakes:
        ke = ke_handshakes(args.ke_host, args.ke_port, args.ca, args.handshakes,
                           concurrency=args.concurrency, aead_id=args.aead)
        print(json.dumps({**asdict(ke), "per_second": round(ke.ok / ke.seconds, 1)}))
        return 0 if ke.failed == 0 else 1
    creds = None
    port = args.port
    if args.nts:
        creds = fetch_credentials(args.ke_host, args.ke_port, args.ca, args.aead)
        port = port or creds.ntp_port
    if port is None:
        print("loadgen: --port is needed for plain NTP", file=sys.stderr)
        return 2
    counts = run_load(args.host, port, seconds=args.seconds, window=args.window,
                      processes=args.processes, creds=creds, verify_every=args.verify_every,
                      busy=not args.blocking)
    print(json.dumps(counts.to_json()))
    return 0 if counts.valid and not counts.invalid else 1


if __name__ == "__main__":
    sys.exit(main())
