"""An on-path attacker for tests: a UDP (NTP) and TCP (NTS-KE) man in the middle on loopback.

The client is pointed at the proxy's ports; the proxy forwards to the real
server and lets the test decide, datagram by datagram, what the client gets:
the real thing, nothing, a late copy, a rewritten copy, an old one, or
something forged from the request it just saw. Everything that passes through
(and everything injected) is recorded, so tests can check what went over the
wire afterwards.

It serves one client at a time, which is all the attacks need: responses go
to whichever client address sent the last request.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

LOOPBACK = "127.0.0.1"

RequestHook = Callable[[bytes], "bytes | None"]
"""Rewrites a request on its way to the server; None drops it."""
ResponseHook = Callable[[bytes, bytes], Sequence[bytes]]
"""(server response, the last request) -> the datagrams the client gets, in order."""
ForgeHook = Callable[[bytes], Sequence[bytes]]
"""A request -> forged datagrams sent to the client at once, before the server answers."""


class Direction(enum.Enum):
    REQUEST = "request"  # client -> proxy, as the client sent it
    RESPONSE = "response"  # server -> proxy, as the server sent it
    DELIVERED = "delivered"  # proxy -> client, whatever the attacker chose to send
    INJECTED = "injected"  # proxy -> client, forged or replayed outside the response flow


@dataclass(slots=True)
class Datagram:
    """One datagram the proxy saw or sent, and when (event loop time)."""

    direction: Direction
    data: bytes
    at: float


class _Front(asyncio.DatagramProtocol):
    def __init__(self, proxy: UdpProxy) -> None:
        self.proxy = proxy

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.proxy._from_client(data, addr)


class _Back(asyncio.DatagramProtocol):
    def __init__(self, proxy: UdpProxy) -> None:
        self.proxy = proxy

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.proxy._from_server(data)


@dataclass
class UdpProxy:
    """A UDP man in the middle between one client and ``upstream``.

    Set the attributes at any time to change what it does next:

    ``drop_requests`` / ``drop_responses``
        swallow everything in that direction;
    ``request_delay`` / ``response_delay``
        seconds to hold each datagram before passing it on;
    ``on_request``
        rewrite (or drop, by returning None) each request;
    ``on_response``
        turn each server response into the list of datagrams the client gets
        (tampered copies, replays, nothing, the original...);
    ``forge``
        answer each request at once with forged datagrams of the attacker's own.
    """

    upstream: tuple[str, int]
    drop_requests: bool = False
    drop_responses: bool = False
    request_delay: float = 0.0
    response_delay: float = 0.0
    on_request: RequestHook | None = None
    on_response: ResponseHook | None = None
    forge: ForgeHook | None = None
    records: list[Datagram] = field(default_factory=list)
    _front: asyncio.DatagramTransport | None = None
    _back: asyncio.DatagramTransport | None = None
    _client: Any = None
    _last_request: bytes = b""
    _timers: set[asyncio.TimerHandle] = field(default_factory=set)

    async def start(self) -> int:
        """Bind on an ephemeral loopback port and return it."""
        loop = asyncio.get_running_loop()
        front, _ = await loop.create_datagram_endpoint(
            lambda: _Front(self), local_addr=(LOOPBACK, 0)
        )
        back, _ = await loop.create_datagram_endpoint(
            lambda: _Back(self), remote_addr=self.upstream
        )
        self._front, self._back = front, back
        return self.port

    @property
    def port(self) -> int:
        assert self._front is not None, "proxy not started"
        return int(self._front.get_extra_info("sockname")[1])

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for transport in (self._front, self._back):
            if transport is not None:
                transport.close()

    # -- what went over the wire ------------------------------------------------

    def seen(self, direction: Direction) -> list[bytes]:
        return [d.data for d in self.records if d.direction is direction]

    @property
    def requests(self) -> list[bytes]:
        return self.seen(Direction.REQUEST)

    @property
    def responses(self) -> list[bytes]:
        """Everything the server sent (before any tampering)."""
        return self.seen(Direction.RESPONSE)

    # -- active attacks ----------------------------------------------------------

    def inject(self, data: bytes) -> None:
        """Send ``data`` to the client now, as if from the server."""
        self._to_client(data, Direction.INJECTED)

    def send_to_server(self, data: bytes) -> None:
        """Send a request of the attacker's own to the server; it is recorded as a request."""
        assert self._back is not None, "proxy not started"
        self.records.append(Datagram(Direction.REQUEST, data, self._now()))
        self._back.sendto(data)

    def replay(self, index: int = -1) -> bytes:
        """Re-send a recorded server response (default: the latest); returns it."""
        data = self.responses[index]
        self.inject(data)
        return data

    # -- plumbing -----------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        if delay <= 0:
            action()
            return

        def fire() -> None:
            self._timers.discard(handle)
            action()

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    def _from_client(self, data: bytes, addr: Any) -> None:
        self.records.append(Datagram(Direction.REQUEST, data, self._now()))
        self._client = addr
        self._last_request = data
        if self.forge is not None:
            for forged in self.forge(data):
                self._to_client(forged, Direction.INJECTED)
        if self.drop_requests:
            return
        out = self.on_request(data) if self.on_request is not None else data
        if out is None or self._back is None:
            return
        back = self._back
        self._later(self.request_delay, lambda: back.sendto(out))

    def _from_server(self, data: bytes) -> None:
        self.records.append(Datagram(Direction.RESPONSE, data, self._now()))
        if self.drop_responses:
            return
        if self.on_response is not None:
            out = list(self.on_response(data, self._last_request))
        else:
            out = [data]

        def deliver() -> None:
            for item in out:
                self._to_client(item, Direction.DELIVERED)

        self._later(self.response_delay, deliver)

    def _to_client(self, data: bytes, direction: Direction) -> None:
        if self._front is None or self._client is None:
            return
        self.records.append(Datagram(direction, data, self._now()))
        self._front.sendto(data, self._client)


class KeMode(enum.Enum):
    FORWARD = "forward"  # relay the TLS bytes untouched
    RESET = "reset"  # accept, then abort the connection (RST)
    CLOSE = "close"  # accept, then close without a byte
    REFUSE = "refuse"  # stop listening: connections are refused
    STALL = "stall"  # accept and read, never answer


@dataclass
class TcpProxy:
    """A TCP man in the middle for NTS-KE: relays, resets, closes or refuses."""

    upstream: tuple[str, int]
    mode: KeMode = KeMode.FORWARD
    connections: int = 0
    bytes_to_server: int = 0
    bytes_to_client: int = 0
    _server: asyncio.Server | None = None
    _port: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._connection, LOOPBACK, 0)
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def port(self) -> int:
        return self._port

    async def refuse(self) -> None:
        """Close the listener: from now on the port answers with RST (refused)."""
        self.mode = KeMode.REFUSE
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode is KeMode.RESET:
            writer.transport.abort()
            return
        if self.mode is KeMode.STALL:
            with contextlib.suppress(ConnectionError, OSError):
                while await reader.read(65536):
                    pass
            writer.close()
            return
        if self.mode is not KeMode.FORWARD:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        to_server = asyncio.create_task(self._pump(reader, up_writer, True))
        to_client = asyncio.create_task(self._pump(up_reader, writer, False))
        self._tasks.update((to_server, to_client))
        try:
            await asyncio.gather(to_server, to_client)
        finally:
            self._tasks.difference_update((to_server, to_client))

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if upstream:
                    self.bytes_to_server += len(data)
                else:
                    self.bytes_to_client += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
