"""``ntspy serve -f FILE``: the NTS server daemon's composition root.

It wires what a server process is made of (``server/daemon.py``'s
:class:`~ntspy.server.daemon.ServerDaemon` and :class:`~ntspy.server.daemon.Sockets`)
into the running service: configuration, pidfile, the listening sockets, the
control socket, the Prometheus endpoint (``metricsaddress``), the switch to
``user``, systemd's notifications and the signals.

One process by default; with ``ntsprocesses N`` (N > 1) the main process binds
the sockets, forks N workers that all answer NTP and NTS-KE on them, and keeps
the jobs that must happen once: master key rotation (workers pick new keys up
from the key file), the fleet's key ring, the control socket and adding up the
counters, which live in shared memory, as does the client log (``clients``),
and the Prometheus endpoint, which reads them.  A worker that exits is
restarted; workers die with their supervisor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import pwd
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config, load_config
from .control.protocol import ControlServer, control_path, udp_addresses
from .errors import CertificateError, ConfigError, StateFileError
from .logsetup import report_ignored, setup_logging
from .pidfile import AlreadyRunning, PidFile
from .privileges import drop_to, hand_over, lookup, startup_failure
from .sdnotify import notify
from .server.clientlog import ClientLogTable
from .server.daemon import HOUSEKEEPING_INTERVAL, ServerDaemon, Sockets
from .server.fleet import KeyStoreError
from .server.stats import StatsTable

if TYPE_CHECKING:  # prometheus_client is imported only with metricsaddress
    from .metrics import MetricsServer

log = logging.getLogger("ntspy.server")

DEFAULT_PIDFILE = Path("/run/ntspy/ntspy-serve.pid")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--config", required=True, type=Path, help="configuration file")
    parser.add_argument("-u", dest="user", default=None,
                        help="after binding and reading keys, run as this user (chrony's 'user')")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )


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
    collector = daemon.metrics_collector()  # first: it lets ssl in, prometheus_client needs it
    from .metrics import MetricsServer

    server = MetricsServer(*config.metricsaddress)
    server.add_collector("server", collector)
    server.start()
    return server


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


async def _monitoring(config: Config, daemon: ServerDaemon
                      ) -> tuple[ControlServer, MetricsServer | None]:
    """The command socket (chronyc's protocol and ``ntspy ctl``) and the
    ``metricsaddress`` endpoint for ``daemon``, both started; OSError (with
    neither left open) when one cannot listen."""
    control = ControlServer(control_path(config),
                            {**daemon.own_clock_handlers(), **daemon.control_handlers()},
                            udp_addresses(config))
    await control.start()
    try:
        return control, start_metrics(config, daemon)
    except OSError:
        await control.close()
        raise


async def _serve(config: Config, account: pwd.struct_passwd | None = None) -> int:
    sockets = Sockets.bind(config)
    daemon = ServerDaemon(config, sockets)
    daemon.load_credentials()
    await daemon.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_certificates)
    try:
        control, metrics = await _monitoring(config, daemon)
    except OSError:
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
    control, metrics = await _monitoring(config, main)
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
