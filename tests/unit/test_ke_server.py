"""The NTS-KE server protocol over loopback: every way a connection can end is
answered as RFC 8915 wants and lands in exactly one counter.

Every test runs twice: on the compiled engine (``ntspy._ke``, what ``ntspy
serve`` uses when it is built) and on the pure-Python asyncio fallback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ntspy.certs import CertPaths, make_test_pki
from ntspy.client.ke import key_exchange
from ntspy.net.tls.credentials import HAVE_NATIVE_KE, ServerContexts
from ntspy.net.tls.trust import TrustConfig
from ntspy.proto import ke
from ntspy.proto.aead import AeadId
from ntspy.proto.cookies import MASTER_KEY_LEN, KeyRing, MasterKey
from ntspy.server.ke_server import KeServer
from ntspy.server.negotiation import COOKIES_PER_KE, KePolicy
from ntspy.server.stats import ServerStats, StatsTable

LOOPBACK = "127.0.0.1"
OUTCOMES = ("ke_completed", "ke_errors", "ke_failed")
COUNTERS = ("ke_accepted", "ke_dropped", *OUTCOMES,
            "ke_timeouts", "ke_drop_full", "ke_drop_client", "ke_drop_rate")
REQUEST = ke.build_client_request([AeadId.AES_SIV_CMAC_256])


_BACKEND = {"native": True}
# The compiled engine where it is built and enabled (test_accel fails where it
# could be built and is not); the asyncio path always.
BACKENDS = ["compiled", "asyncio"] if HAVE_NATIVE_KE else ["asyncio"]


@pytest.fixture(autouse=True, params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Which implementation the test's servers use."""
    _BACKEND["native"] = request.param == "compiled"
    return str(request.param)


def make_server(contexts: ServerContexts, stats: ServerStats, **kwargs: Any) -> KeServer:
    ring = KeyRing([MasterKey(1, os.urandom(MASTER_KEY_LEN), 0)])
    server = KeServer(contexts, ring, KePolicy([AeadId.AES_SIV_CMAC_256]), stats,
                      use_native=_BACKEND["native"], **kwargs)
    assert server.native == _BACKEND["native"]
    return server


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_test_pki(tmp_path_factory.mktemp("ke-server-pki"))


class Running:
    def __init__(self, server: KeServer, stats: ServerStats, pki: CertPaths) -> None:
        self.server = server
        self.stats = stats
        self.pki = pki
        self.port = server.addresses[0][1]

    def counts(self) -> dict[str, int]:
        return {name: self.stats.get(name) for name in COUNTERS}

    async def settled(self, connections: int = 1) -> dict[str, int]:
        """The counters once ``connections`` connections were taken in or
        dropped and every one taken in has its outcome (the compiled engine
        counts on a thread of its own, maybe after the client saw the end)."""
        for _ in range(300):
            c = self.counts()
            if (
                c["ke_accepted"] + c["ke_dropped"] >= connections
                and sum(c[n] for n in OUTCOMES) == c["ke_accepted"]
                and self.server.active == 0
            ):
                return c
            await asyncio.sleep(0.01)
        return self.counts()

    def client_context(self, alpn: bool = True, tls12: bool = False) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.pki.ca_cert)
        if alpn:
            ctx.set_alpn_protocols([ke.ALPN_NTSKE.decode()])
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def tls(
        self, alpn: bool = True, tls12: bool = False, source: str | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            LOOPBACK, self.port, ssl=self.client_context(alpn, tls12), server_hostname="localhost",
            local_addr=(source, 0) if source else None,
        )


@contextlib.asynccontextmanager
async def ke_server(pki: CertPaths, **kwargs: Any) -> AsyncIterator[Running]:
    stats = StatsTable().row()
    contexts = ServerContexts([(pki.server_cert, pki.server_key)], datetime.now(UTC))
    server = make_server(contexts, stats, **kwargs)
    await server.start(LOOPBACK, 0)
    try:
        yield Running(server, stats, pki)
    finally:
        await server.close()


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes (a reset counts as the end)."""
    try:
        return await asyncio.wait_for(reader.read(), 5.0)
    except (ConnectionError, ssl.SSLError):
        return b""


def expect(counts: dict[str, int], **nonzero: int) -> None:
    assert counts == {name: nonzero.get(name, 0) for name in COUNTERS}


def error_code(response: bytes) -> int:
    records = ke.parse_records(response)
    errors = [r for r in records if r.type == ke.RecordType.ERROR]
    assert len(errors) == 1 and not any(r.type == ke.RecordType.NEW_COOKIE for r in records)
    return int.from_bytes(errors[0].body, "big")


async def test_good_exchange_gets_cookies(pki: CertPaths) -> None:
    async with ke_server(pki) as srv:
        reader, writer = await srv.tls()
        writer.write(REQUEST)
        response = await read_all(reader)
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        writer.close()
        got = ke.parse_server_response(ke.parse_records(response), [AeadId.AES_SIV_CMAC_256])
        assert got.aead == AeadId.AES_SIV_CMAC_256
        assert len(got.cookies) == COOKIES_PER_KE
        expect(await srv.settled(), ke_accepted=1, ke_completed=1)


async def test_request_split_across_many_writes(pki: CertPaths) -> None:
    async with ke_server(pki) as srv:
        reader, writer = await srv.tls()
        for i in range(len(REQUEST)):
            writer.write(REQUEST[i : i + 1])
            await writer.drain()
        response = await read_all(reader)
        writer.close()
        assert len(ke.parse_server_response(ke.parse_records(response), [15]).cookies) == 8
        expect(await srv.settled(), ke_accepted=1, ke_completed=1)


async def test_client_without_alpn_is_refused(pki: CertPaths) -> None:
    async with ke_server(pki) as srv:
        reader, writer = await srv.tls(alpn=False)
        writer.write(REQUEST)
        assert await read_all(reader) == b""
        writer.close()
        expect(await srv.settled(), ke_accepted=1, ke_failed=1)


async def test_tls12_client_is_refused(pki: CertPaths) -> None:
    async with ke_server(pki) as srv:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await srv.tls(tls12=True)
        expect(await srv.settled(), ke_accepted=1, ke_failed=1)


async def test_both_back_ends_say_the_same_for_the_same_ending(
        pki: CertPaths, caplog: pytest.LogCaptureFixture) -> None:
    """One outcome table (KeEnd, end_message): a wrong ALPN, no ALPN, TLS 1.2, a
    hang-up mid-handshake and a timeout read the same in either back end."""
    caplog.set_level("INFO", logger="ntspy.server.ke")
    async with ke_server(pki, session_timeout=0.5) as srv:
        ctx = srv.client_context(alpn=False)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection(LOOPBACK, srv.port, ssl=ctx,
                                          server_hostname="localhost")
        reader, writer = await srv.tls(alpn=False)
        assert await read_all(reader) == b""
        writer.close()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await srv.tls(tls12=True)
        _, writer = await asyncio.open_connection(LOOPBACK, srv.port)
        writer.write(b"\x16\x03\x01\x00\x05")
        writer.close()
        reader, writer = await asyncio.open_connection(LOOPBACK, srv.port)
        assert await read_all(reader) == b""  # silent: the session deadline
        writer.close()
        expect(await srv.settled(5), ke_accepted=5, ke_failed=5, ke_timeouts=1)
    said = [r.getMessage().split(": ", 1)[1] for r in caplog.records
            if r.getMessage().startswith("NTS-KE from ")]
    wanted = ["client offered ALPN h2, http/1.1, not ntske/1", "did not offer ALPN ntske/1",
              "does not speak TLS 1.3", "client closed the connection during the TLS handshake",
              "NTS-KE session timed out after 0.5 s in the TLS handshake"]
    for words in wanted:
        assert any(words in line for line in said), (words, said)


def half_closed_exchange(srv: Running, payload: bytes) -> bytes:
    """Send ``payload``, end our direction of TCP, read the answer (blocking)."""
    ctx = srv.client_context()
    with (
        socket.create_connection((LOOPBACK, srv.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        conn.sendall(payload)
        # The plain socket's shutdown: SSLSocket.shutdown would end TLS as well.
        socket.socket.shutdown(conn, socket.SHUT_WR)
        data = b""
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            while chunk := conn.recv(65536):
                data += chunk
        return data


async def test_garbage_after_handshake_gets_bad_request(pki: CertPaths) -> None:
    async with ke_server(pki) as srv:
        # The garbage begins a record that never ends before the client's EOF.
        response = await asyncio.to_thread(half_closed_exchange, srv, b"hello, not NTS-KE")
        assert error_code(response) == ke.ErrorCode.BAD_REQUEST
        expect(await srv.settled(), ke_accepted=1, ke_errors=1)


async def test_unknown_critical_record_gets_unrecognized_critical(pki: CertPaths) -> None:
    unknown = ke.encode_record(0x1234, b"xx", critical=True)
    async with ke_server(pki) as srv:
        reader, writer = await srv.tls()
        writer.write(unknown + REQUEST)
        response = await read_all(reader)
        writer.close()
        assert error_code(response) == ke.ErrorCode.UNRECOGNIZED_CRITICAL_RECORD
        expect(await srv.settled(), ke_accepted=1, ke_errors=1)


async def test_oversized_message_is_refused_without_waiting_for_its_end(pki: CertPaths) -> None:
    filler = ke.encode_record(0x0123, bytes(60000))  # non-critical, and no End of Message
    async with ke_server(pki) as srv:
        reader, writer = await srv.tls()
        writer.write(filler + filler)
        response = await read_all(reader)
        writer.close()
        assert error_code(response) == ke.ErrorCode.BAD_REQUEST
        expect(await srv.settled(), ke_accepted=1, ke_errors=1)


async def test_silent_client_hits_the_session_deadline(pki: CertPaths) -> None:
    async with ke_server(pki, session_timeout=0.2) as srv:
        reader, writer = await asyncio.open_connection(LOOPBACK, srv.port)
        started = asyncio.get_running_loop().time()
        assert await read_all(reader) == b""
        assert asyncio.get_running_loop().time() - started < 3
        writer.close()
        expect(await srv.settled(), ke_accepted=1, ke_failed=1, ke_timeouts=1)


async def test_client_without_request_hits_the_session_deadline(pki: CertPaths) -> None:
    async with ke_server(pki, session_timeout=0.5) as srv:
        reader, writer = await srv.tls()
        writer.write(REQUEST[:5])  # a request that never completes
        started = asyncio.get_running_loop().time()
        assert await read_all(reader) == b""
        assert asyncio.get_running_loop().time() - started < 3
        writer.close()
        expect(await srv.settled(), ke_accepted=1, ke_failed=1, ke_timeouts=1)


async def test_the_deadline_covers_the_whole_session(pki: CertPaths) -> None:
    """A client that keeps each phase short but trickles its request one byte at a
    time is cut when the session's time is up, not given a fresh timeout per phase."""
    async with ke_server(pki, session_timeout=1.0) as srv:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await srv.tls()  # the handshake: well inside the second
        writer.write(b"\x80\x01\x03\xe8")  # a record announcing 1000 bytes of body
        ended = None
        while loop.time() - started < 4:
            try:
                writer.write(b"\x00")  # one more byte of it, every 0.1 s
                await writer.drain()
                ended = await asyncio.wait_for(reader.read(1), 0.1)
            except TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError):
                ended = b""
            break
        elapsed = loop.time() - started
        writer.close()
        assert ended == b"", "the server must end the session, not answer a partial request"
        assert 0.9 < elapsed < 2.5, elapsed
        expect(await srv.settled(), ke_accepted=1, ke_failed=1, ke_timeouts=1)


def _timed_out_ending(port: int, ca: Path) -> str:
    """How a timed-out session ends for the client: 'close_notify' or 'no close_notify'."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["ntske/1"])
    with socket.create_connection((LOOPBACK, port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost",
                            suppress_ragged_eofs=False) as tls:
        tls.sendall(REQUEST[:5])
        try:
            return "close_notify" if tls.recv(100) == b"" else "data"
        except ssl.SSLEOFError:
            return "no close_notify"


async def test_both_back_ends_end_a_timed_out_session_with_close_notify(
        pki: CertPaths) -> None:
    async with ke_server(pki, session_timeout=0.5) as srv:
        ending = await asyncio.to_thread(_timed_out_ending, srv.port, pki.ca_cert)
        assert ending == "close_notify"
        expect(await srv.settled(), ke_accepted=1, ke_failed=1, ke_timeouts=1)


async def test_one_client_holds_only_its_share_and_others_are_served(pki: CertPaths) -> None:
    """ntsclientconnections: a client's connections over its share are dropped at the
    door (counted by reason) while another address still completes NTS-KE."""
    async with ke_server(pki, client_connections=2, session_timeout=30) as srv:
        held = [await asyncio.open_connection(LOOPBACK, srv.port) for _ in range(2)]
        await asyncio.sleep(0.05)
        reader, extra = await asyncio.open_connection(LOOPBACK, srv.port)
        assert await read_all(reader) == b""  # the third: dropped
        extra.close()
        # Another client (127.0.0.2) is served while 127.0.0.1 holds its two.
        reader, writer = await srv.tls(source="127.0.0.2")
        writer.write(REQUEST)
        assert ke.parse_records(await read_all(reader))
        writer.close()
        for _, w in held:
            w.close()
        expect(await srv.settled(4), ke_accepted=3, ke_dropped=1, ke_drop_client=1,
               ke_failed=2, ke_completed=1)
        # The share is free again once they are gone.
        reader, writer = await srv.tls()
        writer.write(REQUEST)
        assert ke.parse_records(await read_all(reader))
        writer.close()


async def test_client_hanging_up_mid_handshake_is_counted(pki: CertPaths) -> None:
    async with ke_server(pki) as srv:
        _, writer = await asyncio.open_connection(LOOPBACK, srv.port)
        writer.write(b"\x16\x03\x01\x00\x05")  # the start of a ClientHello record
        writer.close()
        expect(await srv.settled(), ke_accepted=1, ke_failed=1)


async def test_connections_over_the_cap_are_dropped(pki: CertPaths) -> None:
    async with ke_server(pki, max_connections=1) as srv:
        _, held = await asyncio.open_connection(LOOPBACK, srv.port)
        await asyncio.sleep(0.05)
        reader, extra = await asyncio.open_connection(LOOPBACK, srv.port)
        assert await read_all(reader) == b""
        extra.close()
        held.close()
        settled = await srv.settled(2)
        assert (settled["ke_dropped"], settled["ke_drop_full"], settled["ke_failed"]) == (1, 1, 1)
        # The slot is free again: a real client gets its cookies.
        reader, writer = await srv.tls()
        writer.write(REQUEST)
        assert ke.parse_records(await read_all(reader))
        writer.close()
        expect(await srv.settled(3), ke_accepted=2, ke_dropped=1, ke_drop_full=1, ke_failed=1,
               ke_completed=1)


async def test_close_cuts_open_connections_and_counts_them(pki: CertPaths) -> None:
    async with ke_server(pki) as srv:
        reader, writer = await srv.tls()
        await asyncio.sleep(0.05)
        await srv.server.close()
        assert await read_all(reader) == b""
        writer.close()
        expect(srv.counts(), ke_accepted=1, ke_failed=1)
        assert srv.server.active == 0


async def test_sni_selects_the_matching_certificate(pki: CertPaths, tmp_path: Path) -> None:
    other = make_test_pki(tmp_path / "other", hostnames=("other.test",), ips=())
    stats = StatsTable().row()
    contexts = ServerContexts(
        [(pki.server_cert, pki.server_key), (other.server_cert, other.server_key)],
        datetime.now(UTC),
    )
    server = make_server(contexts, stats)
    await server.start(LOOPBACK, 0)
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(other.ca_cert)
        ctx.set_alpn_protocols(["ntske/1"])
        reader, writer = await asyncio.open_connection(
            LOOPBACK, server.addresses[0][1], ssl=ctx, server_hostname="other.test"
        )
        writer.write(REQUEST)
        assert len(ke.parse_records(await read_all(reader))) > COOKIES_PER_KE
        writer.close()
    finally:
        await server.close()
    assert stats.get("ke_completed") == 1


async def test_cookies_carry_the_keys_the_client_derived(pki: CertPaths) -> None:
    # The server's TLS exporter (RFC 8915 s5.1) must give the client's keys.
    async with ke_server(pki) as srv:
        trust = TrustConfig(use_system_store=False, extra=[pki.ca_cert])
        result = await key_exchange(LOOPBACK, srv.port, trust=trust, server_name="localhost",
                                    aeads=[AeadId.AES_SIV_CMAC_256])
        ring = srv.server.keyring
        for cookie in result.cookies:
            keys = ring.open(cookie)
            assert (keys.aead_id, keys.c2s, keys.s2c) == (result.aead_id, result.c2s, result.s2c)
        assert len({ring.open(c).c2s for c in result.cookies}) == 1
        assert len(set(result.cookies)) == COOKIES_PER_KE  # a fresh nonce in each
        expect(await srv.settled(), ke_accepted=1, ke_completed=1)


async def test_server_picks_aes128_gcm_whatever_the_client_prefers(pki: CertPaths) -> None:
    async with ke_server(pki) as srv:
        reader, writer = await srv.tls()  # Python's ssl lists AES-256-GCM first
        assert writer.get_extra_info("cipher")[0] == "TLS_AES_128_GCM_SHA256"
        writer.write(REQUEST)
        assert ke.parse_records(await read_all(reader))
        writer.close()


@pytest.mark.parametrize("group", ["X25519", "prime256v1", "secp384r1"])
async def test_a_client_offering_a_single_group_is_served(pki: CertPaths, group: str) -> None:
    # P-384 alone means a HelloRetryRequest from a server preferring X25519.
    async with ke_server(pki) as srv:
        ctx = srv.client_context()
        ctx.set_ecdh_curve(group)
        reader, writer = await asyncio.open_connection(
            LOOPBACK, srv.port, ssl=ctx, server_hostname="localhost"
        )
        writer.write(REQUEST)
        response = await read_all(reader)
        writer.close()
        got = ke.parse_server_response(ke.parse_records(response), [AeadId.AES_SIV_CMAC_256])
        assert len(got.cookies) == COOKIES_PER_KE
        expect(await srv.settled(), ke_accepted=1, ke_completed=1)


async def test_reloaded_certificates_serve_the_next_connections(
    pki: CertPaths, tmp_path: Path
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    other = make_test_pki(tmp_path / "other", hostnames=("other.test",), ips=())
    stats = StatsTable().row()
    contexts = ServerContexts([(cert, key)], datetime.now(UTC))
    server = make_server(contexts, stats)
    await server.start(LOOPBACK, 0)
    port = server.addresses[0][1]
    try:
        cert.write_bytes(other.server_cert.read_bytes())  # what SIGHUP does
        key.write_bytes(other.server_key.read_bytes())
        contexts.reload(datetime.now(UTC))
        server.certificates_reloaded()
        trust = TrustConfig(use_system_store=False, extra=[other.ca_cert])
        result = await key_exchange(LOOPBACK, port, trust=trust, server_name="other.test",
                                    aeads=[AeadId.AES_SIV_CMAC_256])
        assert len(result.cookies) == COOKIES_PER_KE
    finally:
        await server.close()
    assert stats.get("ke_completed") == 1


# A KeServer in a process of its own whose descriptor limit leaves room for
# only three connections; stdin closing ends it.
_FD_STARVED_SERVER = textwrap.dedent("""
    import asyncio, os, resource, sys
    from datetime import UTC, datetime
    from pathlib import Path
    from ntspy.net.tls.credentials import ServerContexts
    from ntspy.proto.aead import AeadId
    from ntspy.proto.cookies import KeyRing, MasterKey
    from ntspy.server.ke_server import KeServer
    from ntspy.server.negotiation import KePolicy
    from ntspy.server.stats import StatsTable

    async def main():
        cert, key, native = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
        contexts = ServerContexts([(cert, key)], datetime.now(UTC))
        server = KeServer(contexts, KeyRing([MasterKey(1, os.urandom(32), 0)]),
                          KePolicy([AeadId.AES_SIV_CMAC_256]), StatsTable().row(),
                          session_timeout=60, use_native=native)
        assert server.native == native
        await server.start("127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.add_reader(0, lambda: done.done() or done.set_result(None))
        open_fds = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds + 3, open_fds + 3))
        print(server.addresses[0][1], flush=True)
        await done
        await server.close()

    asyncio.run(main())
""")


async def test_running_out_of_descriptors_does_not_stop_the_server(
    pki: CertPaths, backend: str
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _FD_STARVED_SERVER, str(pki.server_cert), str(pki.server_key),
         "1" if backend == "compiled" else "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        port = int(await asyncio.to_thread(proc.stdout.readline))
        # Ten silent connections: three fit, then accept() fails with EMFILE.
        held = [socket.create_connection((LOOPBACK, port)) for _ in range(10)]
        await asyncio.sleep(0.5)
        assert proc.poll() is None
        for conn in held:
            conn.close()
        # Once descriptors are free again (the pause after EMFILE is 1 s), it serves.
        trust = TrustConfig(use_system_store=False, extra=[pki.ca_cert])
        deadline = time.monotonic() + 10
        while True:
            try:
                result = await key_exchange(LOOPBACK, port, trust=trust, server_name="localhost",
                                            aeads=[AeadId.AES_SIV_CMAC_256], timeout=3)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert len(result.cookies) == COOKIES_PER_KE
        assert proc.poll() is None
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    log = proc.stderr.read().decode(errors="replace")
    assert proc.returncode == 0, log
    assert "Traceback" not in log
