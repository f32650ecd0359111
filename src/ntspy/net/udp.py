"""asyncio UDP endpoints that know when each datagram arrived.

The receive time T4 (client) or T2 (server) is best taken by the kernel when
the packet comes off the wire, not when Python gets around to reading it: with
``SO_TIMESTAMPNS`` Linux attaches a ``struct timespec`` (CLOCK_REALTIME) to
every datagram as an ``SCM_TIMESTAMPNS`` control message.  Where the kernel
gives none, the :class:`~ntspy.clock.Clock` is read right after ``recvmsg``
instead, and the result says which of the two was used.

Sockets are non-blocking and read with ``loop.add_reader`` + ``recvmsg``
(asyncio's datagram transports drop the ancillary data).  Each wakeup drains
every queued datagram in a plain loop: no task per packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._optional import require_compiled
from ..clock import Clock, SystemClock
from .dns import getaddrinfo

log = logging.getLogger(__name__)

try:
    require_compiled()
    from .._accel import recv_batch as _recv_batch
    from .._accel import send_batch as _send_batch
except ImportError:  # not built, built before it had these, or disabled
    _recv_batch = None  # type: ignore[assignment]
    _send_batch = None  # type: ignore[assignment]

BATCHED = _recv_batch is not None
"""Whether servers read and answer with recvmmsg/sendmmsg (``ntspy._accel``) by default."""

# Linux values; Python's socket module does not export these names.
# SO_TIMESTAMPNS doubles as the control message type SCM_TIMESTAMPNS.  On
# 64-bit platforms the "old" option already carries 64-bit seconds.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
_TIMESPEC = struct.Struct("@ll")  # struct timespec: tv_sec, tv_nsec as native longs
_TS_SIZE = _TIMESPEC.size
_ANC_BUFSIZE = socket.CMSG_SPACE(_TS_SIZE)
_NS = 1_000_000_000
# As plain ints: `flags & socket.MSG_TRUNC` would go through enum.Flag per packet.
_MSG_TRUNC = int(socket.MSG_TRUNC)
_SOL_SOCKET = int(socket.SOL_SOCKET)

MAX_DATAGRAM = 4096
"""Receive buffer size; NTS packets stay well under it (chrony caps at ~1.1 KB)."""

MAX_DRAIN = 256
"""Datagrams handled per wakeup at most, so a flood cannot starve the event loop."""

CLIENT_QUEUE = 64
"""Datagrams a client keeps unread at most; beyond that they are dropped."""


@dataclass(slots=True)
class Received:
    """One datagram and when it arrived (Unix ns)."""

    data: bytes
    rx_ns: int
    kernel_ts: bool  # True: stamped by the kernel; False: read from the Clock
    addr: Any = None


@dataclass(slots=True)
class UdpStats:
    """Counters of one endpoint."""

    received: int = 0
    kernel_rx_timestamps: int = 0
    daemon_rx_timestamps: int = 0
    truncated: int = 0
    dropped: int = 0  # client: queue full; server: handler raised
    sent: int = 0
    send_errors: int = 0


def enable_rx_timestamps(sock: socket.socket) -> bool:
    """Ask the kernel to stamp received datagrams; False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


def kernel_rx_ns(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The SCM_TIMESTAMPNS receive time in Unix ns, if the kernel attached one."""
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == SCM_TIMESTAMPNS and len(cdata) >= _TIMESPEC.size:
            seconds, nanos = _TIMESPEC.unpack_from(cdata)
            return int(seconds) * _NS + int(nanos)
    return None


class _Endpoint:
    """A non-blocking datagram socket read by the event loop."""

    def __init__(self, sock: socket.socket, clock: Clock) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.clock = clock
        self.stats = UdpStats()
        self.kernel_timestamps = enable_rx_timestamps(sock)
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(MAX_DRAIN):
            try:
                data, ancdata, flags, addr = self.sock.recvmsg(MAX_DATAGRAM, _ANC_BUFSIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # On a connected socket an ICMP error (port unreachable) shows
                # up here; the subclass decides what it means.
                self._error(exc)
                return
            rx_ns = kernel_rx_ns(ancdata)
            kernel = rx_ns is not None
            if rx_ns is None:
                rx_ns = self.clock.now_ns()
                self.stats.daemon_rx_timestamps += 1
            else:
                self.stats.kernel_rx_timestamps += 1
            self.stats.received += 1
            if flags & socket.MSG_TRUNC:
                self.stats.truncated += 1
                continue
            self._datagram(Received(data, rx_ns, kernel, addr))

    def _datagram(self, received: Received) -> None:
        raise NotImplementedError

    def _error(self, exc: OSError) -> None:
        log.debug("UDP socket error: %s", exc)

    def close(self) -> None:
        """Stop reading and close the socket; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):  # the loop may already be closed
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


class UdpClient(_Endpoint):
    """A connected UDP socket for talking to one server."""

    def __init__(self, sock: socket.socket, clock: Clock, peer: tuple[str, int]) -> None:
        super().__init__(sock, clock)
        self.peer = peer
        self._queue: asyncio.Queue[Received | OSError] = asyncio.Queue(CLIENT_QUEUE)

    @classmethod
    async def open(cls, host: str, port: int, clock: Clock | None = None) -> UdpClient:
        """Resolve ``host`` (IPv4 or IPv6) and connect a socket to the first address that takes.

        Raises ``OSError`` (``socket.gaierror`` for a name that does not resolve).
        """
        infos = await getaddrinfo(host, port, socket.SOCK_DGRAM)
        last: OSError | None = None
        for family, type_, proto, _, sockaddr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            return cls(sock, clock or SystemClock(), (str(sockaddr[0]), int(sockaddr[1])))
        raise last or OSError(f"no address found for {host}")

    def send(self, data: bytes) -> int:
        """Send ``data``; returns the clock reading taken immediately before the send (T1).

        The packet is fully built before the clock is read, so nothing but the
        system call itself lies between T1 and the packet leaving.
        """
        tx_ns = self.clock.now_ns()
        try:
            self.sock.send(data)
        except OSError:
            self.stats.send_errors += 1
            raise
        self.stats.sent += 1
        return tx_ns

    async def recv(self, timeout: float) -> Received | None:
        """The next datagram from the peer, or None after ``timeout`` seconds.

        Raises the ``OSError`` the kernel reported for an earlier send, e.g.
        ``ConnectionRefusedError`` when nothing listens on the peer's port.
        """
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None
        if isinstance(item, OSError):
            raise item
        return item

    def _datagram(self, received: Received) -> None:
        try:
            self._queue.put_nowait(received)
        except asyncio.QueueFull:
            self.stats.dropped += 1

    def _error(self, exc: OSError) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(exc)


Handler = Callable[[bytes, Any, int], "bytes | None"]
"""Server callback: (datagram, client address, receive time in Unix ns) -> reply or None."""


class UdpServer(_Endpoint):
    """A bound UDP socket that answers each datagram through a synchronous handler.

    Use :meth:`bind`, or construct it directly around an already bound socket
    (``UdpServer(sock, clock, handler)``, inside a running event loop), e.g.
    one inherited from a parent process or opened before dropping privileges.
    """

    def __init__(self, sock: socket.socket, clock: Clock, handler: Handler) -> None:
        # Set before the reader is registered. Tests flip it to compare the two loops.
        self.batched = BATCHED
        super().__init__(sock, clock)
        self.handler = handler

    @classmethod
    async def bind(
        cls, host: str, port: int, handler: Handler, clock: Clock | None = None
    ) -> UdpServer:
        """Bind to ``host``:``port`` (port 0: any free port) and start answering."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
        )
        if not infos:
            raise OSError(f"cannot resolve bind address {host}")
        family, type_, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            if family == socket.AF_INET6 and host in ("::", ""):
                # Dual-stack only when asked for the wildcard.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(sockaddr)
        except OSError:
            sock.close()
            raise
        return cls(sock, clock or SystemClock(), handler)

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the real port when bound to 0)."""
        name = self.sock.getsockname()
        return str(name[0]), int(name[1])

    def _readable(self) -> None:
        if self.batched:
            self._readable_batched()
        else:
            self._readable_single()

    def _readable_batched(self) -> None:
        # The same steps and counters as _readable_single, with one recvmmsg
        # for up to MAX_DRAIN datagrams and one sendmmsg for all the replies:
        # two system calls per wakeup instead of two per datagram.
        assert _recv_batch is not None and _send_batch is not None
        fd = self.sock.fileno()
        try:
            batch = _recv_batch(fd, MAX_DRAIN, MAX_DATAGRAM)
        except InterruptedError:
            return
        except OSError as exc:
            self._error(exc)
            return
        if not batch:
            return
        handler = self.handler
        kernel = truncated = dropped = 0
        daemon_ns = -1
        replies: list[tuple[bytes, Any]] = []
        try:
            for data, addr, rx_ns in batch:
                if rx_ns < 0:
                    # No kernel stamp: one clock reading for the batch, taken
                    # before any handler runs (right after the read, as before).
                    if daemon_ns < 0:
                        daemon_ns = self.clock.now_ns()
                    rx_ns = daemon_ns
                else:
                    kernel += 1
                if data is None:
                    truncated += 1
                    continue
                try:
                    reply = handler(data, addr, rx_ns)
                except Exception:
                    # A handler bug must not kill the socket for every other client.
                    dropped += 1
                    log.exception("UDP handler failed on a datagram from %s", addr)
                    continue
                if reply is not None:
                    replies.append((reply, addr))
        finally:
            received = len(batch)
            stats = self.stats
            stats.received += received
            stats.kernel_rx_timestamps += kernel
            stats.daemon_rx_timestamps += received - kernel
            stats.truncated += truncated
            stats.dropped += dropped
            if replies:
                # Also when a handler raised something other than Exception:
                # the replies already made still go out.
                self._send_replies(fd, replies)

    def _send_replies(self, fd: int, replies: list[tuple[bytes, Any]]) -> None:
        assert _send_batch is not None
        stats = self.stats
        try:
            sent = _send_batch(fd, replies)
        except (TypeError, ValueError):
            # A reply send_batch does not take (not bytes, say): one sendto
            # each, so the others still go out and the error shows as before.
            for reply, addr in replies:
                try:
                    self.sock.sendto(reply, addr)
                except OSError as exc:
                    stats.send_errors += 1
                    log.debug("sendto %s failed: %s", addr, exc)
                    continue
                stats.sent += 1
            return
        stats.sent += sent
        if sent != len(replies):
            stats.send_errors += len(replies) - sent
            log.debug("%d of %d replies could not be sent", len(replies) - sent, len(replies))

    def _readable_single(self) -> None:
        # The server's hot loop without the accelerator: the same steps as _Endpoint._readable, with
        # everything it touches per datagram bound to locals, no Received
        # object, and the counters added once per wakeup.
        sock = self.sock
        recvmsg, sendto, handler = sock.recvmsg, sock.sendto, self.handler
        now_ns = self.clock.now_ns
        unpack = _TIMESPEC.unpack_from
        received = kernel = truncated = dropped = sent = send_errors = 0
        try:
            for _ in range(MAX_DRAIN):
                try:
                    data, ancdata, flags, addr = recvmsg(MAX_DATAGRAM, _ANC_BUFSIZE)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    self._error(exc)
                    return
                received += 1
                rx_ns: int | None = None
                if ancdata:
                    level, ctype, cdata = ancdata[0]
                    if ctype == SCM_TIMESTAMPNS and level == _SOL_SOCKET and len(cdata) >= _TS_SIZE:
                        seconds, nanos = unpack(cdata)
                        rx_ns = seconds * _NS + nanos
                        kernel += 1
                    else:
                        rx_ns = kernel_rx_ns(ancdata)
                        kernel += rx_ns is not None
                if rx_ns is None:
                    rx_ns = now_ns()
                if flags & _MSG_TRUNC:
                    truncated += 1
                    continue
                try:
                    reply = handler(data, addr, rx_ns)
                except Exception:
                    # A handler bug must not kill the socket for every other client.
                    dropped += 1
                    log.exception("UDP handler failed on a datagram from %s", addr)
                    continue
                if reply is None:
                    continue
                try:
                    sendto(reply, addr)
                except OSError as exc:
                    send_errors += 1
                    log.debug("sendto %s failed: %s", addr, exc)
                    continue
                sent += 1
        finally:
            stats = self.stats
            stats.received += received
            stats.kernel_rx_timestamps += kernel
            stats.daemon_rx_timestamps += received - kernel
            stats.truncated += truncated
            stats.dropped += dropped
            stats.sent += sent
            stats.send_errors += send_errors

