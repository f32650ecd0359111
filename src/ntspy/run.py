"""``ntspy run -f FILE``: the long-running client daemon, serving time too if configured.

Like chronyd: ``-x`` leaves the system clock alone (it is only measured),
``-s`` restores the time saved at the last shutdown when the clock is behind
it (machines without an RTC). Everything runs in one process and one thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from .client.daemon import ClientDaemon, ClientOptions
from .clock import ClockAdjtimeError, ClockControl, MeasureOnlyClock, SystemClockControl
from .config import Config, load_config, parse_config
from .control.protocol import ControlServer, control_path, udp_addresses
from .errors import CertificateError, ConfigError, NtsError
from .logsetup import report_ignored, setup_logging
from .net.dns import TYPE_A, TYPE_AAAA
from .pidfile import AlreadyRunning, PidFile
from .privileges import drop_to, hand_over, lookup, startup_failure
from .proto.ntp import SyncState
from .sdnotify import notify
from .server.daemon import ServerDaemon, Sockets
from .sync.discipline import Tracking
from .sync.select import Selection

log = logging.getLogger("ntspy.run")


DEFAULT_CONFIG = Path("/etc/ntspy/ntspy.conf")
DEFAULT_PIDFILE = Path("/run/ntspy/ntspy.pid")
ONESHOT_TIMEOUT = 30.0
"""Seconds ``-q``/``-Q`` wait for a measurement when ``-t`` does not say."""
_CHRONY_LEVELS = {-1: "debug", 0: "info", 1: "warning", 2: "error", 3: "critical"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("The client daemon, with chronyd's command line: "
                          "ntspy run [-f FILE] [-d] [-x] [-q|-Q] ['DIRECTIVE'...]")
    parser.add_argument("directives", nargs="*", metavar="DIRECTIVE",
                        help="configuration lines; given any, the configuration file is not "
                             "read (as with chronyd)")
    parser.add_argument("-f", "--config", type=Path, default=None,
                        help=f"configuration file (default {DEFAULT_CONFIG})")
    parser.add_argument("-x", dest="no_clock_control", action="store_true",
                        help="never adjust the system clock, only measure it (like chronyd -x)")
    parser.add_argument("-s", dest="restore_time", action="store_true",
                        help="at start, step the clock to the time saved at shutdown if it is "
                             "behind it (machines without an RTC)")
    parser.add_argument("-d", dest="debug", action="count", default=0,
                        help="stay in the foreground, log to stderr (twice: debug messages)")
    parser.add_argument("-n", dest="foreground", action="store_true",
                        help="stay in the foreground (ntspy always does; systemd runs it so)")
    parser.add_argument("-q", dest="set_once", action="store_true",
                        help="set the clock once (stepping it) and exit, like ntpdate")
    parser.add_argument("-Q", dest="measure_once", action="store_true",
                        help="measure once, print how wrong the clock is, exit; never sets it")
    parser.add_argument("-t", dest="timeout", type=float, default=None,
                        help=f"with -q/-Q, give up after this many seconds "
                             f"(default {ONESHOT_TIMEOUT:g})")
    parser.add_argument("-u", dest="user", default=None,
                        help="after start-up, run as this user (chrony's 'user')")
    family = parser.add_mutually_exclusive_group()
    family.add_argument("-4", dest="ipv4", action="store_true", help="resolve names to IPv4 only")
    family.add_argument("-6", dest="ipv6", action="store_true", help="resolve names to IPv6 only")
    parser.add_argument("-l", dest="logfile", type=Path, default=None,
                        help="log to this file (appended) instead of stderr")
    parser.add_argument("-L", dest="level", type=int, choices=sorted(_CHRONY_LEVELS),
                        default=None, help="least severity logged: -1 debug, 0 info, "
                                           "1 warning, 2 error, 3 fatal (chronyd's -L)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])


def serves_time(config: Config) -> bool:
    """chrony opens its NTP server port only when some client is allowed."""
    return any(rule.allow for rule in config.access) or bool(config.ntsservercert)


def families(args: argparse.Namespace) -> tuple[int, ...]:
    """The DNS record types names are resolved to: chronyd's -4 and -6."""
    return (TYPE_A,) if args.ipv4 else (TYPE_AAAA,) if args.ipv6 else (TYPE_A, TYPE_AAAA)


def _level(args: argparse.Namespace) -> str:
    if args.level is not None:
        return _CHRONY_LEVELS[args.level]
    return "debug" if args.debug >= 2 else str(args.log_level)


def _config(args: argparse.Namespace) -> Config:
    if args.directives:
        return parse_config("\n".join(args.directives) + "\n", "<command line>")
    path = args.config or DEFAULT_CONFIG
    if args.config is None and not path.exists():
        raise ConfigError("no such file (give -f FILE, or directives on the command line)",
                          str(path))
    return load_config(path)


def run(args: argparse.Namespace) -> int:
    if args.set_once and args.measure_once:
        print("ntspy: -q sets the clock and -Q never does: give one of them", file=sys.stderr)
        return 2
    setup_logging(_level(args), args.logfile)
    try:
        config = _config(args)
        report_ignored(config)
        if args.user:
            config.user = args.user
        clock: ClockControl
        if args.no_clock_control or args.measure_once:
            clock = MeasureOnlyClock()
        else:
            system = SystemClockControl(config.maxslewrate)
            try:
                system.probe()
            except ClockAdjtimeError as exc:
                print(f"ntspy: cannot steer the system clock ({exc}): run as root with "
                      "CAP_SYS_TIME, or with -x to only measure it", file=sys.stderr)
                return 1
            clock = system
        options = ClientOptions(restore_time=args.restore_time, families=families(args))
        if args.set_once or args.measure_once:
            if args.set_once:
                config.makestep = (0.0, 1)  # the one update steps, whatever its size
            timeout = ONESHOT_TIMEOUT if args.timeout is None else args.timeout
            return asyncio.run(_once(config, clock, options, timeout, args.set_once))
        return asyncio.run(_main(config, clock, options))
    except (ConfigError, CertificateError, AlreadyRunning, OSError) as exc:
        print(startup_failure(exc, "start"), file=sys.stderr)
        return 1


async def _once(config: Config, clock: ClockControl, options: ClientOptions,
                timeout: float, set_clock: bool) -> int:
    """chronyd -q / -Q: one clock update (a step with -q, none with -Q), then exit."""
    client = ClientDaemon(config, clock, options)
    await client.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while client.clock_updates == 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await client.stop()
    if client.clock_updates == 0:
        reason = client.selection.reason if client.selection else "no answer"
        print(f"No suitable source for synchronisation ({reason})", file=sys.stderr)
        return 1
    # chrony's sign: positive = the system clock is ahead of true time.
    wrong = -client.tracking().last_offset
    print(f"System clock wrong by {wrong:.6f} seconds ({'step' if set_clock else 'ignored'})")
    return 0


def _drop_privileges(config: Config, keep_sys_time: bool) -> None:
    """After start-up: become ``config.user``, keeping CAP_SYS_TIME only to steer."""
    if not config.user:
        return
    account = lookup(config.user)
    own = [p for p in (config.ntsdumpdir, config.logdir) if p is not None]
    for path in hand_over(own, account):
        log.debug("%s now belongs to %s", path, account.pw_name)
    drop_to(account, keep_sys_time)
    log.info("running as user %s (uid %d)%s", account.pw_name, account.pw_uid,
             ", keeping CAP_SYS_TIME" if keep_sys_time else ", no capabilities")
    for directory in {p for p in (config.ntsdumpdir,
                                  config.driftfile.parent if config.driftfile else None) if p}:
        if directory.is_dir() and not os.access(directory, os.W_OK):
            log.warning("%s is not writable by user %s: state saved there will be lost",
                        directory, account.pw_name)


async def _main(config: Config, clock: ClockControl, options: ClientOptions) -> int:
    # First of all: a second instance must not take the first one's sockets.
    pidfile = PidFile(config.pidfile or DEFAULT_PIDFILE)
    try:
        return await _serve(config, clock, options)
    finally:
        pidfile.release()


async def _serve(config: Config, clock: ClockControl, options: ClientOptions) -> int:
    if config.ntsprocesses > 1:
        log.info("ntsprocesses is for 'ntspy serve'; 'ntspy run' stays one process")
    client = ClientDaemon(config, clock, options)
    server: ServerDaemon | None = None
    sockets = Sockets()
    if serves_time(config):
        sockets = Sockets.bind(config)
        server = ServerDaemon(config, sockets, clock=clock)
        server.load_credentials()
        await server.start()
        client.on_update.append(_follow(server, client))
    stop = asyncio.Event()
    handlers = control_handlers(client, server, shutdown=stop.set)
    control = ControlServer(control_path(config), handlers, udp_addresses(config))
    await control.start()
    metrics = _start_metrics(config, client, server)  # before the switch: port < 1024 too
    await client.start()  # reads the saved cookies: before the switch, they are root's
    _drop_privileges(config, keep_sys_time=clock.can_control)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _on_sighup, client, server)
    notify("READY=1", f"STATUS=polling {len(client.sources)} sources",
           f"MAINPID={os.getpid()}")
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(client.failed.wait())
    await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
    for task in (stopped, failed):
        task.cancel()
    notify("STOPPING=1")
    log.info("shutting down")
    if metrics is not None:
        metrics.stop()
    await control.close()
    await client.stop()
    if server is not None:
        await server.stop()
    sockets.close()
    return 1 if client.fatal else 0


def _start_metrics(config: Config, client: ClientDaemon,
                   server: ServerDaemon | None) -> Any:
    """``metricsaddress``: the Prometheus endpoint with the client's metrics (and the
    server's when serving too), started; None when not configured."""
    if config.metricsaddress is None:
        return None
    from .client.metrics import client_collector
    from .metrics import MetricsServer

    metrics = MetricsServer(*config.metricsaddress)
    metrics.add_collector("client", client_collector(client, asyncio.get_running_loop()))
    if server is not None:
        metrics.add_collector("server", server.metrics_collector())
    metrics.start()  # MetricsBindError (an OSError): one line at start-up
    return metrics


def _on_sighup(client: ClientDaemon, server: ServerDaemon | None) -> None:
    """SIGHUP never stops the daemon: re-read ``sourcedir`` and, when serving,
    the certificates (for renewals); the key ring and the sources' state stay."""
    log.info("received SIGHUP: reloading sources%s", " and certificates" if server else "")
    if server is not None:
        server.reload_certificates()

    async def reload() -> None:
        try:
            changed = await client.reload_sources()
        except Exception:  # a reload must not take the daemon down
            log.exception("reloading sources failed")
            return
        log.info("sources reloaded: %d added, %d removed", changed["added"], changed["removed"])

    task = asyncio.get_running_loop().create_task(reload())
    _background.add(task)
    task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()


def _follow(server: ServerDaemon, client: ClientDaemon) -> Any:
    """Serve our own sync state once the client is synchronised (unless ``local``)."""

    def update(selection: Selection, tracking: Tracking) -> None:
        state = client.sync_state_for_server()
        if state is None or server.responder is None or server.local_state is not None:
            return
        leap, stratum, root_delay, root_disp, refid, ref_ts = state
        server.responder.state = SyncState(leap, min(stratum, 15), -20, root_delay, root_disp,
                                           refid, ref_ts)

    return update


def _burst_args(args: list[str]) -> tuple[int, int, str | None]:
    """chronyc's ``burst [good/max] [ADDRESS]`` (default 4/8)."""
    good, total, rest = 4, 8, list(args)
    if rest and "/" in rest[0] and all(p.isdigit() for p in rest[0].split("/", 1)):
        good, total = (int(p) for p in rest.pop(0).split("/", 1))
    if len(rest) > 1:
        raise NtsError("usage: burst [good/max] [address]")
    return good, total, rest[0] if rest else None


def _one_address(command: str, args: list[str]) -> str | None:
    if len(args) > 1:
        raise NtsError(f"usage: {command} [address]")
    return args[0] if args else None


def control_handlers(client: ClientDaemon, server: ServerDaemon | None,
                     shutdown: Any = None) -> dict[str, Any]:
    async def sources(args: list[str]) -> list[dict[str, Any]]:
        return client.sources_view()

    async def sourcestats(args: list[str]) -> list[dict[str, Any]]:
        return client.sourcestats_view()

    async def tracking(args: list[str]) -> dict[str, Any]:
        t = client.tracking()
        out = dataclasses.asdict(t)
        out["leap"] = int(t.leap)
        out["synchronised"] = bool(client.selection and client.selection.synchronised)
        if t.reference is not None:  # a source key: show its address, as chronyc does
            with contextlib.suppress(KeyError):
                out["reference"] = client.source_by_key(t.reference).address
        out["updates"] = client.clock_updates
        out["clock_control"] = client.clock.can_control
        return out

    async def authdata(args: list[str]) -> list[dict[str, Any]]:
        return client.authdata_view()

    async def ntpdata(args: list[str]) -> list[dict[str, Any]]:
        return client.ntpdata_view()

    async def reload(args: list[str]) -> dict[str, Any]:
        if args != ["sources"]:
            raise NtsError("usage: reload sources")
        return await client.reload_sources()

    async def rekey(args: list[str]) -> dict[str, int]:
        count = 0
        for src in client.sources:
            if src.cfg.nts:
                src.rekey()
                count += 1
        return {"sources": count}

    async def add(args: list[str]) -> dict[str, Any]:
        return await client.add_source(args)

    async def delete(args: list[str]) -> dict[str, Any]:
        if len(args) != 1:
            raise NtsError("usage: delete address")
        return await client.delete_source(args[0])

    async def burst(args: list[str]) -> dict[str, int]:
        return client.burst(*_burst_args(args))

    async def online(args: list[str]) -> dict[str, int]:
        return client.set_online(True, _one_address("online", args))

    async def offline(args: list[str]) -> dict[str, int]:
        return client.set_online(False, _one_address("offline", args))

    async def makestep(args: list[str]) -> dict[str, Any]:
        return client.make_step(args)

    async def activity(args: list[str]) -> dict[str, int]:
        return client.activity()

    async def selectdata(args: list[str]) -> list[dict[str, Any]]:
        return client.selectdata_view()

    async def dump(args: list[str]) -> dict[str, int]:
        return client.dump()

    async def cyclelogs(args: list[str]) -> dict[str, bool]:
        client.cycle_logs()
        return {"cycled": True}

    async def refresh(args: list[str]) -> dict[str, int]:
        return await client.refresh()

    async def stop(args: list[str]) -> dict[str, bool]:
        if shutdown is None:
            raise NtsError("shutdown is not available here")
        log.info("shutdown requested over the control socket")
        asyncio.get_running_loop().call_soon(shutdown)  # after this answer is sent
        return {"shutting_down": True}

    handlers: dict[str, Any] = {
        "sources": sources, "sourcestats": sourcestats, "tracking": tracking,
        "authdata": authdata, "ntpdata": ntpdata, "reload": reload, "rekey": rekey,
        "add": add, "delete": delete, "burst": burst, "online": online, "offline": offline,
        "makestep": makestep, "activity": activity, "selectdata": selectdata, "dump": dump,
        "cyclelogs": cyclelogs, "refresh": refresh, "shutdown": stop,
    }
    if server is not None:
        handlers.update(server.control_handlers())
    return handlers
