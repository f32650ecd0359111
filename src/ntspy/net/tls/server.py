"""The server half of an NTS-KE TLS session, sans-I/O: bytes in, bytes out.

:class:`ServerTls` is what the NTS-KE server's ``asyncio.Protocol``
(``server/ke_server.py``) drives: no StreamReader/StreamWriter, no task per
connection.  It enforces what :meth:`~ntspy.net.tls.stream.TlsStream.accept`
enforces (TLS 1.3, ALPN ``ntske/1``, the certificate chosen by SNI through
:class:`~ntspy.net.tls.credentials.ServerContexts`) and fails with a
:class:`~ntspy.net.tls.ntske.ServerTlsFailure` naming the outcome.
"""

from __future__ import annotations

import contextlib
from typing import Final

from OpenSSL import SSL

from ntspy.errors import TlsError

from .credentials import ServerContexts
from .ntske import (
    NTSKE_ALPN,
    TLS13_NAME,
    ServerTlsFailure,
    handshake_error,
    keying_material,
    ssl_reason,
)

# ServerTls reads OpenSSL's output in steps of one TLS record: large buffers
# cost a big malloc per call in pyOpenSSL and NTS-KE messages are small.
_RECORD_CHUNK: Final = 16384


class ServerTls:
    """The server half of one NTS-KE TLS session over memory BIOs, with no I/O.

    For an :class:`asyncio.Protocol` (``server/ke_server.py``): hand it every
    byte that arrives (:meth:`handshake` until it returns True, then
    :meth:`receive`), and write :meth:`output` to the network after each step.
    It enforces what :meth:`TlsStream.accept` enforces (TLS 1.3, ALPN
    ``ntske/1``, SNI certificate selection through :class:`ServerContexts`)
    with the same error messages, without a StreamReader/StreamWriter pair or
    a task per connection.  ``who`` names the client in error messages.
    """

    __slots__ = ("_conn", "who")

    def __init__(self, ctx_or_contexts: SSL.Context | ServerContexts, who: str) -> None:
        ctx = (
            ctx_or_contexts.context()
            if isinstance(ctx_or_contexts, ServerContexts)
            else ctx_or_contexts
        )
        self._conn = SSL.Connection(ctx, None)
        self._conn.set_accept_state()
        self.who = who

    def handshake(self, data: bytes) -> bool:
        """Feed received bytes and advance the handshake; True once it is complete.

        Raises :class:`TlsError` for a failed handshake (wrong version, no
        ``ntske/1`` ALPN, anything else OpenSSL refuses); any alert OpenSSL
        produced is waiting in :meth:`output` then.
        """
        conn = self._conn
        if data:
            conn.bio_write(data)
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            return False
        except ServerTlsFailure as e:  # from the ALPN callback
            raise ServerTlsFailure(f"{self.who}: {e}", e.kind, e.detail) from None
        except SSL.Error as e:
            reason = ssl_reason(e)
            raise ServerTlsFailure(str(handshake_error(reason, self.who, self.who)), "tls",
                                   reason) from None
        # A client that offers no ALPN at all never reaches the ALPN callback.
        if conn.get_alpn_proto_negotiated() != NTSKE_ALPN:
            raise ServerTlsFailure(f"{self.who} did not offer ALPN {NTSKE_ALPN.decode()}",
                                   "no-alpn")
        if conn.get_protocol_version_name() != TLS13_NAME:
            raise ServerTlsFailure(f"{self.who} does not speak TLS 1.3, which NTS-KE "
                                   "requires", "tls", "unsupported protocol")
        return True

    def receive(self, data: bytes = b"") -> tuple[bytes, bool]:
        """Feed received bytes; return the application data now readable and
        whether the client ended the stream (close_notify).

        Raises :class:`TlsError` for a TLS-level error (a bad record, say).
        """
        conn = self._conn
        if data:
            conn.bio_write(data)
        chunks: list[bytes] = []
        ended = False
        while True:
            try:
                chunk = conn.recv(_RECORD_CHUNK)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                ended = True
                break
            except SSL.Error as e:
                reason = ssl_reason(e)
                raise ServerTlsFailure(f"TLS error receiving from {self.who}: {reason}",
                                       "tls-receive", reason) from None
            if not chunk:
                ended = True
                break
            chunks.append(chunk)
        return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), ended

    def send(self, data: bytes) -> None:
        """Encrypt ``data``; the records wait in :meth:`output`."""
        view = memoryview(data)
        try:
            while view:
                view = view[self._conn.send(view) :]
        except SSL.Error as e:
            raise TlsError(f"TLS error sending to {self.who}: {ssl_reason(e)}") from None

    def close_notify(self) -> None:
        """Queue a close_notify alert (harmless no-op mid-handshake). Never raises."""
        with contextlib.suppress(Exception):
            self._conn.shutdown()

    def output(self) -> bytes:
        """Every byte OpenSSL has produced for the network since the last call."""
        conn = self._conn
        chunks: list[bytes] = []
        while True:
            try:
                chunk = conn.bio_read(_RECORD_CHUNK)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    def export_keying_material(self, label: bytes, length: int, context: bytes) -> bytes:
        """RFC 8446 s7.5 exporter (RFC 5705 interface), as RFC 8915 s5.1 uses it."""
        return keying_material(self._conn, label, length, context)

    @property
    def server_name(self) -> str | None:
        """The SNI the client sent, if any."""
        raw = self._conn.get_servername()
        return raw.decode("ascii", "replace") if raw is not None else None
