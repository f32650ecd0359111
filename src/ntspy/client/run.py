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
import signal
import sys
from typing import Any

from ..clock import ClockAdjtimeError, ClockControl, MeasureOnlyClock, SystemClockControl
from ..config import Config, load_config
from ..control.protocol import ControlServer
from ..errors import CertificateError, ConfigError, NtsError
from ..server.daemon import ServerDaemon, Sockets, control_path, setup_logging
from ..server.responder import SyncState
from ..sync.discipline import Tracking
from ..sync.select import Selection
from .daemon import ClientDaemon, ClientOptions

log = logging.getLogger("ntspy.run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--config", required=True, help="configuration file")
    parser.add_argument("-x", dest="no_clock_control", action="store_true",
                        help="never adjust the system clock, only measure it (like chronyd -x)")
    parser.add_argument("-s", dest="restore_time", action="store_true",
                        help="at start, step the clock to the time saved at shutdown if it is "
                             "behind it (machines without an RTC)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])


def serves_time(config: Config) -> bool:
    """chrony opens its NTP server port only when some client is allowed."""
    return any(rule.allow for rule in config.access) or bool(config.ntsservercert)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        config = load_config(args.config)
        clock: ClockControl
        if args.no_clock_control:
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
        return asyncio.run(_main(config, clock, ClientOptions(restore_time=args.restore_time)))
    except (ConfigError, CertificateError) as exc:
        print(f"ntspy: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"ntspy: cannot start: {exc}", file=sys.stderr)
        return 1


async def _main(config: Config, clock: ClockControl, options: ClientOptions) -> int:
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
    handlers = control_handlers(client, server)
    control = ControlServer(control_path(config), handlers)
    await control.start()
    await client.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _on_sighup, client, server)
    await stop.wait()
    log.info("shutting down")
    await control.close()
    await client.stop()
    if server is not None:
        await server.stop()
    sockets.close()
    return 0


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


def control_handlers(client: ClientDaemon, server: ServerDaemon | None) -> dict[str, Any]:
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

    async def reload(args: list[str]) -> dict[str, int]:
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

    handlers: dict[str, Any] = {
        "sources": sources, "sourcestats": sourcestats, "tracking": tracking,
        "authdata": authdata, "ntpdata": ntpdata, "reload": reload, "rekey": rekey,
    }
    if server is not None:
        handlers.update(server.control_handlers())
    return handlers
