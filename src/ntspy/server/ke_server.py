"""The NTS-KE server: TCP + TLS 1.3 around :func:`negotiation.negotiate`.

Bounded in every direction: concurrent connections (``maxntsconnections``),
per-address connection rate (``ntsratelimit``), handshake and read
deadlines, and the KE message size. Each failure closes the connection and
is counted; nothing a client sends can stop the server from accepting the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

from ..errors import KeError, KeProtocolError, NtsError
from ..net.tls import ServerContexts, TlsStream
from ..proto import ke
from ..proto.cookies import KeyRing
from .negotiation import KePolicy, negotiate
from .ratelimit import RateLimiter, Verdict
from .stats import ServerStats

log = logging.getLogger("ntspy.server.ke")

HANDSHAKE_TIMEOUT = 5.0
REQUEST_TIMEOUT = 5.0


class KeServer:
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

    async def start(self, host: str | None, port: int, sock: socket.socket | None = None) -> None:
        if sock is not None:
            server = await asyncio.start_server(
                self._connection, sock=sock, limit=ke.MAX_MESSAGE_SIZE
            )
        else:
            server = await asyncio.start_server(
                self._connection, host, port, reuse_address=True, limit=ke.MAX_MESSAGE_SIZE
            )
        self._servers.append(server)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for srv in self._servers for s in srv.sockets]

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        for srv in self._servers:
            await srv.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if peer else "?"
        if self.active >= self.max_connections or (
            self.ratelimit is not None
            and self.ratelimit.check(address, time.monotonic_ns()) is not Verdict.PASS
        ):
            self.stats.add("ke_dropped")
            writer.transport.abort()
            return
        self.active += 1
        self.stats.add("ke_accepted")
        try:
            await self._serve(reader, writer, address)
        finally:
            self.active -= 1

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str
    ) -> None:
        try:
            stream = await TlsStream.accept(
                reader, writer, self.contexts, handshake_timeout=self.handshake_timeout
            )
        except NtsError as exc:
            self.stats.add("ke_failed")
            log.info("NTS-KE from %s: %s", address, exc)
            return
        except Exception:  # a TLS library surprise must not kill the server
            self.stats.add("ke_failed")
            log.exception("NTS-KE handshake with %s failed unexpectedly", address)
            writer.transport.abort()
            return
        try:
            records = await self._read_request(stream)
            outcome = negotiate(
                records, self.policy, self.keyring, stream.export_keying_material,
                self.random_bytes,
            )
            await stream.send(outcome.response)
            if outcome.error_code is not None or outcome.aead_id is None:
                self.stats.add("ke_errors")
                log.info("NTS-KE from %s refused: %s", address, outcome.reason)
            else:
                self.stats.add("ke_completed")
        except KeProtocolError as exc:
            self.stats.add("ke_errors")
            log.info("NTS-KE from %s: %s", address, exc)
            with contextlib.suppress(NtsError):
                await stream.send(ke.build_error(exc.code))
        except NtsError as exc:
            self.stats.add("ke_failed")
            log.info("NTS-KE from %s: %s", address, exc)
        except Exception:
            self.stats.add("ke_failed")
            log.exception("NTS-KE with %s failed unexpectedly", address)
        finally:
            await stream.close()

    async def _read_request(self, stream: TlsStream) -> list[ke.Record]:
        reader = ke.RecordReader()
        records: list[ke.Record] = []
        deadline = time.monotonic() + self.request_timeout
        while not reader.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KeError("timed out waiting for the NTS-KE request")
            data = await stream.recv(16384, timeout=remaining)
            if not data:
                reader.eof()
                break
            records.extend(reader.feed(data))
        return records
