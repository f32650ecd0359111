"""Hostile input against a running ``ntspy serve``: it answers nothing it should not,
never answers with more bytes than it got, counts every packet it drops, and
keeps serving a well-behaved NTS client throughout.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ntspy.client.ke import KeResult
from ntspy.client.session import NtsSession
from ntspy.net.tls.trust import TrustConfig
from ntspy.proto import ke, nts
from ntspy.proto.aead import Aead
from ntspy.proto.ntp import HEADER_LEN, Mode, NtpHeader
from tests.conftest import ServerFactory
from tests.peers import ServerProc, ntp_client_packet, start_ntspy_server

LOOPBACK = "127.0.0.1"
DROP_COUNTERS = ("ntp_received", "ntp_malformed", "ntp_denied", "ntp_dropped")


@pytest.fixture(scope="module", params=["compiled", "pure-python"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProc]:
    # Both NTS-KE servers: the compiled engine and the asyncio fallback.
    proc = start_ntspy_server(
        tmp_path_factory.mktemp("hostile"), pure_python=request.param == "pure-python"
    )
    try:
        yield proc
    finally:
        proc.stop()


def good_session(server: ServerProc) -> NtsSession:
    trust = TrustConfig(use_system_store=False, extra=[server.certs.ca_cert])
    return NtsSession(LOOPBACK, server.ke_port, trust=trust, timeout=3.0)


async def assert_still_serving(server: ServerProc) -> None:
    with good_session(server) as session:
        m = await session.measure()
        assert m.authenticated


def delta(after: dict[str, int], before: dict[str, int], name: str) -> int:
    return after[name] - before[name]


# --- NTS-KE ------------------------------------------------------------------


def tls_client(
    server: ServerProc, alpn: bool = True, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(server.certs.ca_cert)
    if alpn:
        ctx.set_alpn_protocols([ke.ALPN_NTSKE.decode()])
    if max_version is not None:
        ctx.maximum_version = max_version
    raw = socket.create_connection((LOOPBACK, server.ke_port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname=LOOPBACK)


def read_until_closed(conn: ssl.SSLSocket, limit: int = 1 << 20) -> bytes:
    data = b""
    while len(data) < limit:
        try:
            chunk = conn.recv(65536)
        except (ssl.SSLError, ConnectionError):
            break
        if not chunk:
            break
        data += chunk
    return data


def error_code(response: bytes) -> int:
    records = ke.parse_records(response)
    assert records[-1].type == ke.RecordType.END_OF_MESSAGE
    errors = [r for r in records if r.type == ke.RecordType.ERROR]
    assert len(errors) == 1, records
    assert not any(r.type == ke.RecordType.NEW_COOKIE for r in records)
    return int.from_bytes(errors[0].body, "big")


def ke_exchange(server: ServerProc, payload: bytes, half_close: bool = False) -> bytes:
    with tls_client(server) as conn:
        conn.sendall(payload)
        if half_close:
            # Without this the server waits (up to its request timeout) for
            # the rest of a record that the garbage only began. The base class
            # method: SSLSocket.shutdown would drop TLS before we read the answer.
            socket.socket.shutdown(conn, socket.SHUT_WR)
        return read_until_closed(conn)


NTPV4 = ke.encode_record(ke.RecordType.NEXT_PROTOCOL, b"\x00\x00", critical=True)
SIV256 = ke.encode_record(ke.RecordType.AEAD_ALGORITHM, b"\x00\x0f", critical=True)
END = ke.encode_record(ke.RecordType.END_OF_MESSAGE, critical=True)


async def test_unknown_critical_record_gets_error_0(server: ServerProc) -> None:
    before = server.stats()
    unknown = ke.encode_record(0x1234, b"xx", critical=True)
    assert error_code(ke_exchange(server, NTPV4 + unknown + SIV256 + END)) == 0
    assert delta(server.stats(), before, "ke_errors") == 1
    await assert_still_serving(server)


async def test_missing_next_protocol_gets_error_1(server: ServerProc) -> None:
    assert error_code(ke_exchange(server, SIV256 + END)) == 1
    await assert_still_serving(server)


async def test_garbage_after_handshake_gets_no_cookies(server: ServerProc) -> None:
    before = server.stats()
    rng = random.Random(7)
    for _ in range(5):
        garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 600)))
        response = ke_exchange(server, garbage, half_close=True)
        assert error_code(response) in (0, 1)
    after = server.stats()
    assert delta(after, before, "ke_completed") == 0
    assert delta(after, before, "ke_errors") + delta(after, before, "ke_failed") == 5
    await assert_still_serving(server)


async def test_oversized_message_is_cut_off(server: ServerProc) -> None:
    before = server.stats()
    filler = ke.encode_record(0x0123, bytes(60000))  # non-critical, never ends
    with tls_client(server) as conn:
        sent = 0
        try:
            while sent < 4 * ke.MAX_MESSAGE_SIZE:
                conn.sendall(filler)
                sent += len(filler)
        except (ConnectionError, ssl.SSLError):
            pass  # the server hung up on us mid-send: what we want
        # Returns once the server closes; a server still waiting times out here.
        response = read_until_closed(conn)
        assert response == b"" or error_code(response) == 1
    after = server.stats()
    assert delta(after, before, "ke_completed") == 0
    assert delta(after, before, "ke_errors") + delta(after, before, "ke_failed") == 1
    await assert_still_serving(server)


@pytest.mark.parametrize(
    ("alpn", "max_version"), [(False, None), (True, ssl.TLSVersion.TLSv1_2)]
)
async def test_tls_without_alpn_or_tls13_is_refused(
    server: ServerProc, alpn: bool, max_version: ssl.TLSVersion | None
) -> None:
    before = server.stats()
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        tls_client(server, alpn=alpn, max_version=max_version) as conn,
    ):
        conn.sendall(NTPV4 + SIV256 + END)
        if not read_until_closed(conn):
            raise ConnectionResetError("closed without an answer")
    after = server.stats()
    assert delta(after, before, "ke_completed") == 0
    assert delta(after, before, "ke_failed") == 1
    await assert_still_serving(server)


# --- NTP over UDP ------------------------------------------------------------


def udp_socket(bind: str = LOOPBACK) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind, 0))
    s.setblocking(False)
    return s


def drain(s: socket.socket) -> list[bytes]:
    got: list[bytes] = []
    while True:
        try:
            got.append(s.recv(4096))
        except BlockingIOError:
            return got


def send_all(server: ServerProc, packets: list[bytes], bind: str = LOOPBACK) -> list[bytes]:
    """Send each packet, paced so the server's socket buffer never overflows.

    Returns the answers; asserts every answer is no larger than its request.
    """
    answers: list[bytes] = []
    with udp_socket(bind) as s:
        for i in range(0, len(packets), 50):
            batch = packets[i : i + 50]
            for p in batch:
                s.sendto(p, (LOOPBACK, server.ntp_port))
            time.sleep(0.01)
            answers += drain(s)
            # Answers are matched to requests by the echoed transmit timestamp.
        time.sleep(0.2)
        answers += drain(s)
    by_xmt = {p[40:48]: len(p) for p in packets if len(p) >= HEADER_LEN}
    for a in answers:
        assert len(a) >= HEADER_LEN
        assert len(a) <= by_xmt[a[24:32]], "amplification: answer larger than request"
    return answers


def wait_counted(server: ServerProc, before: dict[str, int], expected: int) -> dict[str, int]:
    deadline = time.monotonic() + 3
    while True:
        after = server.stats()
        if sum(delta(after, before, n) for n in DROP_COUNTERS) >= expected:
            return after
        if time.monotonic() > deadline:
            return after
        time.sleep(0.05)


async def test_garbage_datagrams_are_counted_and_never_amplified(server: ServerProc) -> None:
    rng = random.Random(1)
    packets = []
    for _ in range(3000):
        n = rng.randrange(0, 1501)
        p = bytearray(rng.randbytes(n))
        if n >= HEADER_LEN:
            p[40:48] = os.urandom(8)  # a unique transmit timestamp to match answers
        packets.append(bytes(p))
    before = server.stats()
    answers = send_all(server, packets)
    after = wait_counted(server, before, len(packets))
    counted = {n: delta(after, before, n) for n in DROP_COUNTERS}
    assert sum(counted.values()) == len(packets), counted
    assert counted["ntp_received"] == len(answers)
    assert counted["ntp_malformed"] > 0
    await assert_still_serving(server)


async def fresh_ke(server: ServerProc) -> KeResult:
    with good_session(server) as session:
        return await session.key_exchange()


def nts_request(result: KeResult, cookie: bytes, c2s_key: bytes | None = None) -> bytes:
    header = NtpHeader(mode=Mode.CLIENT, transmit_ts=int.from_bytes(os.urandom(8), "big"))
    c2s = Aead(result.aead_id, c2s_key or result.c2s)
    nonce = os.urandom(c2s.nonce_length)
    return nts.build_request(header, os.urandom(32), cookie, 1, c2s, nonce)


async def test_truncated_extension_fields_are_dropped(server: ServerProc) -> None:
    result = await fresh_ke(server)
    good = nts_request(result, result.cookies[0])
    # Cut inside the first EF header, inside its body, and inside the authenticator
    # (not 20 or 24 bytes after the header: that reads as a legacy MAC, RFC 7822).
    cuts = [HEADER_LEN + 2, HEADER_LEN + 28, len(good) - 10, len(good) - 1]
    packets = [good[:c] for c in cuts]
    before = server.stats()
    answers = send_all(server, packets)
    after = wait_counted(server, before, len(packets))
    assert answers == []
    assert delta(after, before, "ntp_malformed") == len(packets)
    assert delta(after, before, "nts_authenticated") == 0
    await assert_still_serving(server)


async def test_forged_cookies_get_an_nts_nak(server: ServerProc) -> None:
    result = await fresh_ke(server)
    cookie_len = len(result.cookies[0])
    packets = [nts_request(result, os.urandom(cookie_len)) for _ in range(20)]
    # A real cookie with the wrong key fails authentication the same way.
    packets.append(nts_request(result, result.cookies[1], os.urandom(len(result.c2s))))
    before = server.stats()
    answers = send_all(server, packets)
    assert len(answers) == len(packets)
    for a in answers:
        header = NtpHeader.unpack(a)
        assert header.stratum == 0 and header.reference_id == b"NTSN"
    after = server.stats()
    assert delta(after, before, "nts_naks") == len(packets)
    assert delta(after, before, "nts_authenticated") == 0
    await assert_still_serving(server)


async def test_denied_address_gets_nothing_and_is_counted(server: ServerProc) -> None:
    before = server.stats()
    packets = [ntp_client_packet() for _ in range(25)]
    answers = send_all(server, packets, bind="127.0.0.2")
    after = wait_counted(server, before, len(packets))
    assert answers == []
    assert delta(after, before, "ntp_denied") == len(packets)
    assert delta(after, before, "ntp_received") == 0
    await assert_still_serving(server)


async def test_rate_limit_sends_rate_kisses_and_counts_drops(
    ntspy_server_factory: ServerFactory,
) -> None:
    limited = ntspy_server_factory(extra_lines=["ratelimit interval 0 burst 2 leak 1"])
    packets = [ntp_client_packet() for _ in range(20)]
    before = limited.stats()
    with udp_socket() as s:
        for p in packets:
            s.sendto(p, (LOOPBACK, limited.ntp_port))
        time.sleep(0.3)
        answers = drain(s)
    kisses = [a for a in answers if a[1] == 0 and a[12:16] == b"RATE"]
    after = wait_counted(limited, before, len(packets))
    assert len(kisses) >= 5
    assert delta(after, before, "ntp_rate_kod") == len(kisses)
    assert delta(after, before, "ntp_dropped") == len(packets) - len(answers)
    assert delta(after, before, "ntp_dropped") >= 5
    for a in answers:
        assert len(a) <= HEADER_LEN


async def test_connections_over_the_limit_are_dropped_and_counted(
    ntspy_server_factory: ServerFactory,
) -> None:
    capped = ntspy_server_factory(extra_lines=["maxntsconnections 2"])
    before = capped.stats()
    held = [socket.create_connection((LOOPBACK, capped.ke_port)) for _ in range(2)]
    try:
        time.sleep(0.2)
        with (
            socket.create_connection((LOOPBACK, capped.ke_port), timeout=3) as extra,
            pytest.raises(ConnectionError),
        ):
            if extra.recv(1) == b"":
                raise ConnectionResetError("closed")
        assert delta(capped.stats(), before, "ke_dropped") == 1
    finally:
        for s in held:
            s.close()
    # The held connections end with a failed handshake, freeing their slots.
    deadline = time.monotonic() + 3
    while capped.stats()["ke_failed"] - before["ke_failed"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    await assert_still_serving(capped)
    assert delta(capped.stats(), before, "ke_completed") == 1


def test_server_never_answers_a_runt_from_itself(tmp_path: Path) -> None:
    """A spoofed 'request' in server mode (reflection attempt) is not answered."""
    server = start_ntspy_server(tmp_path)
    try:
        p = bytearray(ntp_client_packet())
        p[0] = 0x24  # version 4, mode 4 (server)
        before = server.stats()
        assert send_all(server, [bytes(p)]) == []
        assert delta(wait_counted(server, before, 1), before, "ntp_malformed") == 1
    finally:
        server.stop()
