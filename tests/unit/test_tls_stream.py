"""TlsStream (net/tls/stream.py): the memory-BIO pump over asyncio streams, over
loopback with throwaway certificates."""

from __future__ import annotations

import asyncio
import re
import socket
import time

import pytest

from ntspy.certs import CertPaths
from ntspy.errors import KeConnectionError, NtsError
from ntspy.net.tls.credentials import server_context
from ntspy.net.tls.stream import TlsStream
from tests.unit.tls_loopback import connect, san_dns, server_stream, tls_server, trust

LABEL = b"EXPORTER-network-time-security"  # RFC 8915 s5.1
C2S = bytes([0, 0, 0, 15, 0])  # NTPv4, AES-SIV-CMAC-256, client-to-server
S2C = bytes([0, 0, 0, 15, 1])


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
