"""An on-path attacker between an NTS client and a real ntspy server can drop or delay
packets, and nothing more: no tampered, replayed, forged or injected datagram ever
becomes a measurement or a cookie, the client never falls back to plain NTP, and a
delay moves the measured offset by at most half the delay, inside the error bound.

The server runs in-process on ephemeral loopback ports with a throwaway PKI; the
client talks to it through :mod:`tests.attacks.proxy`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from ntspy.certs import CertPaths, make_test_pki
from ntspy.client.session import Measurement, NtsSession
from ntspy.demo import loopback_server
from ntspy.errors import KeConnectionError, KeError, NakBackoff, NtsError
from ntspy.net.tls.trust import TrustConfig
from ntspy.proto import nts
from ntspy.proto.aead import Aead, AeadId
from ntspy.proto.ntp import (
    HEADER_LEN,
    KISS_DENY,
    KISS_NTS_NAK,
    KISS_RATE,
    Mode,
    NtpHeader,
    NtpPacket,
    encode_ef,
    ntp_to_unix_ns,
    unix_ns_to_ntp,
)
from ntspy.proto.nts import EfType
from ntspy.server.daemon import ServerDaemon
from tests.attacks.proxy import KeMode, TcpProxy, UdpProxy

HOST = "127.0.0.1"
TIMEOUT = 2.0
# The client keeps at most 64 unread datagrams: tampered copies per exchange stay below.
TAMPER_BATCH = 30
FLIP_MASKS = (0xFF, 0x01)


def figures(name: str, **values: object) -> None:
    """The numbers docs/security.md quotes; visible with ``pytest -s``."""
    print(f"\nFIGURES {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


# --- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_test_pki(tmp_path_factory.mktemp("pki"), hostnames=("localhost",), ips=(HOST,))


@pytest.fixture
async def server(pki: CertPaths, tmp_path: Path) -> AsyncIterator[ServerDaemon]:
    async with loopback_server(pki, tmp_path / "keys") as daemon:
        yield daemon


@dataclass
class Mitm:
    udp: UdpProxy
    tcp: TcpProxy
    ca: Path

    def session(self, aeads: Sequence[int] | None = None, timeout: float = TIMEOUT) -> NtsSession:
        """An NTS client whose KE and NTP traffic both go through the attacker."""
        return NtsSession(
            HOST,
            self.tcp.port,
            trust=TrustConfig(use_system_store=False, extra=[self.ca]),
            server_name="localhost",
            ntp_port=self.udp.port,
            aeads=aeads,
            timeout=timeout,
        )


def assert_no_amplification(proxy: UdpProxy) -> int:
    """Every server response is at most as large as the request it answers."""
    sizes = {r[40:48]: len(r) for r in proxy.requests if len(r) >= HEADER_LEN}
    for response in proxy.responses:
        request_len = sizes[response[24:32]]  # origin timestamp = the request's transmit
        assert len(response) <= request_len, (len(response), request_len)
    return len(proxy.responses)


@pytest.fixture
async def mitm(server: ServerDaemon, pki: CertPaths) -> AsyncIterator[Mitm]:
    udp = UdpProxy((HOST, server.ntp_port))
    tcp = TcpProxy((HOST, server.ke_port))
    await udp.start()
    await tcp.start()
    try:
        yield Mitm(udp, tcp, pki.ca_cert)
        # Whatever the test did, the server never amplified (RFC 8915 s5.7).
        assert_no_amplification(udp)
    finally:
        udp.close()
        await tcp.close()


# --- helpers -------------------------------------------------------------------


@dataclass
class RequestParts:
    """What an observer sees of one NTS request."""

    header: NtpHeader
    unique_id: bytes
    cookie: bytes
    placeholders: int
    nonce: bytes
    ciphertext: bytes

    @property
    def xmt(self) -> int:
        return self.header.transmit_ts


def parse_request(data: bytes) -> RequestParts:
    packet = NtpPacket.parse(data)
    r = nts.parse_request(data, packet.header, packet.extensions)
    return RequestParts(r.header, r.unique_id, r.cookie, r.placeholders, r.nonce, r.ciphertext)


def genuine(session: NtsSession, request: bytes, response: bytes) -> nts.VerifiedResponse:
    """Open a real response with the session's own keys (what the client should accept)."""
    assert session.ke is not None
    parts = parse_request(request)
    s2c = Aead(session.ke.aead_id, session.ke.s2c)
    return nts.verify_response(response, parts.unique_id, parts.xmt, s2c)


def rejected(session: NtsSession) -> int:
    return sum(n for reason, n in session.stats.items() if reason.startswith("rejected: "))


def flip(data: bytes, position: int, mask: int) -> bytes:
    out = bytearray(data)
    out[position] ^= mask
    return bytes(out)


def kiss(request: bytes, code: bytes, unique_id: bytes | None) -> bytes:
    """A forged kiss-o'-death for ``request``: origin copied, unique id as given."""
    parts = parse_request(request)
    header = NtpHeader(
        mode=Mode.SERVER,
        stratum=0,
        reference_id=code,
        origin_ts=parts.xmt,
        receive_ts=unix_ns_to_ntp(time.time_ns()),
        transmit_ts=unix_ns_to_ntp(time.time_ns()),
    )
    uid = parts.unique_id if unique_id is None else unique_id
    return header.pack() + encode_ef(EfType.UNIQUE_IDENTIFIER, uid)


def assert_all_nts(proxy: UdpProxy) -> None:
    """No plain NTP went out: every request carries a cookie and an authenticator."""
    assert proxy.requests
    for request in proxy.requests:
        parse_request(request)  # raises unless it is a well-formed NTS request


def error_bound(m: Measurement) -> float:
    """Root distance: how far the true offset can be from the measured one."""
    return m.delay / 2 + m.root_delay / 2 + m.root_dispersion


# --- tamper --------------------------------------------------------------------


@pytest.mark.parametrize("aead", [AeadId.AES_128_GCM_SIV, AeadId.AES_SIV_CMAC_256])
async def test_every_flipped_byte_of_a_response_is_rejected(mitm: Mitm, aead: AeadId) -> None:
    """Each byte of a real response (8 cookies), flipped two ways, is sent to the client
    before the genuine response: every copy is rejected and counted, and the
    measurement and the cookies come from the genuine response alone."""
    proxy = mitm.udp
    positions: list[int] = []
    tampered: list[int] = []

    def tamper(response: bytes, request: bytes) -> list[bytes]:
        if not tampered:
            positions.extend(range(len(response)))
        batch, positions[:] = positions[:TAMPER_BATCH], positions[TAMPER_BATCH:]
        copies = [flip(response, p, m) for p in batch for m in FLIP_MASKS]
        tampered.append(len(copies))
        return [*copies, response]

    with mitm.session(aeads=[aead]) as session:
        await session.key_exchange()
        proxy.on_response = tamper
        exchanges = 0
        while not exchanges or positions:
            # One cookie left before each exchange: the request asks for 7 more,
            # so every response carries 8 cookies, all of which must be genuine.
            session.cookies[1:] = []
            m = await session.measure()
            request, response = proxy.requests[-1], proxy.responses[-1]
            real = genuine(session, request, response)
            assert len(real.cookies) == 8
            assert session.cookies == real.cookies
            assert m.authenticated
            assert m.t3 == ntp_to_unix_ns(real.header.transmit_ts, m.t1)
            exchanges += 1
        length = len(proxy.responses[0])
        assert sum(tampered) == length * len(FLIP_MASKS)
        assert session.stats["accepted"] == exchanges
        assert rejected(session) == sum(tampered)
        assert session.stats["key exchanges"] == 1
        reasons = [k for k in session.stats if k.startswith("rejected: ")]
    figures(
        f"tamper {aead.name}",
        response_bytes=length,
        tampered=sum(tampered),
        rejected=rejected(session),
        accepted_tampered=0,
        exchanges=exchanges,
        distinct_reasons=len(reasons),
    )


# --- replay --------------------------------------------------------------------


def set_origin(data: bytes, xmt: int) -> bytes:
    return data[:24] + xmt.to_bytes(8, "big") + data[32:]


def set_unique_id(data: bytes, unique_id: bytes) -> bytes:
    efs = NtpPacket.parse(data).extensions
    uid = next(ef for ef in efs if ef.type == EfType.UNIQUE_IDENTIFIER)
    start = uid.offset + 4
    return data[:start] + unique_id + data[start + len(unique_id):]


async def test_replayed_responses_are_rejected(mitm: Mitm) -> None:
    proxy = mitm.udp
    with mitm.session() as session:
        await session.measure()
        old = proxy.responses[-1]

        def replays(response: bytes, request: bytes) -> list[bytes]:
            parts = parse_request(request)
            with_origin = set_origin(old, parts.xmt)
            return [
                old,  # as recorded: wrong origin timestamp
                with_origin,  # origin patched: wrong unique id
                set_unique_id(with_origin, parts.unique_id),  # both patched: AEAD fails
                response,
            ]

        proxy.on_response = replays
        for _ in range(3):
            m = await session.measure()
            assert m.authenticated
            assert m.t3 == ntp_to_unix_ns(NtpHeader.unpack(proxy.responses[-1]).transmit_ts, m.t1)
        assert rejected(session) == 9
        reasons = " ".join(session.stats)
        assert "origin timestamp" in reasons
        assert "unique identifier" in reasons
        assert "AEAD verification failed" in reasons

        # The same genuine response delivered twice: the late copy meets the next request.
        proxy.on_response = None
        await session.measure()
        proxy.replay()
        before = rejected(session)
        await session.measure()
        assert rejected(session) == before + 1

        # Only replays, never the real answer: no measurement at all.
        proxy.on_response = lambda response, request: [old]
        session.timeout = 0.5
        with pytest.raises(NtsError, match="rejected"):
            await session.measure()
        assert session.stats["accepted"] == 6


async def test_response_to_another_session_is_rejected(mitm: Mitm) -> None:
    """A response sealed for one client, patched to fit another's request, fails the AEAD."""
    proxy = mitm.udp
    with mitm.session() as first:
        await first.measure()
    theirs = proxy.responses[-1]
    with mitm.session() as second:

        def transplant(response: bytes, request: bytes) -> list[bytes]:
            parts = parse_request(request)
            return [set_unique_id(set_origin(theirs, parts.xmt), parts.unique_id), response]

        proxy.on_response = transplant
        m = await second.measure()
        assert m.authenticated
        assert second.stats["rejected: AEAD verification failed"] == 1


# --- forged NAK and kiss-o'-death -----------------------------------------------


@pytest.mark.parametrize("code", [KISS_NTS_NAK, KISS_RATE, KISS_DENY])
async def test_forged_kiss_without_our_unique_id_is_ignored(mitm: Mitm, code: bytes) -> None:
    proxy = mitm.udp
    proxy.forge = lambda request: [kiss(request, code, os.urandom(32))]
    with mitm.session() as session:
        for _ in range(3):
            m = await session.measure()
            assert m.authenticated
        assert session.stats["rejected: unique identifier does not match our request"] == 3
        assert session.stats["key exchanges"] == 1
        assert session.stats["naks"] == 0
    assert_all_nts(proxy)


async def test_forged_nak_with_our_unique_id_makes_the_client_redo_ke(mitm: Mitm) -> None:
    """RFC 8915 s5.7 lets a NAK through unauthenticated; once the keys have proven
    good, the client answers one with a fresh NTS-KE, and stays on NTS."""
    proxy = mitm.udp
    forged: list[bytes] = []

    def once(request: bytes) -> list[bytes]:
        if forged:
            return []
        forged.append(kiss(request, KISS_NTS_NAK, None))
        return forged

    with mitm.session() as session:
        assert (await session.measure()).authenticated
        proxy.forge = once
        m = await session.measure()
        assert m.authenticated
        assert session.stats["naks"] == 1
        assert session.stats["key exchanges"] == 2
        assert mitm.tcp.connections == 2
    assert_all_nts(proxy)


async def test_forged_nak_on_every_request_fails_without_falling_back(mitm: Mitm) -> None:
    proxy = mitm.udp
    proxy.forge = lambda request: [kiss(request, KISS_NTS_NAK, None)]
    with mitm.session() as session, pytest.raises(NakBackoff):
        await session.measure()
    assert session.stats["accepted"] == 0
    assert session.stats["key exchanges"] == 1  # a NAK storm buys no second NTS-KE
    assert_all_nts(proxy)


@pytest.mark.parametrize("code", [KISS_RATE, KISS_DENY])
async def test_unauthenticated_kiss_with_our_unique_id_is_ignored(
    mitm: Mitm, code: bytes
) -> None:
    proxy = mitm.udp
    proxy.forge = lambda request: [kiss(request, code, None)]
    with mitm.session() as session:
        for _ in range(3):
            m = await session.measure()
            assert m.authenticated
            assert m.stratum == 2
        assert session.stats["rejected: packet has no NTS authenticator"] == 3
        assert session.stats["key exchanges"] == 1
    assert_all_nts(proxy)


# --- cookie injection ----------------------------------------------------------


def insert_before_authenticator(response: bytes, ef: bytes) -> bytes:
    auth = next(e for e in NtpPacket.parse(response).extensions
                if e.type == EfType.NTS_AUTHENTICATOR)
    return response[:auth.offset] + ef + response[auth.offset:]


@pytest.mark.parametrize("cookie_len", [16, 72, 104])
async def test_cookies_outside_the_encrypted_part_are_never_stored(
    mitm: Mitm, cookie_len: int
) -> None:
    """16-byte cookies make a 20-byte EF, which parsers must not take for a legacy MAC."""
    proxy = mitm.udp
    planted: list[bytes] = []

    def inject(response: bytes, request: bytes) -> list[bytes]:
        cookie = os.urandom(cookie_len)
        planted.append(cookie)
        ef = encode_ef(EfType.NTS_COOKIE, cookie, min_length=4)
        return [response + ef, insert_before_authenticator(response, ef), response]

    proxy.on_response = inject
    with mitm.session() as session:
        for _ in range(4):
            session.cookies[1:] = []
            await session.measure()
            assert not set(planted) & set(session.cookies)
        assert rejected(session) == 8
    # The attacker alone answering: the client gets no time and no cookies.
    proxy.on_response = lambda response, request: inject(response, request)[:2]
    with mitm.session(timeout=0.5) as session:
        with pytest.raises(NtsError, match="rejected"):
            await session.measure()
        assert not set(planted) & set(session.cookies)


# --- unlinkability -------------------------------------------------------------


def windows(data: bytes, size: int = 8) -> set[bytes]:
    return {data[i:i + size] for i in range(len(data) - size + 1)}


async def test_requests_cannot_be_linked(mitm: Mitm) -> None:
    proxy = mitm.udp
    with mitm.session() as session:
        for _ in range(20):
            await session.measure()
        assert session.stats["key exchanges"] == 1
    requests = [parse_request(r) for r in proxy.requests]
    assert len(requests) == 20
    for field in ("cookie", "unique_id", "nonce", "xmt"):
        values = [getattr(r, field) for r in requests]
        assert len(set(values)) == 20, f"a {field} was sent twice"
    now = unix_ns_to_ntp(time.time_ns()) >> 32
    for raw, r in zip(proxy.requests, requests, strict=True):
        # Reference, origin and receive timestamps are zero: nothing of our clock...
        assert raw[16:40] == bytes(24)
        # ...and the transmit timestamp is random, nowhere near the real time.
        assert abs((r.xmt >> 32) - now) > 3600
    parts: Callable[[RequestParts], list[bytes]] = lambda r: [  # noqa: E731
        r.unique_id, r.cookie, r.nonce, r.ciphertext
    ]
    for a, b in itertools.pairwise(requests):
        seen = set().union(*(windows(p) for p in parts(a)))
        for p in parts(b):
            assert not windows(p) & seen, "consecutive requests share 8+ bytes"
    # Cookies travel to the client encrypted: none shows up in any response on the wire.
    on_wire = set().union(*(windows(r) for r in proxy.responses))
    for r in requests:
        assert not windows(r.cookie[4:]) & on_wire  # past the master key id
    figures("unlinkability", requests=len(requests), distinct_cookies=len(requests))


# --- delay ---------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["response", "request"])
async def test_delay_shifts_offset_by_at_most_half_and_stays_in_bound(
    mitm: Mitm, direction: str
) -> None:
    delay = 0.1
    tolerance = 0.02  # timer and scheduling jitter on a busy machine
    proxy = mitm.udp
    with mitm.session() as session:
        base = await session.measure()
        assert abs(base.offset) < tolerance
        if direction == "response":
            proxy.response_delay = delay
        else:
            proxy.request_delay = delay
        for _ in range(3):
            m = await session.measure()
            assert m.authenticated
            assert m.delay >= delay
            # Same clock on both ends: the true offset is 0.
            assert abs(m.offset) <= delay / 2 + tolerance
            expected_sign = -1 if direction == "response" else 1
            assert m.offset * expected_sign > delay / 2 - tolerance
            assert abs(m.offset) <= error_bound(m)
    figures(f"delay {direction}", delay_s=delay, offset_s=round(m.offset, 4),
            bound_s=round(error_bound(m), 4))


async def test_dropped_responses_give_no_measurement(mitm: Mitm) -> None:
    mitm.udp.drop_responses = True
    with mitm.session(timeout=0.5) as session, pytest.raises(NtsError, match="no NTS response"):
        await session.measure()
    assert session.stats["accepted"] == 0
    assert_all_nts(mitm.udp)


# --- downgrade -----------------------------------------------------------------


@pytest.mark.parametrize("mode", [KeMode.REFUSE, KeMode.RESET, KeMode.CLOSE, KeMode.STALL])
async def test_blocked_ke_fails_clearly_and_never_goes_plain(mitm: Mitm, mode: KeMode) -> None:
    if mode is KeMode.REFUSE:
        await mitm.tcp.refuse()
    else:
        mitm.tcp.mode = mode
    with mitm.session(timeout=0.5) as session:
        for _ in range(2):
            with pytest.raises(KeError) as caught:
                await session.measure()
            # Says which server and port failed, so a user can tell a blocked KE port.
            assert f"127.0.0.1 port {mitm.tcp.port}" in str(caught.value), caught.value
            if mode is not KeMode.STALL:
                assert isinstance(caught.value, KeConnectionError)
        assert session.stats["accepted"] == 0
        assert session.ke is None
    assert mitm.udp.records == []  # not a single NTP packet, authenticated or not


# --- amplification -------------------------------------------------------------


async def test_no_response_is_larger_than_its_request(mitm: Mitm) -> None:
    """Requests of every shape the attacks produce: plain, NTS with 0..7 placeholders,
    NTS with a bad cookie (NAK), short and long unique ids."""
    proxy = mitm.udp
    with mitm.session() as session:
        for keep in range(8, 0, -1):
            session.cookies[keep:] = []
            await session.measure()
        assert session.ke is not None
        c2s = Aead(session.ke.aead_id, session.ke.c2s)
        extra: list[bytes] = []
        for uid_len in (32, 64, 200):
            header = NtpHeader(mode=Mode.CLIENT, transmit_ts=int.from_bytes(os.urandom(8), "big"))
            cookie = session.cookies.pop() if uid_len != 200 else os.urandom(72)
            extra.append(nts.build_request(
                header, os.urandom(uid_len), cookie, 0, c2s, os.urandom(c2s.nonce_length)
            ))
        extra.append(bytes([0x23]) + bytes(39) + os.urandom(8))  # plain NTPv4
    for request in extra:
        proxy.send_to_server(request)
    deadline = time.monotonic() + 2
    while len(proxy.responses) < 8 + len(extra) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert len(proxy.responses) == 8 + len(extra)
    checked = assert_no_amplification(proxy)
    naks = [r for r in proxy.responses if NtpHeader.unpack(r).reference_id == KISS_NTS_NAK]
    assert len(naks) == 1
    figures("amplification", responses_checked=checked)

