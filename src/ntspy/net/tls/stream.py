"""TLS over an asyncio ``(StreamReader, StreamWriter)`` pair, pumped through memory BIOs.

OpenSSL never touches a socket: :class:`TlsStream` shuttles bytes between its
BIOs and the streams.  The NTS-KE client opens one with
:meth:`TlsStream.connect` (TCP, SNI, the verified handshake of :mod:`.trust`);
server code that wants streams takes one with :meth:`TlsStream.accept`.  Every
failure becomes one clear line in a :class:`~ntspy.errors.KeConnectionError`
(a :class:`~ntspy.errors.KeTimeoutError` when time ran out),
:class:`~ntspy.errors.CertificateVerifyError` or
:class:`~ntspy.errors.TlsError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Final

from cryptography import x509
from OpenSSL import SSL

from ntspy.errors import (
    CertificateVerifyError,
    KeConnectionError,
    KeTimeoutError,
    NtsError,
    TlsError,
    format_duration,
)

from .credentials import ServerContexts
from .names import dns_form, parse_ip
from .ntske import NTSKE_ALPN, TLS13_NAME, handshake_error, keying_material, ssl_reason
from .trust import PeerCheck, TrustConfig, certificate_message, client_context

# Big enough to take a whole TLS record (16 KiB + overhead) in one read.
_READ_CHUNK: Final = 65536
_CLOSE_WAIT: Final = 1.0  # seconds we wait for the transport to close in close()


class _PeerClosed(Exception):
    """The transport hit EOF in the middle of the handshake."""


class TlsStream:
    """TLS over an asyncio (reader, writer) using memory BIOs.

    Create one with :meth:`connect` (client) or :meth:`accept` (server); both
    return only after a complete, verified TLS 1.3 handshake with ALPN ``ntske/1``.
    """

    __slots__ = ("_closed", "_conn", "_peer", "_reader", "_writer")

    def __init__(
        self,
        conn: SSL.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> None:
        self._conn = conn
        self._reader = reader
        self._writer = writer
        self._peer = peer
        self._closed = False

    # -- opening ---------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        server_name: str,
        trust: TrustConfig | SSL.Context,
        connect_timeout: float = 5.0,
        handshake_timeout: float = 5.0,
    ) -> TlsStream:
        """Open TCP to ``host``:``port`` (IPv4 or IPv6) and run the client handshake.

        ``server_name`` is sent as SNI (unless it is an IP literal) and checked
        against the certificate.  ``trust`` is a :class:`TrustConfig` or a
        Context from :func:`client_context` to reuse.  Raises
        :class:`KeConnectionError`, :class:`CertificateError` or :class:`TlsError`.
        """
        ctx = trust if isinstance(trust, SSL.Context) else client_context(trust)
        reader, writer = await _open_tcp(host, port, connect_timeout)
        return await cls.handshake_client(
            reader,
            writer,
            ctx,
            server_name=server_name,
            host=host,
            port=port,
            handshake_timeout=handshake_timeout,
        )

    @classmethod
    async def handshake_client(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        context: SSL.Context,
        *,
        server_name: str,
        host: str,
        port: int,
        handshake_timeout: float,
    ) -> TlsStream:
        """Run the client handshake over an open connection (``connect`` minus TCP).

        ``host`` and ``port`` only name the peer in error messages.  The
        transport is closed if the handshake fails.
        """
        conn = SSL.Connection(context, None)
        conn.set_connect_state()
        if parse_ip(server_name) is None:
            # RFC 6066 s3: SNI carries host names only, never IP literals.
            conn.set_tlsext_host_name(dns_form(server_name).encode("ascii"))
        check = PeerCheck(server_name)
        conn.set_app_data(check)
        where = f"{host} port {port}"
        stream = cls(conn, reader, writer, where)
        try:
            try:
                async with asyncio.timeout(handshake_timeout):
                    await stream._handshake()
            except TimeoutError:
                raise KeTimeoutError(
                    f"TLS handshake with {where} timed out (no answer within "
                    f"{format_duration(handshake_timeout)}; is it an NTS-KE server?)"
                ) from None
            except SSL.Error as e:
                if check.failure is not None:
                    raise CertificateVerifyError(
                        certificate_message(check.failure, host, server_name),
                        check.failure.code,
                    ) from None
                raise handshake_error(ssl_reason(e), host, where) from None
            except _PeerClosed:
                raise KeConnectionError(
                    f"{where} closed the connection during the TLS handshake "
                    "(is it an NTS-KE server?)"
                ) from None
            except OSError as e:
                raise KeConnectionError(
                    f"connection to {where} failed during the TLS handshake: {e.strerror or e}"
                ) from None
            stream._check_client_result(check, host)
        except BaseException:
            await stream.close()
            raise
        return stream

    def _check_client_result(self, check: PeerCheck, host: str) -> None:
        if not check.name_checked:
            # OpenSSL calls the verify callback for the leaf on every successful
            # verification; this guards the name check should it ever not.
            leaf = self.peer_certificate
            if leaf is None:
                raise CertificateVerifyError(f"{host} sent no certificate")
            if not check.check_name(leaf) and check.failure is not None:
                raise CertificateVerifyError(
                    certificate_message(check.failure, host, check.server_name),
                    check.failure.code,
                )
        version = self.protocol_version
        if version != TLS13_NAME:
            raise TlsError(f"{host} does not speak TLS 1.3, which NTS-KE requires (got {version})")
        if self.alpn != NTSKE_ALPN:
            raise TlsError(f"{host} did not agree to ALPN {NTSKE_ALPN.decode()}")

    @classmethod
    async def accept(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ctx_or_contexts: SSL.Context | ServerContexts,
        *,
        handshake_timeout: float,
    ) -> TlsStream:
        """Run the server handshake on a freshly accepted connection.

        Raises :class:`TlsError` (wrong version, no ``ntske/1`` ALPN, other TLS
        failure) or :class:`KeConnectionError` (timeout, client hung up); the
        transport is closed then.
        """
        ctx = (
            ctx_or_contexts.context()
            if isinstance(ctx_or_contexts, ServerContexts)
            else ctx_or_contexts
        )
        conn = SSL.Connection(ctx, None)
        conn.set_accept_state()
        who = _describe_client(writer)
        stream = cls(conn, reader, writer, who)
        try:
            try:
                async with asyncio.timeout(handshake_timeout):
                    await stream._handshake()
            except TimeoutError:
                raise KeTimeoutError(f"TLS handshake with {who} timed out") from None
            except TlsError as e:  # from the ALPN callback
                raise TlsError(f"{who}: {e}") from None
            except SSL.Error as e:
                raise handshake_error(ssl_reason(e), who, who) from None
            except _PeerClosed:
                raise KeConnectionError(
                    f"{who} closed the connection during the TLS handshake"
                ) from None
            except OSError as e:
                raise KeConnectionError(
                    f"connection with {who} failed during the TLS handshake: {e.strerror or e}"
                ) from None
            # A client that offers no ALPN at all never reaches the ALPN callback.
            if stream.alpn != NTSKE_ALPN:
                raise TlsError(f"{who} did not offer ALPN {NTSKE_ALPN.decode()}")
            if stream.protocol_version != TLS13_NAME:
                raise TlsError(f"{who} does not speak TLS 1.3, which NTS-KE requires")
        except BaseException:
            await stream.close()
            raise
        return stream

    # -- the BIO pump -------------------------------------------------------------

    def _pending_output(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._conn.bio_read(_READ_CHUNK)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    async def _flush(self) -> None:
        data = self._pending_output()
        if data:
            # One write for everything OpenSSL produced, so a KE request that
            # fits in one record leaves in one segment (NTPsec relies on it).
            self._writer.write(data)
            await self._writer.drain()

    async def _flush_quietly(self) -> None:
        # Deliver a fatal alert if we can; the peer may already be gone.
        with contextlib.suppress(OSError):
            await self._flush()

    async def _fill(self) -> bool:
        """Feed OpenSSL the next bytes from the network; False on EOF."""
        data = await self._reader.read(_READ_CHUNK)
        if not data:
            return False
        self._conn.bio_write(data)
        return True

    async def _handshake(self) -> None:
        while True:
            try:
                self._conn.do_handshake()
            except SSL.WantReadError:
                await self._flush()
                if not await self._fill():
                    raise _PeerClosed from None
                continue
            except (SSL.Error, NtsError):
                await self._flush_quietly()
                raise
            # The client's Finished, or the server's session tickets.
            await self._flush()
            return

    # -- data ---------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Encrypt ``data`` and write it to the network in one transport write."""
        view = memoryview(data)
        try:
            while view:
                sent = self._conn.send(view)
                view = view[sent:]
        except SSL.Error as e:
            raise TlsError(f"TLS error sending to {self._peer}: {ssl_reason(e)}") from None
        try:
            await self._flush()
        except OSError as e:
            raise KeConnectionError(
                f"connection to {self._peer} lost while sending: {e.strerror or e}"
            ) from None

    async def recv(self, max_bytes: int = 16384, timeout: float | None = None) -> bytes:
        """Up to ``max_bytes`` of decrypted data; ``b""`` at end of stream.

        End of stream is the peer's close_notify or a plain TCP close: NTS-KE
        messages end with their own End of Message record, so the KE parser
        notices truncation.  Raises :class:`KeConnectionError` after ``timeout``
        seconds without data.
        """
        if timeout is None:
            return await self._recv(max_bytes)
        try:
            async with asyncio.timeout(timeout):
                return await self._recv(max_bytes)
        except TimeoutError:
            raise KeTimeoutError(
                f"{self._peer} sent nothing for {format_duration(timeout)}"
            ) from None

    async def _recv(self, max_bytes: int) -> bytes:
        while True:
            try:
                return self._conn.recv(max_bytes)
            except SSL.WantReadError:
                pass
            except SSL.ZeroReturnError:
                return b""
            except SSL.Error as e:
                await self._flush_quietly()
                raise TlsError(f"TLS error receiving from {self._peer}: {ssl_reason(e)}") from None
            try:
                await self._flush()  # e.g. a KeyUpdate answer
                if not await self._fill():
                    return b""
            except OSError as e:
                raise KeConnectionError(
                    f"connection to {self._peer} lost while receiving: {e.strerror or e}"
                ) from None

    def export_keying_material(self, label: bytes, length: int, context: bytes) -> bytes:
        """RFC 8446 s7.5 exporter (RFC 5705 interface), as RFC 8915 s5.1 uses it."""
        return keying_material(self._conn, label, length, context)

    # -- facts about the session ---------------------------------------------------

    @property
    def protocol_version(self) -> str:
        """The negotiated protocol as OpenSSL names it (always ``TLSv1.3`` here)."""
        return self._conn.get_protocol_version_name()

    @property
    def alpn(self) -> bytes | None:
        """The negotiated ALPN protocol, or None."""
        return self._conn.get_alpn_proto_negotiated() or None

    @property
    def server_name(self) -> str | None:
        """The SNI: the one the client sent (server side) or that we sent (client side)."""
        raw = self._conn.get_servername()
        return raw.decode("ascii", "replace") if raw is not None else None

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's leaf certificate (None on the server: no client certificates)."""
        return self._conn.get_peer_certificate(as_cryptography=True)

    @property
    def peer(self) -> str:
        """Who is at the other end, as error messages name it."""
        return self._peer

    async def close(self) -> None:
        """Send close_notify if possible and close the transport. Never raises."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._conn.shutdown()  # queues close_notify; fails harmlessly mid-handshake
        with contextlib.suppress(Exception):
            data = self._pending_output()
            if data:
                self._writer.write(data)
        with contextlib.suppress(Exception):
            self._writer.close()
            async with asyncio.timeout(_CLOSE_WAIT):
                await self._writer.wait_closed()


def _describe_client(writer: asyncio.StreamWriter) -> str:
    peername = writer.get_extra_info("peername")
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"client {peername[0]} port {peername[1]}"
    return "client"


async def _open_tcp(
    host: str, port: int, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    refused = (
        f"connection refused by {host} port {port} "
        f"(is the NTS-KE server running? firewall blocking TCP {port}?)"
    )
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.open_connection(host, port)
    except TimeoutError:
        raise KeTimeoutError(
            f"connection to {host} port {port} timed out (no answer within "
            f"{format_duration(timeout)}; "
            f"host down, or a firewall dropping TCP {port}?)"
        ) from None
    except ConnectionRefusedError:
        raise KeConnectionError(refused) from None
    except socket.gaierror as e:
        raise KeConnectionError(f"cannot resolve {host}: {e.strerror or e}") from None
    except OSError as e:
        # asyncio merges the errors of several addresses into one OSError.
        if "refused" in str(e).lower():
            raise KeConnectionError(refused) from None
        raise KeConnectionError(
            f"cannot connect to {host} port {port}: {e.strerror or e}"
        ) from None
