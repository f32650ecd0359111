"""NtsSession against an in-process NTS server built from the protocol core."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from ntspy.client.ke import KeResult
from ntspy.client.session import MAX_COOKIES, NtsSession, PlainSession
from ntspy.errors import KeError, NakBackoff, NtsError
from ntspy.net.udp import UdpServer
from ntspy.proto import nts
from ntspy.proto.aead import Aead, AeadId
from ntspy.proto.cookies import CookieKeys, KeyRing, MasterKey, cookie_length
from ntspy.proto.ntp import Mode, NtpHeader, iter_efs, ntp_to_unix_ns, unix_ns_to_ntp

AEAD = AeadId.AES_SIV_CMAC_256


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_REALTIME)


class FakeNtsServer:
    """Answers NTS requests like a real server; can tamper, NAK or starve cookies."""

    def __init__(self) -> None:
        self.ring = KeyRing([MasterKey(1, os.urandom(32), 0)])
        self.cookies_seen: list[bytes] = []
        self.unique_ids: list[bytes] = []
        self.transmit_ts: list[int] = []
        self.placeholders: list[int] = []
        self.tamper = False
        self.naks_left = 0
        self.new_cookies: int | None = None  # None: as many as asked for
        self.junk_first = False
        self.udp: UdpServer | None = None

    def cookie(self, keys: CookieKeys) -> bytes:
        return self.ring.seal(keys, os.urandom(16))

    def handle(self, data: bytes, addr: Any, rx_ns: int) -> bytes | None:
        header = NtpHeader.unpack(data)
        request = nts.parse_request(data, header, list(iter_efs(data)))
        self.cookies_seen.append(request.cookie)
        self.unique_ids.append(request.unique_id)
        self.transmit_ts.append(header.transmit_ts)
        self.placeholders.append(request.placeholders)
        reply = NtpHeader(
            mode=Mode.SERVER,
            stratum=1,
            reference_id=b"TEST",
            origin_ts=header.transmit_ts,
            receive_ts=unix_ns_to_ntp(rx_ns),
            transmit_ts=unix_ns_to_ntp(now_ns()),
        )
        if self.naks_left:
            self.naks_left -= 1
            return nts.build_nak(reply, request.unique_id)
        keys = self.ring.open(request.cookie)
        nts.authenticate_request(data, request, Aead(keys.aead_id, keys.c2s))
        count = nts.response_cookie_count(request, len(data), cookie_length(keys.aead_id), 16)
        if self.new_cookies is not None:
            count = min(count, self.new_cookies)
        s2c = Aead(keys.aead_id, keys.s2c)
        response = nts.build_response(
            reply, request.unique_id, [self.cookie(keys) for _ in range(count)], s2c, os.urandom(16)
        )
        if self.junk_first and self.udp is not None:
            # An on-path forger racing the real server with a modified copy.
            self.udp.sock.sendto(response[:60] + bytes([response[60] ^ 1]) + response[61:], addr)
        if self.tamper:
            response = response[:-1] + bytes([response[-1] ^ 0x01])
        return response


class FakeKe:
    """Stands in for key_exchange(): fresh keys and cookies for the fake server."""

    def __init__(self, server: FakeNtsServer, port: int, cookies: int = MAX_COOKIES) -> None:
        self.server, self.port, self.count, self.calls = server, port, cookies, 0

    async def __call__(self, host: str, ke_port: int, **kwargs: Any) -> KeResult:
        self.calls += 1
        keys = CookieKeys(AEAD, os.urandom(32), os.urandom(32))
        return KeResult(
            aead_id=AEAD, c2s=keys.c2s, s2c=keys.s2c,
            cookies=[self.server.cookie(keys) for _ in range(self.count)],
            ntp_server="127.0.0.1", ntp_port=self.port, ke_host=host, ke_port=ke_port,
            ke_address="127.0.0.1", tls_version="TLSv1.3", cert_subject="CN=fake",
            cert_not_after=None,
        )


@pytest.fixture
async def fake() -> Any:
    server = FakeNtsServer()
    server.udp = await UdpServer.bind("127.0.0.1", 0, server.handle)
    yield server
    server.udp.close()


def session_for(fake: FakeNtsServer, cookies: int = MAX_COOKIES, timeout: float = 2.0
                ) -> tuple[NtsSession, FakeKe]:
    assert fake.udp is not None
    ke = FakeKe(fake, fake.udp.address[1], cookies)
    return NtsSession("fake.example", 4460, key_exchange=ke, timeout=timeout), ke


async def test_authenticated_measurement_refills_cookie_jar(fake: FakeNtsServer) -> None:
    session, ke = session_for(fake, cookies=2)
    with session:
        first = await session.measure()
        assert first.authenticated and first.kernel_rx_timestamp
        assert first.stratum == 1 and first.reference_id == "TEST"
        assert abs(first.offset) < 0.05 and 0 <= first.delay < 0.5
        assert len(session.cookies) == MAX_COOKIES == first.cookies
        for _ in range(3):
            await session.measure()
            assert len(session.cookies) == MAX_COOKIES
    assert ke.calls == 1
    # One cookie left after spending one of two: 6 placeholders + the cookie
    # bring back 7; with a full jar, the spent cookie alone is replaced.
    assert fake.placeholders == [6, 0, 0, 0]


async def test_no_cookie_or_unique_id_is_ever_sent_twice(fake: FakeNtsServer) -> None:
    session, _ = session_for(fake)
    with session:
        for _ in range(12):  # more than a jar's worth
            await session.measure()
    assert len(set(fake.cookies_seen)) == len(fake.cookies_seen) == 12
    assert len(set(fake.unique_ids)) == 12
    assert all(len(u) == 32 for u in fake.unique_ids)


async def test_wire_transmit_timestamp_does_not_reveal_the_clock(fake: FakeNtsServer) -> None:
    session, _ = session_for(fake)
    with session:
        measurements = [await session.measure() for _ in range(4)]
    for m, xmt in zip(measurements, fake.transmit_ts, strict=True):
        assert abs(ntp_to_unix_ns(xmt, m.t1) - m.t1) > 10**9
    assert len(set(fake.transmit_ts)) == 4


async def test_tampered_responses_are_all_rejected_and_counted(fake: FakeNtsServer) -> None:
    fake.tamper = True
    session, _ = session_for(fake, timeout=0.3)
    with session, pytest.raises(NtsError, match=r"no valid NTS response.*rejected"):
        await session.measure()
    rejected = {k: v for k, v in session.stats.items() if k.startswith("rejected")}
    assert sum(rejected.values()) == 1
    assert "AEAD verification failed" in " ".join(rejected)


async def test_forged_copy_is_dropped_and_genuine_answer_used(fake: FakeNtsServer) -> None:
    fake.junk_first = True
    session, _ = session_for(fake)
    with session:
        m = await session.measure()
    assert m.authenticated
    assert sum(v for k, v in session.stats.items() if k.startswith("rejected")) == 1


async def test_nak_drops_cookies_and_redoes_key_exchange(fake: FakeNtsServer) -> None:
    session, ke = session_for(fake)
    with session:
        assert (await session.measure()).authenticated  # the keys have proven good ...
        fake.naks_left = 1  # ... then the server forgets them (a key rotation, a restart)
        m = await session.measure()
    assert m.authenticated
    assert ke.calls == 2
    assert session.stats["naks"] == 1
    assert len(session.cookies) == MAX_COOKIES


async def test_nak_right_after_key_exchange_backs_off_instead_of_another(
        fake: FakeNtsServer) -> None:
    # No authenticated answer since the last NTS-KE: a second one now would only
    # load the KE server (RFC 8915 s5.7); the caller's back-off takes over.
    fake.naks_left = 5
    session, ke = session_for(fake)
    with session, pytest.raises(NakBackoff, match="backing off"):
        await session.measure()
    assert ke.calls == 1 and session.stats["naks"] == 1 and session.cookies == []


async def test_a_session_can_be_bounded_in_key_exchanges(fake: FakeNtsServer) -> None:
    session, ke = session_for(fake, cookies=1)
    session.max_key_exchanges = 2
    fake.new_cookies = 0  # every answer leaves the jar empty: a KE per measurement
    with session:
        await session.measure()
        await session.measure()
        with pytest.raises(KeError, match="not another"):
            await session.measure()
    assert ke.calls == 2


async def test_cookie_consumption_is_reported_before_the_packet_leaves(
        fake: FakeNtsServer) -> None:
    session, _ = session_for(fake)
    assert fake.udp is not None
    seen: list[int] = []
    jar_at_spend: list[int] = []
    handler = fake.udp.handler

    def spy(data: bytes, addr: object, rx: int) -> object:
        seen.append(len(jar_at_spend))  # the spend was reported before this arrived
        return handler(data, addr, rx)

    fake.udp.handler = spy  # type: ignore[assignment]
    session.on_cookie_spent = lambda: jar_at_spend.append(len(session.cookies))
    with session:
        await session.measure()
        await session.measure()
    assert seen == [1, 2]
    assert jar_at_spend[0] == MAX_COOKIES - 1  # the cookie on its way is out of the jar


async def test_empty_jar_triggers_new_key_exchange(fake: FakeNtsServer) -> None:
    fake.new_cookies = 0
    session, ke = session_for(fake, cookies=1)
    with session:
        await session.measure()
        assert session.cookies == []
        await session.measure()
    assert ke.calls == 2


async def test_silence_gives_clear_timeout_error(fake: FakeNtsServer) -> None:
    assert fake.udp is not None
    fake.udp.handler = lambda data, addr, rx: None
    session, _ = session_for(fake, timeout=0.2)
    port = fake.udp.address[1]
    with session, pytest.raises(NtsError, match=rf"no NTS response from 127.0.0.1:{port} within"):
        await session.measure()


async def test_plain_session_measures_without_authentication() -> None:
    def plain(data: bytes, addr: Any, rx_ns: int) -> bytes:
        request = NtpHeader.unpack(data)
        return NtpHeader(
            mode=Mode.SERVER, stratum=2, reference_id=bytes([192, 0, 2, 1]),
            origin_ts=request.transmit_ts, receive_ts=unix_ns_to_ntp(rx_ns),
            transmit_ts=unix_ns_to_ntp(now_ns() + 2 * 10**9),
        ).pack()

    server = await UdpServer.bind("127.0.0.1", 0, plain)
    try:
        with PlainSession("127.0.0.1", server.address[1], timeout=2.0) as session:
            m = await session.measure()
    finally:
        server.close()
    assert not m.authenticated
    assert m.reference_id == "192.0.2.1"
    assert 0.9 < m.offset < 1.1  # server's transmit time is 2 s ahead: half shows as offset
