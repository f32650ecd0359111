"""A loopback NTS-KE TLS server and client with throwaway certificates, for the
tests of ``ntspy.net.tls`` (tests/unit/test_tls_*.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import SSL

from ntspy.certs import CertPaths
from ntspy.errors import CertificateError, NtsError, TlsError
from ntspy.net.tls.credentials import ServerContexts, server_context
from ntspy.net.tls.stream import TlsStream
from ntspy.net.tls.trust import TrustConfig

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


async def connect(port: int, cfg: TrustConfig, server_name: str = "localhost") -> TlsStream:
    return await TlsStream.connect("127.0.0.1", port, server_name=server_name, trust=cfg)


def san_dns(cert: x509.Certificate | None) -> list[str]:
    assert cert is not None
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


async def connect_error(
    pki: CertPaths, cfg: TrustConfig, server_name: str = "localhost"
) -> CertificateError:
    async with tls_server(server_context(pki.server_cert, pki.server_key)) as (port, outcomes):
        with pytest.raises(CertificateError) as info:
            await connect(port, cfg, server_name)
        # The server learns of it through an alert, not a hang.
        assert isinstance(await server_error(outcomes), TlsError)
    return info.value


async def connects(pki: CertPaths, cfg: TrustConfig, server_name: str = "localhost") -> None:
    async with tls_server(server_context(pki.server_cert, pki.server_key)) as (port, _):
        stream = await connect(port, cfg, server_name)
        await stream.send(b"ping")
        assert await stream.recv(timeout=5.0) == b"ping"
        await stream.close()
