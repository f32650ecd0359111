"""One serving process of ``ntspy serve`` (or of ``ntspy run`` when it serves time).

:class:`ServerDaemon` assembles the server's parts for one process: the key store
(and the fleet's ring with ``ntskeystore``), the NTP responder on the UDP sockets,
the NTS-KE server on the TCP ones, the once-a-second housekeeping (key rotation or
reload, counters, the client log), the control socket's server views and the
metrics collector.  :class:`Sockets` binds the listening sockets before anything
else starts, so that workers can share them.

How processes are composed around it (one process or a supervisor and its
workers, privileges, the control socket, metrics) is the composition root's
business: ``ntspy/serve.py`` for ``ntspy serve``, ``ntspy/run.py`` for ``ntspy run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..clock import Clock, SystemClock
from ..config import Config, RateLimit
from ..errors import CertificateError, NtsError
from ..net.tls.credentials import ServerContexts
from ..net.udp import UdpServer
from ..privileges import PrivilegeError, lookup
from ..proto import aead
from ..proto.ntp import Leap, SyncState, unix_ns_to_ntp
from .access import AccessTable
from .clientlog import ClientLog, ClientLogTable
from .fleet import Fleet, StoreConfig
from .ke_server import KeServer
from .keys import KeyStore
from .negotiation import KePolicy
from .ratelimit import RateLimiter
from .responder import RandomPool, Responder
from .stats import StatsTable

if TYPE_CHECKING:  # prometheus_client is imported only with metricsaddress
    from .collector import ServerCollector

log = logging.getLogger("ntspy.server")

HOUSEKEEPING_INTERVAL = 1.0
"""Seconds between housekeeping rounds (key rotation or reload, counters, client log)."""


def _limiter(rl: RateLimit | None) -> RateLimiter | None:
    return RateLimiter(rl.interval, rl.burst, rl.leak) if rl is not None else None


def _bind_addresses(config: Config) -> list[str]:
    return config.bindaddress or (["::"] if socket.has_ipv6 else ["0.0.0.0"])


def open_udp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def open_tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(slots=True)
class Sockets:
    """The listening sockets, bound before any worker starts."""

    ntp: list[socket.socket] = field(default_factory=list)
    ke: list[socket.socket] = field(default_factory=list)

    @classmethod
    def bind(cls, config: Config) -> Sockets:
        out = cls()
        try:
            for host in _bind_addresses(config):
                if config.port:
                    out.ntp.append(_bound(open_udp_socket, "UDP (NTP)", host, config.port))
                if config.ntsport and config.ntsservercert:
                    out.ke.append(_bound(open_tcp_socket, "TCP (NTS-KE)", host, config.ntsport))
        except OSError:
            out.close()
            raise
        return out

    def close(self) -> None:
        for s in self.ntp + self.ke:
            s.close()


def _user_uids(config: Config) -> frozenset[int]:
    """The uid ``user`` names (its files are the server's own), if it exists."""
    if not config.user:
        return frozenset()
    try:
        return frozenset({lookup(config.user).pw_uid})
    except PrivilegeError:
        return frozenset()


class BindError(OSError):
    """A server socket could not be bound; the message says which and why."""

    def __str__(self) -> str:
        return str(self.strerror)


def _bound(opener: Any, protocol: str, host: str, port: int) -> socket.socket:
    """Open a listening socket; the errors an operator meets say what to do."""
    try:
        sock: socket.socket = opener(host, port)
    except OSError as exc:
        where = f"{protocol} port {port} on {host or 'all addresses'}"
        if exc.errno in (errno.EACCES, errno.EPERM) and 0 < port < 1024:
            raise BindError(exc.errno, f"cannot bind {where}: ports below 1024 need root or "
                                     "CAP_NET_BIND_SERVICE") from None
        if exc.errno == errno.EADDRINUSE:
            raise BindError(exc.errno, f"{where} is already in use (another NTP server, "
                                     "e.g. chronyd, running?)") from None
        raise BindError(exc.errno, f"cannot bind {where}: {exc.strerror or exc}") from None
    return sock


class ServerDaemon:
    """Everything one serving process runs; the demo and tests use it in-process."""

    def __init__(
        self,
        config: Config,
        sockets: Sockets,
        *,
        clock: Clock | None = None,
        stats: StatsTable | None = None,
        worker: int = 0,
        manage_keys: bool = True,
        key_dir: Path | None = None,
        clients: ClientLogTable | None = None,
    ) -> None:
        """``clients``: the client log shared with the other processes (workers);
        without it, one of this process's own unless ``noclientlog``."""
        self.config = config
        self.sockets = sockets
        self.clock = clock or SystemClock()
        self.stats_table = stats or StatsTable()
        self.stats = self.stats_table.row(worker)
        self.worker = worker
        if clients is None and not config.noclientlog:
            clients = ClientLogTable(1, config.clientloglimit)
        self.clients_table = clients
        self.client_log: ClientLog | None = None  # this process's writer, once serving
        self.manage_keys = manage_keys
        # ntskeystore: the fleet rotates the ring (server/fleet.py), not this server alone.
        self.fleet_store = StoreConfig.from_config(config) if manage_keys else None
        self.keys = KeyStore(key_dir or config.ntsdumpdir,
                             0 if self.fleet_store is not None else config.ntsrotate,
                             trusted_uids=_user_uids(config))
        self.fleet: Fleet | None = None
        self.contexts: ServerContexts | None = None
        self.responder: Responder | None = None
        self.ke_server: KeServer | None = None
        self.udp: list[UdpServer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.local_state = config.local_stratum

    def load_credentials(self) -> None:
        pairs = self.config.nts_server_credentials()
        if pairs:
            self.contexts = ServerContexts(pairs, datetime.now(UTC))

    async def start(self) -> None:
        now_s = self.clock.now_ns() // 1_000_000_000
        if self.manage_keys:
            self.keys.load(now_s)
            await self.start_fleet()
        else:
            self.keys.refresh()
        if self.clients_table is not None:
            self.client_log = self.clients_table.log(self.worker)
        responder = Responder(
            self.keys.ring,
            self.stats,
            RandomPool(),
            access=AccessTable(self.config.access),
            ratelimit=_limiter(self.config.ratelimit),
            clients=self.client_log,
        )
        self.responder = responder
        self._update_sync_state()
        clock = self.clock

        def handle(data: bytes, addr: Any, rx_ns: int) -> bytes | None:
            return responder.handle(data, addr[0], rx_ns, clock.now_ns)

        for sock in self.sockets.ntp:
            self.udp.append(UdpServer(sock, clock, handle))
        if self.sockets.ke:
            if self.contexts is None:
                self.load_credentials()
            assert self.contexts is not None
            allowed = self.config.ntsaeads or aead.supported()
            self.ke_server = KeServer(
                self.contexts,
                self.keys.ring,
                KePolicy(
                    [a for a in allowed if a in aead.supported()],
                    self.config.ntsntpserver,
                    self.ntp_port,
                ),
                self.stats,
                max_connections=self.config.maxntsconnections,
                client_connections=self.config.ntsclientconnections,
                session_timeout=self.config.ntssessiontimeout,
                ratelimit=_limiter(self.config.ntsratelimit),
                access=self.config.is_allowed,
                clients=self.client_log,
            )
            for sock in self.sockets.ke:
                await self.ke_server.start(None, 0, sock=sock)
        self._tasks.append(asyncio.create_task(self._housekeeping()))

    async def start_fleet(self, settle: float = 0.0, loop: bool = True) -> None:
        """With ``ntskeystore``: one look at the fleet's ring before serving, then keep
        in step (``loop``); ``settle``: how long our workers take to load a change."""
        if self.fleet_store is None or self.fleet is not None:
            return
        fleet = Fleet(self.fleet_store, self.keys.ring, self.config.ntsrotate,
                      self.keys.try_save, settle=settle)
        if loop:
            self.fleet = fleet
            await fleet.start()
        else:
            await fleet.step()
            await fleet.stop()

    async def stop_fleet(self) -> None:
        if self.fleet is not None:
            await self.fleet.stop()
            self.fleet = None

    @property
    def ntp_port(self) -> int:
        if self.sockets.ntp:
            return int(self.sockets.ntp[0].getsockname()[1])
        return self.config.port

    @property
    def ke_port(self) -> int:
        if self.sockets.ke:
            return int(self.sockets.ke[0].getsockname()[1])
        return self.config.ntsport

    def _update_sync_state(self) -> None:
        if self.responder is not None and self.local_state is not None:
            self.responder.state = SyncState.local(
                self.local_state, unix_ns_to_ntp(self.clock.now_ns())
            )

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            self._update_sync_state()
            try:
                if self.manage_keys:
                    self.keys.rotate_if_due(self.clock.now_ns() // 1_000_000_000)
                else:
                    self.keys.refresh()
            except (OSError, NtsError) as exc:
                log.error("NTS key housekeeping failed: %s", exc)
            self.refresh_counters()
            self.flush_clients()

    def flush_clients(self) -> None:
        """Publish this process's NTP hits to the shared client log (see clientlog.py)."""
        if self.client_log is not None:
            self.client_log.flush(self.clock.now_ns())

    def refresh_counters(self) -> None:
        kernel = sum(u.stats.kernel_rx_timestamps for u in self.udp)
        daemon = sum(u.stats.daemon_rx_timestamps for u in self.udp)
        self.stats.add("kernel_rx", kernel - self.stats.get("kernel_rx"))
        self.stats.add("daemon_rx", daemon - self.stats.get("daemon_rx"))

    def reload_certificates(self) -> None:
        if self.contexts is None:
            return
        try:
            self.contexts.reload(datetime.now(UTC))
            log.info("reloaded NTS server certificates")
        except (CertificateError, OSError) as exc:
            hint = f" (readable by uid {os.geteuid()}?)" if os.geteuid() else ""
            log.error("certificate reload failed, keeping the old ones: %s%s", exc, hint)
            return
        if self.ke_server is not None:
            self.ke_server.certificates_reloaded()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.refresh_counters()
        self.flush_clients()
        for u in self.udp:
            u.close()
        if self.ke_server is not None:
            await self.ke_server.close()
        await self.stop_fleet()
        if self.manage_keys:
            self.keys.try_save()

    def control_handlers(self) -> dict[str, Any]:
        async def serverstats(args: list[str]) -> dict[str, int]:
            self.refresh_counters()
            return self.stats_table.totals()

        async def keys(args: list[str]) -> list[dict[str, Any]]:
            now = self.clock.now_ns() // 1_000_000_000
            ring = self.keys.ring
            rows: list[dict[str, Any]] = [{"id": k.key_id, "age": now - k.created}
                                          for k in ring.keys]
            rows += [{"id": k.key_id, "age": now - k.created, "pending": True}
                     for k in ring.pending]
            if self.fleet is not None:  # the fleet's view, on every row's neighbour
                st = self.fleet.status
                rows.append({"keystore": {"connected": st.connected, "leader": st.leader,
                                          "serial": st.serial, "members": st.members,
                                          "errors": st.errors}})
            return rows

        async def clients(args: list[str]) -> list[dict[str, Any]]:
            # Every process's entries, merged by address; this process's are exact,
            # a worker's NTP columns up to one housekeeping round (1 s) old.
            if self.clients_table is None:
                return []
            self.flush_clients()
            return self.clients_table.to_json(self.clock.now_ns())

        return {"serverstats": serverstats, "serverkeys": keys, "clients": clients}

    def own_clock_handlers(self) -> dict[str, Any]:
        """What ``ntspy serve`` alone says of its clock for chronyc's client views: it
        serves ``local stratum N`` and has no sources (as a chronyd with no sources)."""

        async def tracking(args: list[str]) -> dict[str, Any]:
            state = self.responder.state if self.responder is not None else None
            synced = state is not None and state.leap != Leap.UNSYNCHRONIZED
            return {
                "synchronised": synced, "reference": "127.127.1.1" if synced else None,
                "stratum": state.stratum if state is not None else 0,
                "leap": int(state.leap) if state is not None else 3,
                "ref_time_ns": self.clock.now_ns() if synced else None,
                "system_time_offset": 0.0, "last_offset": 0.0, "rms_offset": 0.0,
                "frequency_ppm": 0.0, "residual_freq_ppm": 0.0, "skew_ppm": 0.0,
                "root_delay": state.root_delay if state is not None else 0.0,
                "root_dispersion": state.root_dispersion if state is not None else 0.0,
                "update_interval": 0.0, "updates": 0, "clock_control": False,
            }

        async def none(args: list[str]) -> list[dict[str, Any]]:
            return []

        async def activity(args: list[str]) -> dict[str, int]:
            return dict.fromkeys(("online", "offline", "burst_online", "burst_offline",
                                  "unresolved"), 0)

        return {"tracking": tracking, "sources": none, "sourcestats": none, "ntpdata": none,
                "authdata": none, "selectdata": none, "activity": activity}

    def metrics_collector(self) -> ServerCollector:
        """The server's metrics (all processes) for :class:`~ntspy.metrics.MetricsServer`."""
        _allow_ssl()
        from .collector import ServerCollector

        return ServerCollector(self.stats_table, lambda: self.keys.ring,
                               lambda: self.clock.now_ns() / 1e9, self.clients_table,
                               lambda: self.fleet.status if self.fleet is not None else None)


def _allow_ssl() -> None:
    """Let ``import ssl`` work again: a lean ``ntspy serve`` keeps it out (cli.py,
    ~5 MiB per process), but prometheus_client imports it.  Only the process that
    serves the metrics (the supervisor, or the one server process) pays for it:
    the one that asks for :meth:`ServerDaemon.metrics_collector`."""
    if "ssl" in sys.modules and sys.modules["ssl"] is None:
        del sys.modules["ssl"]
