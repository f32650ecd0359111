"""TLS 1.3 adapter for NTS-KE, over loopback with throwaway certificates."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import SSL

from ntspy.certs import CertPaths, make_self_signed, make_test_pki
from ntspy.errors import CertificateError, KeConnectionError, NtsError, TlsError
from ntspy.net.tls import (
    ServerContexts,
    TlsStream,
    TrustConfig,
    certificate_matches,
    client_context,
    server_context,
)

LABEL = b"EXPORTER-network-time-security"  # RFC 8915 s5.1
C2S = bytes([0, 0, 0, 15, 0])  # NTPv4, AES-SIV-CMAC-256, client-to-server
S2C = bytes([0, 0, 0, 15, 1])

Handler = Callable[[TlsStream], Awaitable[None]]
Outcomes = asyncio.Queue[TlsStream | NtsError | str]


async def echo(stream: TlsStream) -> None:
    """Echo until the client closes, then report a clean end of stream."""
    while data := await stream.recv(timeout=5.0):
        await stream.send(data)


@contextlib.asynccontextmanager
async def tls_server(
    ctx: SSL.Context | ServerContexts, handler: Handler = echo
) -> AsyncIterator[tuple[int, Outcomes]]:
    """A loopback server: the queue gets the accepted stream (or the accept
    error), then "done" once the handler returned."""
    outcomes: Outcomes = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            stream = await TlsStream.accept(reader, writer, ctx, handshake_timeout=5.0)
        except NtsError as e:
            await outcomes.put(e)
            return
        await outcomes.put(stream)
        try:
            await handler(stream)
            await outcomes.put("done")
        finally:
            await stream.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], outcomes
    finally:
        server.close()
        await server.wait_closed()
        # Let every connection finish (Python 3.11's wait_closed does not).
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5.0)
            assert not pending, "a server connection did not finish"


async def next_outcome(outcomes: Outcomes) -> TlsStream | NtsError:
    """The next accepted stream or accept error, skipping ends of earlier sessions."""
    while True:
        outcome = await asyncio.wait_for(outcomes.get(), 5.0)
        if not isinstance(outcome, str):
            return outcome


async def server_stream(outcomes: Outcomes) -> TlsStream:
    outcome = await next_outcome(outcomes)
    assert isinstance(outcome, TlsStream), outcome
    return outcome


async def server_error(outcomes: Outcomes) -> NtsError:
    outcome = await next_outcome(outcomes)
    assert isinstance(outcome, NtsError), outcome
    return outcome


def trust(*paths: Path, no_cert_time_check: bool = False) -> TrustConfig:
    return TrustConfig(
        use_system_store=False, extra=list(paths), no_cert_time_check=no_cert_time_check
    )


@pytest.fixture
def pki(tmp_path: Path) -> CertPaths:
    return make_test_pki(tmp_path / "pki")


async def connect(port: int, cfg: TrustConfig, server_name: str = "localhost") -> TlsStream:
    return await TlsStream.connect("127.0.0.1", port, server_name=server_name, trust=cfg)


def san_dns(cert: x509.Certificate | None) -> list[str]:
    assert cert is not None
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


# --- a good session ---------------------------------------------------------------


async def test_handshake_is_tls13_with_ntske_alpn_and_both_sides_export_the_same_keys(
    pki: CertPaths,
) -> None:
    async with tls_server(server_context(pki.server_cert, pki.server_key)) as (port, outcomes):
        client = await connect(port, trust(pki.ca_cert))
        server = await server_stream(outcomes)

        assert client.protocol_version == server.protocol_version == "TLSv1.3"
        assert client.alpn == server.alpn == b"ntske/1"
        assert server.server_name == "localhost"  # the SNI the client sent
        assert "localhost" in san_dns(client.peer_certificate)

        c2s = client.export_keying_material(LABEL, 32, C2S)
        s2c = client.export_keying_material(LABEL, 32, S2C)
        assert len(c2s) == 32
        assert server.export_keying_material(LABEL, 32, C2S) == c2s
        assert server.export_keying_material(LABEL, 32, S2C) == s2c
        assert c2s != s2c  # the direction byte matters
        long_key = client.export_keying_material(LABEL, 64, C2S)  # AES-SIV-CMAC-512
        assert len(long_key) == 64
        assert server.export_keying_material(LABEL, 64, C2S) == long_key
        await client.close()


async def test_exports_differ_between_sessions(pki: CertPaths) -> None:
    async with tls_server(server_context(pki.server_cert, pki.server_key)) as (port, _):
        first = await connect(port, trust(pki.ca_cert))
        second = await connect(port, trust(pki.ca_cert))
        assert first.export_keying_material(LABEL, 32, C2S) != second.export_keying_material(
            LABEL, 32, C2S
        )
        await first.close()
        await second.close()


async def test_data_round_trip_and_clean_end_of_stream(pki: CertPaths) -> None:
    payload = bytes(range(256)) * 200  # 51200 bytes: several TLS records
    async with tls_server(server_context(pki.server_cert, pki.server_key)) as (port, outcomes):
        client = await connect(port, trust(pki.ca_cert))
        await client.send(payload)
        echoed = b""
        while len(echoed) < len(payload):
            chunk = await client.recv(timeout=5.0)
            assert chunk, "stream ended early"
            echoed += chunk
        assert echoed == payload
        await client.close()
        assert isinstance(await outcomes.get(), TlsStream)
        # The server's recv saw our close_notify as end of stream.
        assert await asyncio.wait_for(outcomes.get(), 5.0) == "done"


async def test_client_sees_end_of_stream_after_server_response(pki: CertPaths) -> None:
    async def answer_once(stream: TlsStream) -> None:
        await stream.recv(timeout=5.0)
        await stream.send(b"response")
        await stream.close()

    ctx = server_context(pki.server_cert, pki.server_key)
    async with tls_server(ctx, answer_once) as (port, _):
        client = await connect(port, trust(pki.ca_cert))
        await client.send(b"request")
        assert await client.recv(timeout=5.0) == b"response"
        assert await client.recv(timeout=5.0) == b""
        await client.close()
        await client.close()  # a second close is harmless


async def test_recv_timeout(pki: CertPaths) -> None:
    async def silent(stream: TlsStream) -> None:
        await stream.recv(timeout=5.0)

    async with tls_server(server_context(pki.server_cert, pki.server_key), silent) as (port, _):
        client = await connect(port, trust(pki.ca_cert))
        with pytest.raises(KeConnectionError, match=re.escape("sent nothing for 0.2 s")):
            await client.recv(timeout=0.2)
        await client.close()


async def test_reusing_one_client_context(pki: CertPaths) -> None:
    ctx = client_context(trust(pki.ca_cert))
    async with tls_server(server_context(pki.server_cert, pki.server_key)) as (port, _):
        for _ in range(2):
            stream = await TlsStream.connect("127.0.0.1", port, server_name="localhost", trust=ctx)
            await stream.close()
        with pytest.raises(CertificateError, match=re.escape("does not match name other.example")):
            await TlsStream.connect("127.0.0.1", port, server_name="other.example", trust=ctx)


# --- ALPN and protocol version ------------------------------------------------------


async def _handshake_with(ctx: SSL.Context, port: int) -> TlsStream:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return await TlsStream.handshake_client(
        reader,
        writer,
        ctx,
        server_name="localhost",
        host="127.0.0.1",
        port=port,
        handshake_timeout=5.0,
    )


def _foreign_client_context(
    pki: CertPaths, alpn: list[bytes] | None, max_version: int = SSL.TLS1_3_VERSION
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_max_proto_version(max_version)
    if alpn is not None:
        ctx.set_alpn_protos(alpn)
    ctx.load_verify_locations(str(pki.ca_cert))
    ctx.set_verify(SSL.VERIFY_PEER)
    return ctx


async def test_client_without_alpn_is_refused(pki: CertPaths) -> None:
    async with tls_server(server_context(pki.server_cert, pki.server_key)) as (port, outcomes):
        with pytest.raises(TlsError, match="did not agree to ALPN ntske/1"):
            await _handshake_with(_foreign_client_context(pki, None), port)
        assert "did not offer ALPN ntske/1" in str(await server_error(outcomes))


async def test_client_with_other_alpn_gets_alert(pki: CertPaths) -> None:
    async with tls_server(server_context(pki.server_cert, pki.server_key)) as (port, outcomes):
        with pytest.raises(TlsError, match="did not agree to ALPN ntske/1"):
            await _handshake_with(_foreign_client_context(pki, [b"http/1.1"]), port)
        error = await server_error(outcomes)
        assert isinstance(error, TlsError)
        assert "offered ALPN http/1.1, not ntske/1" in str(error)


async def test_server_that_ignores_alpn_is_refused(pki: CertPaths) -> None:
    stdlib_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    stdlib_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    stdlib_ctx.set_alpn_protocols(["http/1.1"])

    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(idle, "127.0.0.1", 0, ssl=stdlib_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TlsError, match=re.escape("127.0.0.1 did not agree to ALPN ntske/1")):
            await connect(port, trust(pki.ca_cert))
    finally:
        server.close()
        await server.wait_closed()


async def test_tls12_only_server_is_refused(pki: CertPaths) -> None:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.use_certificate_chain_file(str(pki.server_cert))
    ctx.use_privatekey_file(str(pki.server_key))
    async with tls_server(ctx) as (port, outcomes):
        with pytest.raises(TlsError, match=re.escape("127.0.0.1 does not speak TLS 1.3")):
            await connect(port, trust(pki.ca_cert))
        await server_error(outcomes)


async def test_tls12_only_client_is_refused(pki: CertPaths) -> None:
    client_ctx = _foreign_client_context(pki, [b"ntske/1"], SSL.TLS1_2_VERSION)
    async with tls_server(server_context(pki.server_cert, pki.server_key)) as (port, outcomes):
        with pytest.raises(TlsError):
            await _handshake_with(client_ctx, port)
        error = await server_error(outcomes)
        assert isinstance(error, TlsError)
        assert "does not speak TLS 1.3" in str(error)


# --- certificates -------------------------------------------------------------------


async def _connect_error(
    pki: CertPaths, cfg: TrustConfig, server_name: str = "localhost"
) -> CertificateError:
    async with tls_server(server_context(pki.server_cert, pki.server_key)) as (port, outcomes):
        with pytest.raises(CertificateError) as info:
            await connect(port, cfg, server_name)
        # The server learns of it through an alert, not a hang.
        assert isinstance(await server_error(outcomes), TlsError)
    return info.value


async def _connects(pki: CertPaths, cfg: TrustConfig, server_name: str = "localhost") -> None:
    async with tls_server(server_context(pki.server_cert, pki.server_key)) as (port, _):
        stream = await connect(port, cfg, server_name)
        await stream.send(b"ping")
        assert await stream.recv(timeout=5.0) == b"ping"
        await stream.close()


async def test_expired_certificate(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    end = (now - timedelta(days=1)).replace(microsecond=0)
    pki = make_test_pki(tmp_path, not_before=now - timedelta(days=10), not_after=end)
    error = await _connect_error(pki, trust(pki.ca_cert))
    message = str(error)
    assert message.startswith("certificate of 127.0.0.1 has expired")
    assert end.strftime("%Y-%m-%d %H:%M:%S") in message
    assert "nocerttimecheck" in message
    await _connects(pki, trust(pki.ca_cert, no_cert_time_check=True))


async def test_not_yet_valid_certificate(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    pki = make_test_pki(
        tmp_path, not_before=now + timedelta(days=2), not_after=now + timedelta(days=40)
    )
    error = await _connect_error(pki, trust(pki.ca_cert))
    assert "is not yet valid (notBefore" in str(error)
    assert "nocerttimecheck" in str(error)
    await _connects(pki, trust(pki.ca_cert, no_cert_time_check=True))


async def test_no_cert_time_check_still_checks_trust(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    pki = make_test_pki(tmp_path / "a", not_before=now - timedelta(days=9), not_after=now)
    other = make_test_pki(tmp_path / "b")
    error = await _connect_error(pki, trust(other.ca_cert, no_cert_time_check=True))
    assert "not trusted" in str(error)


async def test_wrong_host_name(pki: CertPaths) -> None:
    error = await _connect_error(pki, trust(pki.ca_cert), "ke.example.org")
    assert str(error) == (
        "certificate of 127.0.0.1 does not match name ke.example.org "
        "(it is for: localhost, 127.0.0.1, ::1)"
    )


async def test_ip_address_san_match(pki: CertPaths) -> None:
    async with tls_server(server_context(pki.server_cert, pki.server_key)) as (port, outcomes):
        stream = await connect(port, trust(pki.ca_cert), "127.0.0.1")
        server = await server_stream(outcomes)
        assert server.server_name is None  # RFC 6066: no SNI for an IP literal
        await stream.close()


async def test_ip_address_san_mismatch(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path, hostnames=["localhost"], ips=["127.0.0.2"])
    error = await _connect_error(pki, trust(pki.ca_cert), "127.0.0.1")
    assert "does not match name 127.0.0.1 (it is for: localhost, 127.0.0.2)" in str(error)


async def test_wildcard_certificate(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path, hostnames=["*.example.net"], ips=[])
    await _connects(pki, trust(pki.ca_cert), "ke.example.net")
    error = await _connect_error(pki, trust(pki.ca_cert), "a.ke.example.net")
    assert "(it is for: *.example.net)" in str(error)


def test_certificate_name_matching(tmp_path: Path) -> None:
    pki = make_test_pki(
        tmp_path, hostnames=["*.example.com", "*.com", "Exact.Example"], ips=["::1"]
    )
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    assert certificate_matches(cert, "ke.example.com")
    assert certificate_matches(cert, "KE.Example.COM.")
    assert certificate_matches(cert, "exact.example")
    assert certificate_matches(cert, "::1")
    assert certificate_matches(cert, "[::1]")
    assert not certificate_matches(cert, "example.com")  # the wildcard needs a label
    assert not certificate_matches(cert, "a.b.example.com")  # and only one
    assert not certificate_matches(cert, "example.org")  # "*.com" is too broad to count
    assert not certificate_matches(cert, "0:0::2")
    assert not certificate_matches(cert, "127.0.0.1")


def test_ip_literal_matches_only_ip_entries(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path, hostnames=["127.0.0.1"], ips=["192.0.2.7"])
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    assert not certificate_matches(cert, "127.0.0.1")  # a dNSName that looks like an IP
    assert certificate_matches(cert, "192.0.2.7")


async def test_untrusted_issuer(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "server", ca_name="Server Side CA")
    other = make_test_pki(tmp_path / "other", ca_name="Some Other CA")
    error = await _connect_error(pki, trust(other.ca_cert))
    assert str(error).startswith(
        "certificate of 127.0.0.1 is not trusted (unknown issuer CN=Server Side CA)"
    )


async def test_system_store_does_not_trust_a_throwaway_ca(pki: CertPaths) -> None:
    error = await _connect_error(pki, TrustConfig())
    assert "not trusted" in str(error)


async def test_nothing_trusted_at_all(pki: CertPaths) -> None:
    error = await _connect_error(pki, trust())
    assert "not trusted" in str(error)


async def test_self_signed_certificate(tmp_path: Path, pki: CertPaths) -> None:
    cert, key = make_self_signed(tmp_path / "self")
    self_signed = CertPaths(ca_cert=cert, server_cert=cert, server_key=key)
    error = await _connect_error(self_signed, trust(pki.ca_cert))
    assert "is not trusted: it is self-signed (CN=localhost)" in str(error)
    # Trusting the certificate itself pins it.
    await _connects(self_signed, trust(cert))


async def test_trust_by_directory_of_any_file_names(tmp_path: Path, pki: CertPaths) -> None:
    other = make_test_pki(tmp_path / "other", ca_name="Other CA")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(other.ca_cert, trusted / "a.pem")
    shutil.copy(pki.ca_cert, trusted / "our-ca.crt.txt")
    (trusted / "README").write_text("certificates for NTS\n")
    (trusted / "subdir").mkdir()
    await _connects(pki, trust(trusted))


async def test_trust_by_bundle_file(tmp_path: Path, pki: CertPaths) -> None:
    other = make_test_pki(tmp_path / "other", ca_name="Other CA")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(other.ca_cert.read_bytes() + pki.ca_cert.read_bytes())
    await _connects(pki, trust(bundle))


def test_unusable_trust_entries(tmp_path: Path) -> None:
    with pytest.raises(
        CertificateError, match=r"trusted certificate file .*missing\.pem does not exist"
    ):
        client_context(trust(tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(CertificateError, match="holds no readable PEM certificate"):
        client_context(trust(junk))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CertificateError, match="holds no PEM certificate"):
        client_context(trust(empty))


# --- connection failures ----------------------------------------------------------


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_closed_port_is_refused_quickly(pki: CertPaths) -> None:
    port = _closed_port()
    started = time.monotonic()
    with pytest.raises(KeConnectionError) as info:
        await connect(port, trust(pki.ca_cert))
    assert time.monotonic() - started < 2.0
    assert str(info.value) == (
        f"connection refused by 127.0.0.1 port {port} "
        f"(is the NTS-KE server running? firewall blocking TCP {port}?)"
    )


async def test_silent_server_times_out_the_handshake(pki: CertPaths) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept TCP, never answer, wait for the client to go
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(
            KeConnectionError, match=f"TLS handshake with 127.0.0.1 port {port} timed out"
        ):
            await TlsStream.connect(
                "127.0.0.1",
                port,
                server_name="localhost",
                trust=trust(pki.ca_cert),
                handshake_timeout=0.3,
            )
        assert time.monotonic() - started < 2.0
    finally:
        server.close()
        await server.wait_closed()


async def test_server_that_hangs_up_during_handshake(pki: CertPaths) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(
            KeConnectionError, match="closed the connection during the TLS handshake"
        ):
            await connect(port, trust(pki.ca_cert))
    finally:
        server.close()
        await server.wait_closed()


async def test_server_handshake_timeout(pki: CertPaths) -> None:
    ctx = server_context(pki.server_cert, pki.server_key)
    errors: list[NtsError] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await TlsStream.accept(reader, writer, ctx, handshake_timeout=0.2)
        except NtsError as e:
            errors.append(e)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 5.0) == b""  # the server gave up on us
        writer.close()
        assert len(errors) == 1
        assert "TLS handshake with client 127.0.0.1 port" in str(errors[0])
        assert "timed out" in str(errors[0])
    finally:
        server.close()
        await server.wait_closed()


# --- server certificates -----------------------------------------------------------


async def test_sni_selects_among_certificate_pairs(tmp_path: Path) -> None:
    a = make_test_pki(tmp_path / "a", hostnames=["a.example"], ips=[], ca_name="A CA")
    b = make_test_pki(tmp_path / "b", hostnames=["b.example"], ips=[], ca_name="B CA")
    contexts = ServerContexts(
        [(a.server_cert, a.server_key), (b.server_cert, b.server_key)], datetime.now(UTC)
    )
    both = trust(a.ca_cert, b.ca_cert)
    async with tls_server(contexts) as (port, outcomes):
        for name in ("b.example", "a.example"):
            stream = await connect(port, both, name)
            assert san_dns(stream.peer_certificate) == [name]
            server = await server_stream(outcomes)
            assert server.server_name == name
            await stream.close()
        # An unknown name gets the first (default) certificate.
        with pytest.raises(
            CertificateError, match=r"does not match name c\.example \(it is for: a\.example\)"
        ):
            await connect(port, both, "c.example")
        await server_error(outcomes)


async def test_reload_swaps_certificates_and_keeps_old_ones_on_failure(tmp_path: Path) -> None:
    live = tmp_path / "live"
    first = make_test_pki(live, ca_name="First CA")
    contexts = ServerContexts([(first.server_cert, first.server_key)], datetime.now(UTC))
    second = make_test_pki(tmp_path / "second", ca_name="Second CA")
    shutil.copy(second.ca_cert, tmp_path / "second-ca.pem")
    async with tls_server(contexts) as (port, _):
        await (await connect(port, trust(first.ca_cert))).close()

        shutil.copy(second.server_cert, first.server_cert)
        shutil.copy(second.server_key, first.server_key)
        contexts.reload(datetime.now(UTC))
        await (await connect(port, trust(second.ca_cert))).close()

        # A key that does not belong to the certificate: reload refuses, old pair serves on.
        third = make_test_pki(tmp_path / "third")
        shutil.copy(third.server_key, first.server_key)
        with pytest.raises(CertificateError, match="does not match certificate"):
            contexts.reload(datetime.now(UTC))
        await (await connect(port, trust(second.ca_cert))).close()
        assert contexts.certificates[0].issuer.rfc4514_string() == "CN=Second CA"


def test_server_contexts_make_pyopenssl_contexts_only_when_needed(
    tmp_path: Path, pki: CertPaths
) -> None:
    contexts = ServerContexts([(pki.server_cert, pki.server_key)], datetime.now(UTC))
    (pair,) = contexts._pairs
    # A server on the compiled engine never asks for them (memory OpenSSL
    # would take for nothing); without the engine they exist from the start.
    assert (pair._context is None) == (contexts.native is not None)
    ctx = contexts.context()
    assert isinstance(ctx, SSL.Context) and pair._context is ctx
    # The key must belong to the certificate either way, checked at load time.
    other = make_test_pki(tmp_path / "other")
    with pytest.raises(CertificateError, match="does not match certificate"):
        ServerContexts([(pki.server_cert, other.server_key)], datetime.now(UTC))


def test_server_contexts_needs_a_pair() -> None:
    with pytest.raises(CertificateError, match="no server certificate"):
        ServerContexts([], datetime.now(UTC))


def test_server_context_rejects_unusable_files(tmp_path: Path, pki: CertPaths) -> None:
    other = make_test_pki(tmp_path / "other")
    with pytest.raises(CertificateError, match="does not match certificate"):
        server_context(pki.server_cert, other.server_key)
    with pytest.raises(
        CertificateError, match=r"server certificate file .*nope\.pem does not exist"
    ):
        server_context(tmp_path / "nope.pem", pki.server_key)
    with pytest.raises(CertificateError, match=r"server key file .*nope\.key does not exist"):
        server_context(pki.server_cert, tmp_path / "nope.key")
    with pytest.raises(CertificateError, match="holds no readable PEM private key"):
        server_context(pki.server_cert, pki.server_cert)
    with pytest.raises(CertificateError, match="holds no readable PEM certificate"):
        server_context(pki.server_key, pki.server_key)


def test_server_context_rejects_expired_certificate(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    pki = make_test_pki(
        tmp_path, not_before=now - timedelta(days=9), not_after=now - timedelta(days=1)
    )
    with pytest.raises(CertificateError, match="expired on"):
        server_context(pki.server_cert, pki.server_key, now=now)
    with pytest.raises(CertificateError, match="expired on"):
        ServerContexts([(pki.server_cert, pki.server_key)], now)
    # Without a time the check is skipped (the caller decides).
    server_context(pki.server_cert, pki.server_key)


async def test_rsa_certificates_work(tmp_path: Path) -> None:
    await _connects(make_test_pki(tmp_path, key_type="rsa"), trust(tmp_path / "ca.pem"))
