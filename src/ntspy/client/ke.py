"""NTS-KE client (RFC 8915 s4): one TLS session that yields keys and cookies.

The record logic lives in :mod:`ntspy.proto.ke`; this module only moves its
bytes over a :class:`~ntspy.net.tls.stream.TlsStream` and exports the two AEAD keys
from the TLS session before closing it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from OpenSSL import SSL

from ..errors import KeConnectionError, KeProtocolError, KeTimeoutError, format_duration
from ..net.dns import getaddrinfo
from ..net.tls.stream import TlsStream
from ..net.tls.trust import TrustConfig, client_context
from ..proto import aead as aead_mod
from ..proto import ke
from ..proto.ntp import NTP_PORT


@dataclass(slots=True)
class KeResult:
    """What one NTS-KE exchange gave us: keys, cookies and where to send NTP."""

    aead_id: int
    c2s: bytes = field(repr=False)
    s2c: bytes = field(repr=False)
    cookies: list[bytes] = field(repr=False)
    ntp_server: str  # the Server record, or the KE host (RFC 8915 s4.1.7)
    ntp_port: int  # the Port record, or 123 (RFC 8915 s4.1.8)
    ke_host: str
    ke_port: int
    ke_address: str  # the IP address the KE connection went to
    tls_version: str
    cert_subject: str
    cert_not_after: datetime | None
    compliant_128gcm: bool = False
    next_protocol: int = ke.NextProtocol.NTPV4
    server_record: str | None = None  # the NTPv4 Server record as sent, if any
    port_record: int | None = None  # the NTPv4 Port record as sent, if any

    @property
    def aead_name(self) -> str:
        return aead_mod.info(self.aead_id).name


async def key_exchange(
    host: str,
    port: int = ke.DEFAULT_KE_PORT,
    *,
    trust: TrustConfig | None = None,
    aeads: Sequence[int] | None = None,
    server_name: str | None = None,
    timeout: float = 5.0,
) -> KeResult:
    """Run NTS-KE with ``host``:``port`` and return the negotiated session.

    ``aeads`` is our preference order (default :func:`ntspy.proto.aead.supported`);
    ``server_name`` is what the certificate must name (default ``host``).
    ``timeout`` bounds the whole exchange.  Raises :class:`KeConnectionError`
    (:class:`KeTimeoutError` when time ran out), :class:`CertificateVerifyError`,
    :class:`TlsError`, :class:`KeServerError` or :class:`KeProtocolError`, each
    with a message fit for a user.
    """
    offered = list(aeads) if aeads is not None else list(aead_mod.supported())
    # chrony >= 4.6.1 marks keys of AES-128-GCM-SIV as exported with the RFC
    # context via record 1024; offering it only matters when we offer id 30.
    compliant = aead_mod.AeadId.AES_128_GCM_SIV in offered
    request = ke.build_client_request(offered, compliant_128gcm=compliant)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    def left() -> float:
        return max(0.001, deadline - loop.time())

    progress = _Progress()
    try:
        stream, address = await _connect(host, port, server_name or host, trust, left, progress)
    except KeTimeoutError:
        raise KeTimeoutError(progress.timed_out(host, port, timeout)) from None
    try:
        progress.phase = "response"
        await stream.send(request)  # one write: NTPsec expects the request in one piece
        try:
            records = await _read_message(stream, left, f"{host} port {port}")
        except KeTimeoutError:
            raise KeTimeoutError(progress.timed_out(host, port, timeout)) from None
        response = ke.parse_server_response(records, offered)
        key_len = aead_mod.info(response.aead).key_length
        c2s = stream.export_keying_material(
            ke.EXPORTER_LABEL,
            key_len,
            ke.exporter_context_for(response.aead, False, response.compliant_128gcm),
        )
        s2c = stream.export_keying_material(
            ke.EXPORTER_LABEL,
            key_len,
            ke.exporter_context_for(response.aead, True, response.compliant_128gcm),
        )
        cert = stream.peer_certificate
        return KeResult(
            aead_id=response.aead,
            c2s=c2s,
            s2c=s2c,
            cookies=list(response.cookies),
            # RFC 8915 s4.1.7: no Server record means the KE server's own address.
            ntp_server=response.server or address,
            ntp_port=response.port or NTP_PORT,
            ke_host=host,
            ke_port=port,
            ke_address=address,
            tls_version=stream.protocol_version,
            cert_subject=cert.subject.rfc4514_string() if cert is not None else "",
            cert_not_after=cert.not_valid_after_utc if cert is not None else None,
            compliant_128gcm=response.compliant_128gcm,
            next_protocol=response.next_protocol,
            server_record=response.server,
            port_record=response.port,
        )
    finally:
        await stream.close()


@dataclass(slots=True)
class _Progress:
    """How far one NTS-KE got, so that a timeout can say where it struck.

    Each step gets what is left of the one deadline; the message names the
    whole timeout the caller gave ("within 3 s"), not that remainder.
    """

    phase: str = "resolve"  # then "tcp", "tls", "response"

    def on_tls_state(self, conn: SSL.Connection, where: int, ret: int) -> None:
        if where & SSL.SSL_CB_HANDSHAKE_START:
            self.phase = "tls"

    def timed_out(self, host: str, port: int, timeout: float) -> str:
        within = f"within {format_duration(timeout)}"
        if self.phase == "resolve":
            return f"cannot resolve {host}: no answer {within}"
        if self.phase == "tcp":
            return (f"connection to {host} port {port} timed out (no answer {within}; "
                    f"host down, or a firewall dropping TCP {port}?)")
        if self.phase == "tls":
            return (f"TLS handshake with {host} port {port} timed out (no answer {within}; "
                    "is it an NTS-KE server?)")
        return f"{host} port {port} sent no complete NTS-KE response {within}"


async def _connect(
    host: str,
    port: int,
    server_name: str,
    trust: TrustConfig | None,
    left: Callable[[], float],
    progress: _Progress,
) -> tuple[TlsStream, str]:
    """TLS to the first of ``host``'s addresses that accepts TCP; also returns that address.

    We resolve the name ourselves because RFC 8915 s4.1.7 sends NTP to the
    very address the KE connection reached when the server names no other.
    """
    try:
        infos = await asyncio.wait_for(getaddrinfo(host, port, socket.SOCK_STREAM), left())
    except TimeoutError:
        raise KeTimeoutError(f"cannot resolve {host}: timed out") from None
    except OSError as exc:
        raise KeConnectionError(f"cannot resolve {host}: {exc.strerror or exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    context = client_context(trust or TrustConfig())
    context.set_info_callback(progress.on_tls_state)
    error: KeConnectionError | None = None
    for address in addresses:
        progress.phase = "tcp"
        try:
            stream = await TlsStream.connect(
                address,
                port,
                server_name=server_name,
                trust=context,
                connect_timeout=left(),
                handshake_timeout=left(),
            )
        except KeConnectionError as exc:
            error = exc  # refused or unreachable: the next address may work
            continue
        return stream, address
    raise error or KeConnectionError(f"cannot resolve {host}: no addresses")


async def _read_message(
    stream: TlsStream, left: Callable[[], float], where: str
) -> list[ke.Record]:
    """Records up to End of Message, within the deadline; the size cap is the reader's."""
    reader = ke.RecordReader()
    records: list[ke.Record] = []
    while not reader.done:
        data = await stream.recv(16384, timeout=left())
        if not data:
            raise KeConnectionError(
                f"{where} closed the connection before End of Message "
                f"({len(records)} records received)"
            )
        try:
            records += reader.feed(data)
        except KeProtocolError as exc:
            raise KeProtocolError(f"{where}: {exc}", exc.code) from None
    return records
