"""The NTS-KE server: TCP + TLS 1.3 around :func:`negotiation.negotiate`.

Bounded in every direction: concurrent connections (``maxntsconnections``),
per-address connection rate (``ntsratelimit``), handshake and read
deadlines, and the KE message size. Each failure closes the connection and
is counted; nothing a client sends can stop the server from accepting the next.

Every accepted connection ends in exactly one of ``ke_completed`` (cookies
sent), ``ke_errors`` (an Error record sent, or a refusal such as no common
AEAD) and ``ke_failed`` (TLS failure, timeout, hang-up); a connection refused
at the door counts as ``ke_dropped`` and in nothing else.

One :class:`KeServerProtocol` per connection feeds what the socket delivers
straight into OpenSSL's memory BIO (:class:`~ntspy.net.tls.ServerTls`): no
StreamReader/StreamWriter, no task, and one timer handle per phase, because
the Python around the TLS work was more than half of a handshake's CPU time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Final

from ..errors import KeProtocolError, NtsError
from ..net.tls import ServerContexts, ServerTls
from ..proto import ke
from ..proto.cookies import KeyRing
from .negotiation import KePolicy, negotiate
from .ratelimit import RateLimiter, Verdict
from .stats import ServerStats

log = logging.getLogger("ntspy.server.ke")

HANDSHAKE_TIMEOUT = 5.0
REQUEST_TIMEOUT = 5.0
RECEIVE_BUFFER = 16384  # bytes per socket read: a full TLS record

# Phases of a connection.
_HANDSHAKE: Final = 0
_REQUEST: Final = 1
_DONE: Final = 2


class KeServer:
    """Listens for NTS-KE connections and answers each with :func:`negotiate`.

    ``active`` is the number of connections being served right now.
    """

    def __init__(
        self,
        contexts: ServerContexts,
        keyring: KeyRing,
        policy: KePolicy,
        stats: ServerStats,
        *,
        max_connections: int = 100,
        ratelimit: RateLimiter | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.contexts = contexts
        self.keyring = keyring
        self.policy = policy
        self.stats = stats
        self.max_connections = max_connections
        self.ratelimit = ratelimit
        self.random_bytes = random_bytes
        self.handshake_timeout = handshake_timeout
        self.request_timeout = request_timeout
        self.active = 0
        self._servers: list[asyncio.Server] = []
        self._live: set[KeServerProtocol] = set()
        # Every read lands here and is handed to OpenSSL at once, so one
        # buffer serves all connections of this (single-threaded) server.
        self.receive_buffer = bytearray(RECEIVE_BUFFER)

    async def start(self, host: str | None, port: int, sock: socket.socket | None = None) -> None:
        """Listen on ``sock`` if given, else on ``host``:``port`` (0: any free port)."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            server = await loop.create_server(self._protocol, sock=sock)
        else:
            server = await loop.create_server(self._protocol, host, port, reuse_address=True)
        self._servers.append(server)

    def _protocol(self) -> KeServerProtocol:
        return KeServerProtocol(self)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for srv in self._servers for s in srv.sockets]

    async def close(self) -> None:
        """Stop listening and cut the connections still open (counted as failed)."""
        for srv in self._servers:
            srv.close()
        for proto in list(self._live):
            proto.abort("server shutting down")
        for srv in self._servers:
            await srv.wait_closed()

    def admit(self, address: str) -> bool:
        """Whether a new connection from ``address`` may be served (cap and rate)."""
        if self.active >= self.max_connections:
            return False
        limiter = self.ratelimit
        return limiter is None or limiter.check(address, time.monotonic_ns()) is Verdict.PASS


class KeServerProtocol(asyncio.BufferedProtocol):
    """One NTS-KE connection: TLS handshake, one request, one response, close.

    A BufferedProtocol so the transport reads into the server's one receive
    buffer instead of allocating a fresh 256 KiB bytes object for every read.
    """

    __slots__ = (
        "_address",
        "_phase",
        "_reader",
        "_records",
        "_server",
        "_timer",
        "_tls",
        "_transport",
    )

    def __init__(self, server: KeServer) -> None:
        self._server = server
        self._phase = _DONE  # until connection_made admits the connection
        self._address = "?"
        self._transport: asyncio.Transport | None = None
        self._tls: ServerTls | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reader: ke.RecordReader | None = None
        self._records: list[ke.Record] = []

    # -- asyncio callbacks -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        server = self._server
        peer: Any = transport.get_extra_info("peername")
        address = self._address = str(peer[0]) if peer else "?"
        if not server.admit(address):
            server.stats.add("ke_dropped")
            transport.abort()
            return
        try:
            who = f"client {peer[0]} port {peer[1]}" if peer else "client"
            self._tls = ServerTls(server.contexts, who)
        except Exception:  # a TLS library surprise must not kill the server
            server.stats.add("ke_dropped")
            log.exception("cannot set up TLS for an NTS-KE connection from %s", address)
            transport.abort()
            return
        server.active += 1
        server._live.add(self)
        server.stats.add("ke_accepted")
        self._phase = _HANDSHAKE
        self._timer = asyncio.get_running_loop().call_later(
            server.handshake_timeout, self._timed_out
        )

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._server.receive_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._phase != _DONE:
            self.data_received(bytes(memoryview(self._server.receive_buffer)[:nbytes]))

    def data_received(self, data: bytes) -> None:
        """Process bytes from the client (the step after each read)."""
        if self._phase == _DONE:
            return
        tls = self._tls
        assert tls is not None
        try:
            if self._phase == _HANDSHAKE:
                try:
                    done = tls.handshake(data)
                except NtsError:
                    self._write(tls.output())  # the alert
                    raise
                if not done:
                    self._write(tls.output())  # our flight
                    return
                # What OpenSSL has queued now are NewSessionTickets; they leave
                # with the answer, in one write instead of two.
                self._request_phase()
                data = b""
            received, ended = tls.receive(data)
            if received:
                self._feed(received)
            if ended and self._phase == _REQUEST:
                self._end_of_stream()
        except KeProtocolError as exc:
            self._refuse(exc)
        except NtsError as exc:
            self._fail(str(exc))
        except Exception:  # nothing a client sends may take the server down
            log.exception("NTS-KE with %s failed unexpectedly", self._address)
            self.abort(None)

    def eof_received(self) -> bool:
        if self._phase == _HANDSHAKE:
            self._fail("client closed the connection during the TLS handshake")
        elif self._phase == _REQUEST:
            try:
                self._end_of_stream()
            except KeProtocolError as exc:
                self._refuse(exc)
            except NtsError as exc:
                self._fail(str(exc))
            except Exception:
                log.exception("NTS-KE with %s failed unexpectedly", self._address)
                self.abort(None)
        # Keep the transport open: _close() closes it once the answer is written.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        server = self._server
        if self._tls is None:
            return  # never admitted
        if self._phase != _DONE:
            self._phase = _DONE
            server.stats.add("ke_failed")
            log.info("NTS-KE from %s: connection lost (%s)", self._address, exc or "closed")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        server.active -= 1
        server._live.discard(self)
        self._tls = None
        self._reader = None

    # -- the exchange ----------------------------------------------------------

    def _request_phase(self) -> None:
        self._phase = _REQUEST
        self._reader = ke.RecordReader()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(
            self._server.request_timeout, self._timed_out
        )

    def _feed(self, data: bytes) -> None:
        reader = self._reader
        assert reader is not None
        self._records.extend(reader.feed(data))
        if reader.done:
            self._answer()

    def _end_of_stream(self) -> None:
        reader = self._reader
        assert reader is not None
        reader.eof()  # raises: the message ended before End of Message
        self._answer()

    def _answer(self) -> None:
        tls = self._tls
        assert tls is not None
        server = self._server
        outcome = negotiate(
            self._records, server.policy, server.keyring, tls.export_keying_material,
            server.random_bytes,
        )
        tls.send(outcome.response)
        if outcome.error_code is not None or outcome.aead_id is None:
            self._finish("ke_errors")
            log.info("NTS-KE from %s refused: %s", self._address, outcome.reason)
        else:
            self._finish("ke_completed")
        self._close()

    def _refuse(self, exc: KeProtocolError) -> None:
        """A protocol violation: answer with an Error record, then close."""
        if self._phase == _DONE:
            return
        self._finish("ke_errors")
        log.info("NTS-KE from %s: %s", self._address, exc)
        tls = self._tls
        if tls is not None:
            with contextlib.suppress(NtsError):
                tls.send(ke.build_error(exc.code))
        self._close()

    def _fail(self, reason: str) -> None:
        if self._phase == _DONE:
            return
        self._finish("ke_failed")
        log.info("NTS-KE from %s: %s", self._address, reason)
        self._close()

    def _timed_out(self) -> None:
        self._timer = None
        if self._phase == _HANDSHAKE:
            self._fail(f"TLS handshake timed out after {self._server.handshake_timeout:g} s")
        elif self._phase == _REQUEST:
            self._fail("timed out waiting for the NTS-KE request")

    def _finish(self, counter: str) -> None:
        """Count the connection's one outcome; the caller closes it."""
        self._phase = _DONE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server.stats.add(counter)

    def _close(self) -> None:
        # close_notify, then everything still queued (answer, alert) in one
        # write; transport.close() sends it before closing the socket.
        tls = self._tls
        transport = self._transport
        if tls is not None:
            tls.close_notify()
            self._write(tls.output())
        if transport is not None and not transport.is_closing():
            transport.close()

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def abort(self, reason: str | None) -> None:
        """Cut the connection now, counting it as failed if it was still open."""
        if self._phase != _DONE:
            self._phase = _DONE
            self._server.stats.add("ke_failed")
            if reason is not None:
                log.info("NTS-KE from %s: %s", self._address, reason)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.abort()
