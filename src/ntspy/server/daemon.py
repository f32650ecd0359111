"""``ntspy serve``: the NTS server daemon (NTS-KE + NTP responder).

One process by default; with ``ntsprocesses N`` (N > 1) the main process
binds the sockets, forks N workers that all answer NTP and NTS-KE on them,
and keeps the jobs that must happen once: master key rotation (workers pick
new keys up from the key file), the control socket and adding up the
counters, which live in shared memory, as does the client log (``clients``),
and the Prometheus endpoint (``metricsaddress``), which reads them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import logging
import os
import pwd
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..clock import Clock, SystemClock
from ..config import Config, RateLimit, load_config
from ..control.protocol import DEFAULT_SOCKET, ControlServer, udp_addresses
from ..errors import CertificateError, ConfigError, NtsError, StateFileError
from ..net.tls.credentials import ServerContexts
from ..net.udp import UdpServer
from ..pidfile import AlreadyRunning, PidFile
from ..privileges import PrivilegeError, drop_to, hand_over, lookup, startup_failure
from ..proto import aead
from ..proto.ntp import Leap, SyncState, unix_ns_to_ntp
from ..sdnotify import notify
from .access import AccessTable
from .clientlog import ClientLog, ClientLogTable
from .fleet import Fleet, KeyStoreError, StoreConfig
from .ke_server import KeServer
from .keys import KeyStore
from .negotiation import KePolicy
from .ratelimit import RateLimiter
from .responder import RandomPool, Responder
from .stats import StatsTable

if TYPE_CHECKING:  # prometheus_client is imported only with metricsaddress
    from ..metrics import MetricsServer
    from .collector import ServerCollector

log = logging.getLogger("ntspy.server")

HOUSEKEEPING_INTERVAL = 1.0
DEFAULT_PIDFILE = Path("/run/ntspy/ntspy-serve.pid")


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


# ---------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--config", required=True, type=Path, help="configuration file")
    parser.add_argument("-u", dest="user", default=None,
                        help="after binding and reading keys, run as this user (chrony's 'user')")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )


class _JournalFormatter(logging.Formatter):
    """Lines for journald: no timestamp of our own (the journal has one) and
    the record's syslog priority as a ``<N>`` prefix (sd-daemon(3))."""

    _PRIORITY: ClassVar[dict[int, int]] = {
        logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
        logging.DEBUG: 7,
    }

    def format(self, record: logging.LogRecord) -> str:
        prio = self._PRIORITY.get(record.levelno, 6)
        return f"<{prio}>{record.name}: {super().format(record)}"


def report_ignored(config: Config) -> None:
    """Every accepted directive or source option that is not acted on, once, at start,
    with the file and line it is in (an included file's own name)."""
    for filename, lineno, directive in config.ignored:
        log.warning("%s:%d: ignoring directive %s (not supported)", filename, lineno, directive)
    for src in config.sources:
        if src.ignored_options:
            log.warning("%s %s: ignoring options %s (not supported)",
                        "pool" if src.pool else "server", src.name,
                        ", ".join(src.ignored_options))


def setup_logging(level: str, logfile: Path | None = None) -> None:
    """Log to stderr (to journald when it is the journal), or to ``logfile`` (``-l``)."""
    handler: logging.Handler
    if logfile is not None:
        handler = logging.FileHandler(logfile)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        if os.environ.get("JOURNAL_STREAM"):
            handler.setFormatter(_JournalFormatter("%(message)s"))
        else:
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def control_path(config: Config) -> Path:
    for entry in config.bindcmdaddress:
        if entry.startswith("/"):
            return Path(entry)
    return DEFAULT_SOCKET


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        config = load_config(args.config)
        report_ignored(config)
        if args.user:
            config.user = args.user
        account = lookup(config.user) if config.user else None
        pidfile = PidFile(config.pidfile or DEFAULT_PIDFILE)
        try:
            if config.ntsprocesses <= 1:
                return asyncio.run(_serve(config, account))
            return _serve_workers(config, account)
        finally:
            pidfile.release()
    except (ConfigError, CertificateError, AlreadyRunning, StateFileError, KeyStoreError,
            OSError) as exc:
        print(startup_failure(exc, "start the server"), file=sys.stderr)
        return 1


def start_metrics(config: Config, daemon: ServerDaemon) -> MetricsServer | None:
    """The ``metricsaddress`` endpoint serving ``daemon``'s metrics, started, or None
    when not configured; :class:`~ntspy.metrics.MetricsBindError` if it cannot listen."""
    if config.metricsaddress is None:
        return None
    _allow_ssl()
    from ..metrics import MetricsServer

    server = MetricsServer(*config.metricsaddress)
    server.add_collector("server", daemon.metrics_collector())
    server.start()
    return server


def _allow_ssl() -> None:
    """Let ``import ssl`` work again: a lean ``ntspy serve`` keeps it out (cli.py,
    ~5 MiB per process), but prometheus_client imports it.  Only the process that
    serves the metrics (the supervisor, or the one server process) pays for it."""
    if "ssl" in sys.modules and sys.modules["ssl"] is None:
        del sys.modules["ssl"]


def _stop_metrics(server: MetricsServer | None) -> None:
    if server is not None:
        server.stop()


def _stop_event() -> asyncio.Event:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def drop_privileges(account: pwd.struct_passwd | None, dirs: list[Path | None]) -> None:
    """After start-up: run as ``account`` with no capabilities; its key directory
    handed over so that rotations can still be written."""
    if account is None:
        return
    hand_over([d for d in dirs if d is not None], account)
    drop_to(account, keep_sys_time=False)
    log.info("running as user %s (uid %d), no capabilities", account.pw_name, account.pw_uid)


async def _serve(config: Config, account: pwd.struct_passwd | None = None) -> int:
    sockets = Sockets.bind(config)
    daemon = ServerDaemon(config, sockets)
    daemon.load_credentials()
    await daemon.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_certificates)
    control = ControlServer(control_path(config),
                            {**daemon.own_clock_handlers(), **daemon.control_handlers()},
                            udp_addresses(config))
    await control.start()
    try:
        metrics = start_metrics(config, daemon)
    except OSError:
        await control.close()
        await daemon.stop()
        sockets.close()
        raise
    drop_privileges(account, [config.ntsdumpdir])
    log.info("serving NTP on port %d and NTS-KE on port %d", daemon.ntp_port, daemon.ke_port)
    stop = _stop_event()
    notify("READY=1", f"STATUS=serving NTP on port {daemon.ntp_port}, "
           f"NTS-KE on port {daemon.ke_port}", f"MAINPID={os.getpid()}")
    await stop.wait()
    notify("STOPPING=1")
    log.info("shutting down")
    _stop_metrics(metrics)
    await control.close()
    await daemon.stop()
    sockets.close()
    return 0


def _serve_workers(config: Config, account: pwd.struct_passwd | None = None) -> int:
    sockets = Sockets.bind(config)
    stats = StatsTable(config.ntsprocesses, shared=True)
    private_keys = None
    key_dir = config.ntsdumpdir
    if key_dir is None:
        # Workers learn about rotations from the key file: without ntsdumpdir,
        # keep it in a private directory that lives as long as the server.
        private_keys = tempfile.TemporaryDirectory(prefix="ntspy-keys-")
        key_dir = Path(private_keys.name)
    clients = (None if config.noclientlog
               else ClientLogTable(config.ntsprocesses, config.clientloglimit, shared=True))
    main = ServerDaemon(config, Sockets(), stats=stats, key_dir=key_dir, clients=clients)
    main.load_credentials()  # fail at start-up, before forking, on a bad certificate
    main.keys.load(int(time.time()))
    # ntskeystore: the workers start with the fleet's ring (one look, before forking)
    asyncio.run(main.start_fleet(loop=False))
    children: dict[int, int] = {}

    def spawn(worker: int) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _die_with_parent(parent)
                code = asyncio.run(_worker(config, sockets, stats, worker, key_dir, account,
                                           clients))
            finally:
                os._exit(code)
        children[pid] = worker

    # Move everything alive now out of the collector's reach: a collection in a
    # worker would otherwise touch (and so un-share) every page it inherited.
    gc.collect()
    gc.freeze()
    for w in range(config.ntsprocesses):
        spawn(w)
    try:
        return asyncio.run(_supervise(config, main, children, spawn, account, key_dir))
    finally:
        _stop_workers(list(children))
        main.keys.try_save()
        sockets.close()
        if private_keys is not None:
            private_keys.cleanup()


WORKER_STOP_TIMEOUT = 10.0
"""Seconds the supervisor waits for its workers to leave at shutdown."""


def _stop_workers(pids: list[int]) -> None:
    """SIGTERM every worker until it has exited (a worker still switching users may
    refuse a signal from an unprivileged supervisor for a moment: ask again)."""
    deadline = time.monotonic() + WORKER_STOP_TIMEOUT
    left = set(pids)
    while left:
        for pid in list(left):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                left.discard(pid)
        if not left:
            return
        if time.monotonic() > deadline:
            log.error("workers %s did not stop; leaving them to their parent-death signal",
                      sorted(left))
            return
        time.sleep(0.05)


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """A worker gets SIGTERM when the supervisor dies, however it dies (kill -9
    too): no orphan keeps holding the server's ports."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("worker: cannot ask for the parent-death signal: %s",
                    os.strerror(ctypes.get_errno()))
    if os.getppid() != parent:  # the supervisor died before the request took
        os.kill(os.getpid(), signal.SIGTERM)


async def _worker(
    config: Config, sockets: Sockets, stats: StatsTable, worker: int, key_dir: Path,
    account: pwd.struct_passwd | None = None, clients: ClientLogTable | None = None,
) -> int:
    daemon = ServerDaemon(
        config, sockets, stats=stats, worker=worker, manage_keys=False, key_dir=key_dir,
        clients=clients,
    )
    await daemon.start()
    if account is not None:
        drop_to(account, keep_sys_time=False)
        # Changing credentials clears the parent-death signal: ask for it again.
        _die_with_parent(os.getppid())
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, daemon.reload_certificates)
    await _stop_event().wait()
    await daemon.stop()
    return 0


async def _supervise(
    config: Config, main: ServerDaemon, children: dict[int, int], spawn: Any,
    account: pwd.struct_passwd | None = None, key_dir: Path | None = None,
) -> int:
    control = ControlServer(control_path(config),
                            {**main.own_clock_handlers(), **main.control_handlers()},
                            udp_addresses(config))
    await control.start()
    try:
        metrics = start_metrics(config, main)
    except OSError:
        await control.close()
        raise
    # Workers reload the key file once a housekeeping round: a change the fleet
    # makes reaches all of them within two.
    await main.start_fleet(settle=2 * HOUSEKEEPING_INTERVAL + 0.5)
    drop_privileges(account, [key_dir])
    stop = _stop_event()
    loop = asyncio.get_running_loop()

    def forward_hup() -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGHUP)

    loop.add_signal_handler(signal.SIGHUP, forward_hup)
    log.info("serving with %d worker processes", len(children))
    notify("READY=1", f"STATUS=serving with {len(children)} worker processes",
           f"MAINPID={os.getpid()}")
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), HOUSEKEEPING_INTERVAL)
        main.keys.rotate_if_due(int(time.time()))
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = children.pop(pid, None)
            if worker is not None and not stop.is_set():
                log.error("worker %d (pid %d) exited with %d; restarting", worker, pid, status)
                spawn(worker)
    await main.stop_fleet()
    _stop_metrics(metrics)
    await control.close()
    return 0
