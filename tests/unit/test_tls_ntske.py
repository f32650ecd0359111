"""The NTS-KE profile of TLS (net/tls/ntske.py): TLS 1.3 and ALPN ``ntske/1`` on
both sides, each refusal in its own words, over loopback."""

from __future__ import annotations

import asyncio
import re
import ssl

import pytest
from OpenSSL import SSL

from ntspy.certs import CertPaths
from ntspy.errors import TlsError
from ntspy.net.tls.credentials import server_context
from ntspy.net.tls.stream import TlsStream
from tests.unit.tls_loopback import connect, server_error, tls_server, trust


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
