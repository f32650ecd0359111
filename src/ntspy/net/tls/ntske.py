"""What NTS-KE asks of TLS (RFC 8915 s4), and how a failed handshake reads.

TLS 1.3 only (min = max = 1.3) and ALPN ``ntske/1`` on both sides: the
constants, the bare TLS 1.3 Context that client and server contexts start
from, the keying-material exporter NTS derives its AEAD keys with (RFC 8915
s5.1; the reason this runs pyOpenSSL rather than the stdlib ``ssl``), and the
words for what went wrong: OpenSSL's reasons (:func:`ssl_reason`), a
handshake failure (:func:`handshake_error`) and a server-side failure named
as the NTS-KE server's outcome table names it (:class:`ServerTlsFailure`).
"""

from __future__ import annotations

from typing import Final

from OpenSSL import SSL

from ntspy.errors import TlsError

NTSKE_ALPN: Final = b"ntske/1"  # RFC 8915 s4: the ALPN id of NTS-KE
TLS13_NAME: Final = "TLSv1.3"  # what OpenSSL's SSL_get_version() calls TLS 1.3


def new_tls13_context() -> SSL.Context:
    """A bare Context that speaks TLS 1.3 and nothing else (client and server start here)."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    return ctx


class ServerTlsFailure(TlsError):
    """How :class:`~ntspy.net.tls.server.ServerTls` failed, named as the NTS-KE
    server's outcome table names it (``kind``: ``tls``, ``alpn``, ``no-alpn``,
    ``tls-receive``; the compiled engine reports the same kinds), with OpenSSL's
    reason or the offered ALPN list (its wire form, RFC 7301 s3.1) as ``detail``.
    The server Contexts' ALPN callback (:mod:`.credentials`) raises one too."""

    def __init__(self, message: str, kind: str, detail: str | bytes | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.detail = detail


def keying_material(conn: SSL.Connection, label: bytes, length: int, context: bytes) -> bytes:
    """RFC 8446 s7.5 exporter output of ``conn``; :class:`TlsError` if OpenSSL refuses."""
    try:
        return bytes(conn.export_keying_material(label, length, context))
    except SSL.Error as e:
        raise TlsError(f"TLS exporter failed: {ssl_reason(e)}") from None


def ssl_reason(error: SSL.Error) -> str:
    """OpenSSL's reason strings from a pyOpenSSL error, e.g. ``tlsv1 alert protocol version``."""
    if isinstance(error, SSL.SysCallError):
        return str(error.args[1]) if len(error.args) > 1 else "system call failed"
    reasons: list[str] = []
    if error.args and isinstance(error.args[0], list):
        for entry in error.args[0]:
            if isinstance(entry, tuple) and entry:
                reasons.append(str(entry[-1]))
    return "; ".join(r for r in reasons if r) or str(error) or type(error).__name__


_VERSION_REASONS: Final = (
    "protocol version",
    "unsupported protocol",
    "wrong version number",
    "no protocols available",
    "wrong ssl version",
)


def handshake_error(reason: str, who: str, where: str) -> TlsError:
    """The error for a handshake OpenSSL failed with ``reason``: a wrong version and
    a refused ALPN get their own words.  ``who`` names the peer, ``where`` its address."""
    lowered = reason.lower()
    if any(r in lowered for r in _VERSION_REASONS):
        return TlsError(f"{who} does not speak TLS 1.3, which NTS-KE requires ({reason})")
    if "no application protocol" in lowered:
        return TlsError(f"{who} did not agree to ALPN {NTSKE_ALPN.decode()} ({reason})")
    return TlsError(f"TLS handshake with {where} failed: {reason}")
