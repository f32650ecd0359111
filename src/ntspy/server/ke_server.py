"""The NTS-KE server: TCP + TLS 1.3 around :func:`negotiation.negotiate`.

Bounded in every direction: concurrent connections (``maxntsconnections``),
concurrent connections per client (``ntsclientconnections``: an IPv4 address
or an IPv6 /64), the per-client connection rate (``ntsratelimit``), one
deadline for the whole session from accept to the last byte written
(``ntssessiontimeout``, 2 s as chronyd's), and the KE message size.  A client
holding idle connections therefore holds at most its share, for at most the
session timeout each, and every other client is still served.  Each failure
closes the connection and is counted; nothing a client sends can stop the
server from accepting the next.

Every accepted connection ends in exactly one of ``ke_completed`` (cookies
sent), ``ke_errors`` (an Error record sent, or a refusal such as no common
AEAD) and ``ke_failed`` (TLS failure, timeout, hang-up; timeouts are also
counted in ``ke_timeouts``).  A connection refused at the door counts as
``ke_denied`` (allow/deny) or as ``ke_dropped``, with one reason when a limit refused it:
``ke_drop_full``, ``ke_drop_client`` (its share), ``ke_drop_rate``.
A completed exchange also counts its cookies (``ke_cookies``) and its
latency, accept to answer, in the handshake histogram (stats.py); every
connection, admitted or not, is logged in the client log (clientlog.py).

Two interchangeable ways to serve a listening socket, with the same
answers, counters and log lines:

- the compiled engine (``ntspy._ke``, built when a C compiler and libssl-dev
  are there): accept, TLS and the socket I/O run in C over the system
  OpenSSL, and Python is called once per connection to turn the request into
  the answer (:class:`_NativeListener`).  Python around the TLS work was half
  of a key exchange's CPU time; see docs/performance.md.
- the pure-Python fallback: one :class:`KeServerProtocol` per connection
  feeds what the socket delivers straight into pyOpenSSL's memory BIO
  (:class:`~ntspy.net.tls.server.ServerTls`): no StreamReader/StreamWriter, no task,
  one timer handle per phase.  It serves when the engine is not built, when
  ``NTSPY_NO_ACCEL=1``, or when the system OpenSSL refuses the certificates.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Final

from ..errors import KeProtocolError, NtsError
from ..net.tls.credentials import HAVE_NATIVE_KE, ServerContexts
from ..net.tls.ntske import NTSKE_ALPN, ServerTlsFailure, handshake_error
from ..net.tls.server import ServerTls
from ..proto import ke
from ..proto.cookies import KeyRing
from .clientlog import ClientLog
from .negotiation import KeOutcome, KePolicy, Negotiator, negotiate
from .ratelimit import RateLimiter, Verdict
from .stats import ServerStats

log = logging.getLogger("ntspy.server.ke")

SESSION_TIMEOUT = 2.0  # seconds from accept to the last byte (chronyd: 2 s too)
CLIENT_CONNECTIONS = 8  # concurrent connections per client, default
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
        session_timeout: float = SESSION_TIMEOUT,
        client_connections: int = CLIENT_CONNECTIONS,
        use_native: bool = True,
        access: Callable[[str], bool] | None = None,
        clients: ClientLog | None = None,
    ) -> None:
        """``access`` is the ``allow``/``deny`` rule set, asked at accept, before TLS:
        a denied address gets no handshake, let alone cookies (as chronyd).
        ``clients``: the client log every connection is counted in."""
        self.contexts = contexts
        self.clients = clients
        self._loop: asyncio.AbstractEventLoop | None = None
        self.access = access
        self.keyring = keyring
        self.policy = policy
        self.stats = stats
        self.max_connections = max_connections
        self.ratelimit = ratelimit
        self.random_bytes = random_bytes
        self.session_timeout = session_timeout
        self.client_connections = client_connections
        self._per_client: dict[str, int] = {}  # the asyncio path's open connections
        self.use_native = use_native  # False: always the asyncio path
        self.negotiator = Negotiator(policy, keyring, random_bytes)
        self._protocols_active = 0
        self._acceptors: list[_Acceptor] = []
        self._listeners: list[_NativeListener] = []
        self._live: set[KeServerProtocol] = set()
        # Every read lands here and is handed to OpenSSL at once, so one
        # buffer serves all connections of this (single-threaded) server.
        self.receive_buffer = bytearray(RECEIVE_BUFFER)

    @property
    def native(self) -> bool:
        """Whether new listening sockets are served by the compiled engine."""
        return self.use_native and HAVE_NATIVE_KE and self.contexts.native is not None

    @property
    def active(self) -> int:
        """Connections being served right now."""
        return self._protocols_active + sum(li.engine.active for li in self._listeners)

    async def start(self, host: str | None, port: int, sock: socket.socket | None = None) -> None:
        """Listen on ``sock`` if given, else on ``host``:``port`` (0: any free port)."""
        loop = self._loop = asyncio.get_running_loop()
        if self.native:
            for listening in [sock] if sock is not None else _listen(host, port):
                self._listeners.append(_NativeListener(self, listening))
            return
        self.contexts.context()  # pyOpenSSL's Contexts now: any error at start, not later
        for listening in [sock] if sock is not None else _listen(host, port):
            self._acceptors.append(_Acceptor(self, listening, loop))

    def _protocol(self) -> KeServerProtocol:
        return KeServerProtocol(self)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        socks = [a.sock for a in self._acceptors] + [li.sock for li in self._listeners]
        return [s.getsockname()[:2] for s in socks]

    def certificates_reloaded(self) -> None:
        """Serve new connections with what :meth:`ServerContexts.reload` loaded."""
        native = self.contexts.native
        for listener in self._listeners:
            if native is not None:
                listener.engine.set_tls(native)
            else:
                log.warning("the compiled NTS-KE server keeps the old certificates: "
                            "the system OpenSSL refused the new ones")

    async def close(self) -> None:
        """Stop listening and cut the connections still open (counted as failed)."""
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        for acceptor in self._acceptors:
            acceptor.close()
        self._acceptors.clear()
        for proto in list(self._live):
            proto.abort(end_message(self, KeEnd.SHUTDOWN, "", None))
        await asyncio.sleep(0)  # let the transports run their connection_lost

    def allowed(self, address: str) -> bool:
        """``allow``/``deny`` for ``address``; a denied one is counted (``ke_denied``)."""
        if self.access is None or self.access(address):
            return True
        self.stats.add("ke_denied")
        return False

    def admit(self, address: str, same: int, active: int) -> bool:
        """Whether a new connection from ``address`` may be served, given ``same``
        connections open now from that client and ``active`` in all; a refusal
        is counted in ``ke_dropped`` and by its reason."""
        if active >= self.max_connections:
            reason = "ke_drop_full"
        elif same >= self.client_connections:
            reason = "ke_drop_client"
        else:
            limiter = self.ratelimit
            if limiter is None or limiter.check(address, time.monotonic_ns()) is Verdict.PASS:
                return True
            reason = "ke_drop_rate"
        self.stats.add("ke_dropped")
        self.stats.add(reason)
        return False

    def log_client(self, address: str, dropped: bool, when_ns: int | None = None) -> None:
        """Count a connection from ``address`` in the client log (event loop thread)."""
        if self.clients is not None:
            self.clients.nke(address, time.time_ns() if when_ns is None else when_ns, dropped)

    def log_client_threadsafe(self, address: str, dropped: bool) -> None:
        """:meth:`log_client` from another thread (the compiled engine's)."""
        loop = self._loop
        if self.clients is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing: nobody reads it now
            loop.call_soon_threadsafe(self.log_client, address, dropped, time.time_ns())

    def completed(self, outcome: KeOutcome, seconds: float) -> None:
        """Count a KE answered with cookies, ``seconds`` after its accept."""
        stats = self.stats
        stats.add("ke_completed")
        stats.add("ke_cookies", outcome.cookies)
        stats.observe_handshake(seconds)

    def timed_out_message(self, phase: str) -> str:
        """The log words for a session that ran out of time (both back ends)."""
        return f"NTS-KE session timed out after {self.session_timeout:g} s {phase}"


def client_key(address: str) -> str:
    """Who a connection counts against for ``ntsclientconnections``: an IPv4
    address, or an IPv6 /64 (one host is usually given a whole /64)."""
    if ":" not in address:
        return address
    try:
        packed = socket.inet_pton(socket.AF_INET6, address)
    except OSError:
        return address
    return packed[:8].hex()


# accept() errors that mean "out of descriptors or memory for now"
_RESOURCE_ERRORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_PAUSE = 1.0  # seconds without accept() after one of them
ACCEPTS_PER_WAKE = 64


class _Acceptor:
    """The asyncio path's accept loop on one listening socket.

    Not ``loop.create_server``: after EMFILE, Python 3.11's accept loop keeps
    calling accept() and re-schedules itself once per try (CPython
    gh-151615), and under that storm our server stopped answering.  Here one
    resource error stops accepting for :data:`ACCEPT_PAUSE` seconds.
    """

    __slots__ = ("_retry", "_tasks", "loop", "server", "sock")

    def __init__(self, server: KeServer, sock: socket.socket, loop: asyncio.AbstractEventLoop):
        sock.setblocking(False)
        self.server = server
        self.sock = sock
        self.loop = loop
        self._retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    log.warning("NTS-KE server cannot accept connections (%s); pausing %g s",
                                exc.strerror, ACCEPT_PAUSE)
                    self.loop.remove_reader(self.sock.fileno())
                    self._retry = self.loop.call_later(ACCEPT_PAUSE, self._resume)
                else:
                    log.error("NTS-KE server: accept() failed: %s", exc)
                return
            task = self.loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.server._protocol, conn)
        except OSError:  # the client left before its transport was made
            conn.close()

    def _resume(self) -> None:
        self._retry = None
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        else:
            self.loop.remove_reader(self.sock.fileno())
        for task in self._tasks:
            task.cancel()
        self.sock.close()


class KeServerProtocol(asyncio.BufferedProtocol):
    """One NTS-KE connection: TLS handshake, one request, one response, close.

    A BufferedProtocol so the transport reads into the server's one receive
    buffer instead of allocating a fresh 256 KiB bytes object for every read.
    """

    __slots__ = (
        "_accepted_ns",
        "_address",
        "_phase",
        "_reader",
        "_records",
        "_server",
        "_timer",
        "_tls",
        "_transport",
        "_who",
    )

    def __init__(self, server: KeServer) -> None:
        self._server = server
        self._phase = _DONE  # until connection_made admits the connection
        self._address = "?"
        self._who = "client"
        self._accepted_ns = 0
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
        self._accepted_ns = time.monotonic_ns()
        if not server.allowed(address):
            server.log_client(address, True)
            transport.abort()
            return
        key = client_key(address)
        if not server.admit(address, server._per_client.get(key, 0), server.active):
            server.log_client(address, True)
            transport.abort()
            return
        try:
            who = self._who = f"client {peer[0]} port {peer[1]}" if peer else "client"
            self._tls = ServerTls(server.contexts, who)
        except Exception:  # a TLS library surprise must not kill the server
            server.stats.add("ke_dropped")
            server.log_client(address, True)
            log.exception("cannot set up TLS for an NTS-KE connection from %s", address)
            transport.abort()
            return
        server.log_client(address, False)
        server._protocols_active += 1
        server._per_client[key] = server._per_client.get(key, 0) + 1
        server._live.add(self)
        server.stats.add("ke_accepted")
        self._phase = _HANDSHAKE
        # One deadline for the whole session: handshake, request, answer.
        self._timer = asyncio.get_running_loop().call_later(
            server.session_timeout, self._timed_out
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
        except ServerTlsFailure as exc:
            self._fail(KeEnd.of(exc.kind), exc.detail)
        except NtsError as exc:
            self._fail(KeEnd.LOST, str(exc))
        except Exception:  # nothing a client sends may take the server down
            log.exception("NTS-KE with %s failed unexpectedly", self._address)
            self.abort(None)

    def eof_received(self) -> bool:
        if self._phase == _HANDSHAKE:
            self._fail(KeEnd.EOF_HANDSHAKE)
        elif self._phase == _REQUEST:
            try:
                self._end_of_stream()
            except KeProtocolError as exc:
                self._refuse(exc)
            except NtsError as exc:
                self._fail(KeEnd.LOST, str(exc))
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
            log.info("NTS-KE from %s: %s", self._address,
                     end_message(server, KeEnd.LOST, self._who, str(exc) if exc else None))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        server._protocols_active -= 1
        key = client_key(self._address)
        left = server._per_client.get(key, 1) - 1
        if left > 0:
            server._per_client[key] = left
        else:
            server._per_client.pop(key, None)
        server._live.discard(self)
        self._tls = None
        self._reader = None

    # -- the exchange ----------------------------------------------------------

    def _request_phase(self) -> None:
        self._phase = _REQUEST
        self._reader = ke.RecordReader()

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
            self._phase = _DONE
            server.completed(outcome, (time.monotonic_ns() - self._accepted_ns) / 1e9)
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

    def _fail(self, end: KeEnd, detail: str | bytes | None = None) -> None:
        if self._phase == _DONE:
            return
        self._finish("ke_failed")
        if end.timed_out:
            self._server.stats.add("ke_timeouts")
        log.info("NTS-KE from %s: %s", self._address,
                 end_message(self._server, end, self._who, detail))
        self._close()

    def _timed_out(self) -> None:
        self._timer = None
        if self._phase == _HANDSHAKE:
            self._fail(KeEnd.TIMEOUT_HANDSHAKE)
        elif self._phase == _REQUEST:
            self._fail(KeEnd.TIMEOUT_REQUEST)
        elif self._transport is not None:
            self._transport.abort()  # answered, but the client does not read it

    def _finish(self, counter: str) -> None:
        """Count the connection's one outcome; the caller closes it.  The session
        deadline stays armed: it also bounds the closing write."""
        self._phase = _DONE
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


# -- the compiled engine -------------------------------------------------------


def _listen(host: str | None, port: int) -> list[socket.socket]:
    """Listening TCP sockets on ``host``:``port`` as asyncio's create_server makes them."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(100)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class KeEnd(enum.StrEnum):
    """How an accepted NTS-KE connection ended without an answer: one name for each
    way, the same in both back ends (the compiled engine reports these strings,
    :class:`~ntspy.net.tls.ntske.ServerTlsFailure` carries them for the asyncio path),
    and one table, :func:`end_message`, for what the log says."""

    TLS = "tls"  # the handshake failed (OpenSSL's reason)
    ALPN = "alpn"  # the client offered ALPN, not ntske/1
    NO_ALPN = "no-alpn"  # the client offered no ALPN at all
    EOF_HANDSHAKE = "eof-handshake"
    TLS_RECEIVE = "tls-receive"  # a bad record after the handshake
    TIMEOUT_HANDSHAKE = "timeout-handshake"
    TIMEOUT_REQUEST = "timeout-request"
    SHUTDOWN = "shutdown"
    LOST = "lost"  # the connection went away (reset, a send that failed...)

    @classmethod
    def of(cls, kind: str) -> KeEnd:
        try:
            return cls(kind)
        except ValueError:
            return cls.LOST

    @property
    def timed_out(self) -> bool:
        return self in (KeEnd.TIMEOUT_HANDSHAKE, KeEnd.TIMEOUT_REQUEST)


def end_message(server: KeServer, end: KeEnd, who: str, detail: str | bytes | None) -> str:
    """The log words for ``end`` of a connection from ``who``, for both back ends."""
    if end is KeEnd.ALPN:
        offered = _alpn_names(detail if isinstance(detail, bytes) else b"")
        return f"{who}: client offered ALPN {offered}, not {NTSKE_ALPN.decode()}"
    text = detail.decode("ascii", "replace") if isinstance(detail, bytes) else detail
    if end is KeEnd.TLS:
        return str(handshake_error(text or "unknown TLS error", who, who))
    if end is KeEnd.NO_ALPN:
        return f"{who} did not offer ALPN {NTSKE_ALPN.decode()}"
    if end is KeEnd.EOF_HANDSHAKE:
        return "client closed the connection during the TLS handshake"
    if end is KeEnd.TLS_RECEIVE:
        return f"TLS error receiving from {who}: {text}"
    if end is KeEnd.TIMEOUT_HANDSHAKE:
        return server.timed_out_message("in the TLS handshake")
    if end is KeEnd.TIMEOUT_REQUEST:
        return server.timed_out_message("waiting for the request")
    if end is KeEnd.SHUTDOWN:
        return "server shutting down"
    return f"connection lost ({text or 'closed'})"


def _alpn_names(wire: bytes) -> str:
    """An ALPN protocol list (RFC 7301 s3.1, without its length prefix), for a log line."""
    names: list[str] = []
    view = memoryview(wire)
    while view:
        length = view[0]
        names.append(bytes(view[1 : 1 + length]).decode("ascii", "replace"))
        view = view[1 + length :]
    return ", ".join(names) or "nothing"


class _NativeListener:
    """One listening socket served by ``ntspy._ke.Engine``; Python decides the NTS part.

    Every accepted connection gets exactly one of :meth:`on_request` and
    :meth:`on_failed` from the engine, so the counters add up as in the
    asyncio path.  The engine calls them on its own thread, holding the GIL:
    they touch only the counters, the rate limiter, the key ring (replaced
    whole on rotation) and the log, and hand the client log's entries to the
    event loop's thread (``call_soon_threadsafe``): that log has one writer.
    """

    __slots__ = ("engine", "server", "sock")

    def __init__(self, server: KeServer, sock: socket.socket) -> None:
        from .._ke import Engine

        native = server.contexts.native
        assert native is not None
        sock.setblocking(False)
        self.server = server
        self.sock = sock
        self.engine = Engine(
            sock.fileno(), native, self.on_accept, self.on_request, self.on_failed,
            server.session_timeout,
        )
        self.engine.start()

    def close(self) -> None:
        self.engine.close()  # stops and joins the engine's thread first
        self.sock.close()

    def on_accept(self, host: str, same: int) -> bool:
        server = self.server
        if not server.allowed(host):
            server.log_client_threadsafe(host, True)
            return False
        # One listener (the usual case): its engine's count is the server's.
        # The engine counts the new connection as active already.
        active = self.engine.active if len(server._listeners) == 1 else server.active
        if server.admit(host, same, active - 1):
            server.stats.add("ke_accepted")
            server.log_client_threadsafe(host, False)
            return True
        server.log_client_threadsafe(host, True)
        return False

    def on_request(self, data: bytes, eof: bool) -> bytes:
        # ``eof``: the client ended the stream; the message must be whole anyway.
        server = self.server
        try:
            outcome = server.negotiator.answer(data, self.engine.export)
        except KeProtocolError as exc:
            server.stats.add("ke_errors")
            log.info("NTS-KE from %s: %s", self.engine.peer(), exc)
            return ke.build_error(exc.code)
        except Exception:  # nothing a client sends may take the server down
            server.stats.add("ke_failed")
            log.exception("NTS-KE with %s failed unexpectedly", self.engine.peer())
            return b""
        if outcome.error_code is not None or outcome.aead_id is None:
            server.stats.add("ke_errors")
            log.info("NTS-KE from %s refused: %s", self.engine.peer(), outcome.reason)
        else:
            server.completed(outcome, self.engine.elapsed())
        return outcome.response

    def on_failed(self, who: str | None, kind: str, detail: str | bytes | None) -> None:
        if who is None:  # accept() itself failed: nothing was accepted
            log.warning("NTS-KE server cannot accept connections (%s); pausing 1 s", detail)
            return
        end = KeEnd.of(kind)
        self.server.stats.add("ke_failed")
        if end.timed_out:
            self.server.stats.add("ke_timeouts")
        log.info("NTS-KE from %s: %s", who, end_message(self.server, end, who, detail))
