"""``ntspy run``: the client daemon (and optionally the server) in one process.

Sources poll on their own schedule; each good sample triggers a selection
round and a clock update through the :class:`~ntspy.clock.ClockControl`
interface, the same sequence :func:`ntspy.sync.sim.simulate` runs in virtual
time. One thread, one event loop: DNS goes through the thread-free resolver,
and the clock is only read through the Clock given.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..clock import ClockControl, SlewingClock
from ..config import Config, SourceConfig, load_sources_dir, parse_source_line
from ..errors import ConfigError, NtsError, StateFileError
from ..leapsec import leap_at_end_of_day, zone_knows_leap_seconds
from ..net.dns import TYPE_A, TYPE_AAAA, Resolver, is_ip_address
from ..net.tls.trust import TrustConfig
from ..proto.ntp import Leap, reference_id_for, unix_ns_to_ntp
from ..state import atomic_write, read_state, set_aside
from ..sync.discipline import Discipline, Tracking, apply_action, format_drift, parse_drift
from ..sync.engine import Decision, SyncEngine
from ..sync.filter import UNKNOWN_SKEW_PPM
from ..sync.sanity import SampleLimits
from ..sync.select import (
    AuthSelectMode,
    Candidate,
    SelectConfig,
    Selection,
    SourceState,
    effective_options,
)
from .logfiles import ChronyLogs
from .session import Measurement
from .source import Source, exchange_of

log = logging.getLogger("ntspy.client")

LOG_CHANGE_S = 1.0
"""chrony's ``logchange`` default: a correction larger than this is logged."""
TIME_FILE = "ntspy.time"  # saved wall time, for machines without an RTC (-s)


@dataclass(slots=True)
class ClientOptions:
    timeout: float = 2.0
    ke_backoff_scale: float = 1.0
    restore_time: bool = False  # chronyd -s
    resolver: Resolver | None = None
    families: tuple[int, ...] = (TYPE_A, TYPE_AAAA)  # chronyd -4 / -6 limit these
    pool_check: float = 4.0  # seconds between looks at the pools
    pool_retry: float = 16.0  # first back-off after a pool failed to resolve, doubling


POOL_DEAD_POLLS = 8
"""Polls without an answer (a whole reach register) after which a pool source is replaced."""
POOL_RETRY_MAX = 4096.0
"""Longest wait between resolutions of a pool that keeps failing, seconds."""


def _pool_key(cfg: SourceConfig) -> tuple[str, int, bool]:
    return (cfg.name, cfg.port, cfg.nts)


class _PoolState:
    """When a pool may be resolved again."""

    __slots__ = ("backoff", "base", "cfg", "retry_at")

    def __init__(self, cfg: SourceConfig, base: float) -> None:
        self.cfg = cfg
        self.base = base
        self.backoff = 0.0
        self.retry_at = 0.0

    def failed(self, now: float) -> None:
        self.backoff = min(POOL_RETRY_MAX, self.backoff * 2 if self.backoff else self.base)
        self.retry_at = now + self.backoff

    def succeeded(self, now: float, short: bool) -> None:
        if short:  # the name gave fewer addresses than wanted: ask less and less often
            self.failed(now)
        else:
            self.backoff = self.retry_at = 0.0


class ClientDaemon:
    def __init__(self, config: Config, clock: ClockControl,
                 options: ClientOptions | None = None) -> None:
        self.config = config
        self.clock = clock
        self.options = options or ClientOptions()
        self.sources: list[Source] = []
        drift = self._load_drift()
        discipline = Discipline(
            makestep=config.makestep,
            frequency_ppm=drift[0] if drift else 0.0,
            skew_ppm=drift[1] if drift else UNKNOWN_SKEW_PPM,
            corr_time_ratio=config.corrtimeratio,
            max_update_skew=config.maxupdateskew,
            max_drift_ppm=config.maxdrift,
            maxchange=config.maxchange,
        )
        if drift and clock.can_control:
            clock.set_frequency(drift[0])
        self.select_config = SelectConfig(
            minsources=config.minsources,
            authselectmode=AuthSelectMode(config.authselectmode),
            max_distance=config.maxdistance,
            max_jitter=config.maxjitter,
            combine_limit=config.combinelimit,
            reselect_dist=config.reselectdist,
            stratum_weight=config.stratumweight,
        )
        self.engine = SyncEngine(discipline, self.select_config,
                                 SampleLimits(max_distance=config.maxdistance))
        self.logs = ChronyLogs(config.logdir, config.log, config.logbanner)
        self._leap_zone: str | None = None
        self._leap_day = -1
        if config.leapsectz is not None:
            if zone_knows_leap_seconds(config.leapsectz):
                self._leap_zone = config.leapsectz
            else:  # chronyd's check: the zone must know the leap second of 2016
                log.warning("Timezone %s failed leap second check, ignoring", config.leapsectz)
        self.failed = asyncio.Event()
        """Set when the daemon must stop (``maxchange``); :attr:`fatal` says why."""
        self.fatal: str | None = None
        self.loop_errors = 0
        """Poll rounds that raised, and tasks restarted (each is a bug)."""
        self._logged_reference: str | None = None
        self._stopping = False
        self._maintenance: asyncio.TimerHandle | None = None
        self._pools: dict[tuple[str, int, bool], _PoolState] = {}
        self._pool_task: asyncio.Task[None] | None = None
        self._tasks: dict[Source, asyncio.Task[None]] = {}
        self._wake: dict[Source, asyncio.Event] = {}
        self.added_sources: list[SourceConfig] = []
        """Sources added with ``ntspy ctl add``: kept across ``reload sources``."""
        self._deleted: set[tuple[str, int, bool]] = set()
        """Configured sources removed with ``ntspy ctl delete``: not brought back by a reload."""
        self._resolver = self.options.resolver
        self._started = time.monotonic()
        self.on_update: list[Any] = []  # callbacks(selection, tracking), e.g. the server

    # -- set-up ---------------------------------------------------------------

    def trust(self, certset: int) -> TrustConfig:
        extra = [path for setno, path in self.config.ntstrustedcerts if setno == certset]
        return TrustConfig(
            use_system_store=not self.config.nosystemcert,
            extra=extra,
            no_cert_time_check=self.config.nocerttimecheck > 0,
        )

    def configured_sources(self, rejected: list[str] | None = None) -> list[SourceConfig]:
        """The configured sources and those of ``sourcedir``; a bad line there is
        logged with its file and line, left out, and added to ``rejected``."""
        sources = list(self.config.sources)
        for directory in self.config.sourcedir:
            errors: list[ConfigError] = []
            sources += load_sources_dir(directory, errors)
            for exc in errors:
                log.error("sourcedir %s: %s (line ignored)", directory, exc)
                if rejected is not None:
                    rejected.append(str(exc))
        sources = [c for c in sources if _identity(c) not in self._deleted]
        return sources + self.added_sources

    async def _make_sources(self, configs: list[SourceConfig]) -> list[Source]:
        made: list[Source] = []
        for cfg in configs:
            if not cfg.pool:
                made.append(self._source(cfg, None))
                continue
            self._pools.setdefault(_pool_key(cfg), _PoolState(cfg, self.options.pool_retry))
            resolver = self._resolver or Resolver()
            self._resolver = resolver
            try:
                addresses = await resolver.resolve(cfg.name, self.options.families)
            except NtsError as exc:
                # Not dropped: the pool keeper tries again (the network may come up late).
                log.warning("pool %s: %s (will retry)", cfg.name, exc)
                continue
            for address in addresses[: cfg.maxsources]:
                made.append(self._source(cfg, address))
        return made

    async def _keep_pools(self) -> None:
        """Resolve pools that are short of sources again, with back-off, and replace
        pool sources that stopped answering (as chrony does)."""
        while True:
            self._end_if_asked()
            await asyncio.sleep(self.options.pool_check)
            for key, state in list(self._pools.items()):
                try:
                    await self._keep_pool(key, state)
                except Exception:
                    self.loop_errors += 1
                    log.exception("pool %s: keeping it filled failed", state.cfg.name)

    def _end_if_asked(self) -> None:
        """End the calling task if the daemon stops or the task was cancelled: Python
        3.11's wait_for can swallow a cancellation that meets a finishing I/O wait."""
        current = asyncio.current_task()
        if self._stopping or (current is not None and current.cancelling()):
            raise asyncio.CancelledError

    async def _keep_pool(self, key: tuple[str, int, bool], state: _PoolState) -> None:
        cfg = state.cfg
        members = [s for s in self.sources if s.cfg.pool and _pool_key(s.cfg) == key]
        dead = [s for s in members if s.polls >= POOL_DEAD_POLLS and not s.reach.reachable]
        if len(members) - len(dead) >= cfg.maxsources:
            return
        now = asyncio.get_running_loop().time()
        if now < state.retry_at:
            return
        self._resolver = self._resolver or Resolver()
        try:
            addresses = await self._resolver.resolve(cfg.name, self.options.families)
        except NtsError as exc:
            state.failed(now)
            log.warning("pool %s: %s (retry in %.0f s)", cfg.name, exc, state.backoff)
            return
        have = {s.address for s in members}
        fresh = [a for a in addresses if a not in have]
        alive = len(members) - len(dead)
        for src in dead:
            if not fresh:
                break
            await self._remove(src)
            new = self._add(cfg, fresh.pop(0))
            alive += 1
            log.info("Source %s replaced with %s (%s)", src.address, new.address, cfg.name)
        while alive < cfg.maxsources and fresh:
            new = self._add(cfg, fresh.pop(0))
            log.info("Added source %s (%s)", new.address, cfg.name)
            alive += 1
        state.succeeded(now, short=alive < cfg.maxsources)

    def _add(self, cfg: SourceConfig, address: str) -> Source:
        src = self._source(cfg, address)
        self.sources.append(src)
        self._spawn(src)
        return src

    def _source(self, cfg: SourceConfig, address: str | None) -> Source:
        src = Source(
            cfg, self.clock, address=address, trust=self.trust,
            dumpdir=self.config.ntsdumpdir, ntsrefresh=self.config.ntsrefresh,
            timeout=self.options.timeout, backoff_scale=self.options.ke_backoff_scale,
        )
        self.engine.sources[src.key] = src.sync
        src.load_dump(time.monotonic())
        return src

    async def start(self) -> None:
        if self.options.restore_time:
            self._restore_time()
        self.sources = await self._make_sources(self.configured_sources())
        for src in self.sources:
            self._spawn(src)
        self._pool_task = asyncio.create_task(self._keep_pools(), name="pools")
        log.info("client started with %d sources", len(self.sources))

    async def reload_sources(self) -> dict[str, Any]:
        """Re-read ``sourcedir``: add new sources, remove vanished ones (configured stay).

        Returns the counts and the lines that were ``rejected``."""
        rejected: list[str] = []
        wanted = self.configured_sources(rejected)
        # Pools no longer configured are no longer kept filled.
        keep = {_pool_key(c) for c in wanted if c.pool}
        self._pools = {k: v for k, v in self._pools.items() if k in keep}
        keys = {(c.name, c.port, c.nts) for c in wanted}
        removed = 0
        for src in list(self.sources):
            if (src.cfg.name, src.cfg.port, src.cfg.nts) not in keys:
                await self._remove(src)
                removed += 1
        have = {(s.cfg.name, s.cfg.port, s.cfg.nts) for s in self.sources}
        new = await self._make_sources(
            [c for c in wanted if (c.name, c.port, c.nts) not in have]
        )
        for src in new:
            self.sources.append(src)
            self._spawn(src)
        return {"added": len(new), "removed": removed, "rejected": rejected}

    async def _remove(self, src: Source) -> None:
        self._wake.pop(src, None)
        task = self._tasks.pop(src, None)
        while task is not None and not task.done():
            # Python 3.11's wait_for can swallow a cancellation that meets a
            # finishing I/O wait: ask again until the task has really ended.
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if task is not None and not task.cancelled() and task.exception() is not None:
            log.error("%s: polling task ended with %r", src.name, task.exception())
        src.save_dump()
        src.session.close()
        self.sources.remove(src)
        self.engine.remove_source(src.key)

    async def stop(self) -> None:
        self._stopping = True
        while self._pool_task is not None and not self._pool_task.done():
            self._pool_task.cancel()
            await asyncio.wait({self._pool_task}, timeout=1.0)
        if self._maintenance is not None:
            self._maintenance.cancel()
        if isinstance(self.clock, SlewingClock):
            try:
                left = self.clock.finish()
                if left:
                    log.info("stopped slewing with %+.9f s left uncorrected", left)
            except OSError as exc:
                log.error("cannot end the clock's slew: %s", exc)
        for src in list(self.sources):
            try:
                await self._remove(src)
            except Exception:  # one source's failure must not cost the others their state
                log.exception("%s: could not be stopped cleanly", src.name)
                with contextlib.suppress(ValueError):
                    self.sources.remove(src)
        self.logs.close()
        self._save_drift()
        self._save_time()

    # -- the loop -------------------------------------------------------------

    def _spawn(self, src: Source) -> None:
        task = asyncio.create_task(self._run_source(src), name=f"source {src.name}")
        self._tasks[src] = task
        task.add_done_callback(functools.partial(self._task_ended, src))

    def _task_ended(self, src: Source, task: asyncio.Task[None]) -> None:
        """A source's task must only end by cancellation: anything else is a bug,
        reported loudly, and the source is polled again by a new task."""
        if task.cancelled() or self._tasks.get(src) is not task or self._stopping:
            return
        exc = task.exception()
        self.loop_errors += 1
        log.critical("%s: polling task ended unexpectedly (%s); restarting it", src.name,
                     "returned" if exc is None else repr(exc),
                     exc_info=exc if exc is not None else None)
        self._spawn(src)

    async def _run_source(self, src: Source) -> None:
        wake = self._wake.setdefault(src, asyncio.Event())
        while True:
            wake.clear()  # before the round: a wake-up during it is not lost
            try:
                if src.online:
                    await self._poll_round(src)
            except Exception as exc:
                # Whatever a round raises, the source keeps being polled. Each
                # kind of failure is logged once with its traceback, then counted.
                self.loop_errors += 1
                src.errors += 1
                where = f"{type(exc).__name__}: {exc}"
                if where not in src.logged_errors:
                    src.logged_errors.add(where)
                    log.exception("%s: poll round failed (round skipped, polling goes on)",
                                  src.name)
            self._end_if_asked()
            # Until the next poll, or a command (burst, online) that wants one now;
            # an offline source waits for ``online`` only.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(src.interval() if src.online else None):
                    await wake.wait()

    async def _poll_round(self, src: Source) -> None:
        """One poll of ``src`` and what it does to selection and the clock."""
        if not await self._resolve(src):
            return
        # nocerttimecheck N: certificate times are not checked until the
        # clock has been updated N times (it may start out far off).
        src.set_time_check(self.clock_updates >= self.config.nocerttimecheck)
        measurement = await src.poll_once(asyncio.get_running_loop().time())
        now = self.disciplined_now()
        was_reachable = src.reach.reachable
        if measurement is None:
            self.engine.poll_failed(src.key, now)
            if was_reachable and not src.reach.reachable:
                log.warning("Source %s unreachable (no answer to 8 polls)", src.name)
            return
        if not was_reachable and src.polls > 1:
            log.info("Source %s reachable again", src.name)
        self._update_tz_leap()
        decision = self.engine.sample(src.key, now, exchange_of(measurement),
                                      self.clock.pending_slew_s())
        src.adjust_poll(decision.poll_advice)
        if log.isEnabledFor(logging.DEBUG):
            st = src.stats
            log.debug("%s: offset %+.9f delay %.6f np %d poll %d freq %+.4f skew %.4f sd %.2e",
                      src.name, measurement.offset, measurement.delay, st.np, src.poll,
                      st.frequency_ppm, st.skew_ppm, st.std_dev)
        if decision.rejected is not None:
            src.last_error = f"sample rejected: {decision.rejected}"
            log.info("%s: sample rejected: %s", src.name, decision.rejected)
        else:
            self._log_sample(src, measurement, now)
        self._carry_out(decision, now)

    def _update_tz_leap(self) -> None:
        """``leapsectz``: once per UTC day, whether it ends with a leap second."""
        if self._leap_zone is None:
            return
        day = self.clock.now_ns() // (86400 * 10**9)
        if day != self._leap_day:
            self._leap_day = day
            self.engine.tz_leap = leap_at_end_of_day(self._leap_zone, day * 86400.0)
            if self.engine.tz_leap:
                log.info("%s: leap second (%s) at the end of today", self._leap_zone,
                         "inserted" if self.engine.tz_leap == 1 else "deleted")

    def _log_sample(self, src: Source, m: Measurement, now: int) -> None:
        """``log measurements statistics``: chrony's lines for a valid sample."""
        wall = self.clock.now_ns() / 1e9
        self.logs.measurement(
            wall, src.address, leap=m.leap, stratum=m.stratum, local_poll=src.poll,
            remote_poll=m.poll, score=src.machine.poll_score, offset=m.offset, delay=m.delay,
            dispersion=src.stats.last_sample.dispersion if src.stats.last_sample else 0.0,
            root_delay=m.root_delay, root_dispersion=m.root_dispersion,
            refid=_refid_number(m.reference_id), rx_kernel=m.kernel_rx_timestamp)
        st = src.stats
        skew = st.skew_ppm * 1e-6
        self.logs.statistics(
            wall, src.address, std_dev=st.std_dev, est_offset=st.offset_at(now),
            offset_sd=st.offset_error_at(now), diff_freq=st.frequency_ppm * 1e-6,
            est_skew=skew, stress=abs(st.frequency_ppm * 1e-6) / skew if skew else 0.0,
            samples=st.np, best_start=0, runs=st.nr, asymmetry=st.asymmetry)

    async def _resolve(self, src: Source) -> bool:
        """Resolve a named server's address (without threads); False to retry later."""
        if src.resolved:
            return True
        self._resolver = self._resolver or Resolver()
        try:
            addresses = await self._resolver.resolve(src.cfg.name, self.options.families)
        except NtsError as exc:
            src.last_error = str(exc)
            log.warning("%s: %s", src.name, exc)
            return False
        src.set_address(addresses[0])
        src.load_dump(time.monotonic())
        return True

    def _carry_out(self, decision: Decision, now: int) -> None:
        """Apply the engine's correction to the clock and tell the engine it was done."""
        action = decision.action
        if decision.selection is not None:
            self._note_selection(decision.selection)
        if decision.refused is not None:
            log.warning("%s", decision.refused[0].upper() + decision.refused[1:])
        if decision.fatal is not None:
            log.critical("Fatal error: %s", decision.fatal)
            self.fatal = decision.fatal
            self.failed.set()
            return
        if action is None:
            return
        # chrony's sign: positive = the system clock is ahead.
        if action.step_s is not None:
            log.warning("System clock wrong by %.6f seconds, stepping", -action.step_s)
        elif abs(action.slew_offset_s) > LOG_CHANGE_S:
            log.warning("System clock wrong by %.6f seconds, adjustment started",
                        -action.slew_offset_s)
        if log.isEnabledFor(logging.DEBUG) and decision.selection is not None:
            log.debug("update: estimate %+.9f pending %+.9f freq %+.6f",
                      decision.selection.offset, self.clock.pending_slew_s(),
                      action.frequency_ppm)
        try:
            apply_action(self.clock, action)
        except OSError as exc:
            log.error("cannot adjust the clock: %s", exc)
            return
        leap_ok = True
        if decision.leap is not None:
            try:
                self.clock.set_leap(decision.leap)
            except OSError as exc:
                leap_ok = False
                log.error("cannot arm the leap second: %s", exc)
        self.engine.applied(now, decision, leap_ok)
        self._schedule_clock_maintenance()
        tracking = self.tracking()
        self._tell_kernel(tracking)
        selection = decision.selection
        ref = self._by_key(tracking.reference) if tracking.reference else None
        self.logs.tracking(
            self.clock.now_ns() / 1e9, ref.address if ref else "0.0.0.0",
            stratum=tracking.stratum, freq_ppm=-tracking.frequency_ppm,
            skew_ppm=tracking.skew_ppm, offset=-tracking.last_offset, leap=int(tracking.leap),
            combined=len(selection.combined) if selection else 0,
            offset_sd=selection.offset_sd if selection else 0.0,
            remaining=self.clock.pending_slew_s(), root_delay=tracking.root_delay,
            root_dispersion=tracking.root_dispersion,
            max_error=tracking.root_delay / 2 + tracking.root_dispersion)
        for callback in self.on_update:
            callback(decision.selection, tracking)

    def _schedule_clock_maintenance(self) -> None:
        """Wake up exactly when the clock's slew is due to end (frequency slews
        overshoot by the rate times any lateness)."""
        if not isinstance(self.clock, SlewingClock):
            return
        if self._maintenance is not None:
            self._maintenance.cancel()
            self._maintenance = None
        delay = self.clock.next_maintenance_s()
        if delay is not None:
            self._maintenance = asyncio.get_running_loop().call_later(
                delay, self._maintain_clock)

    def _maintain_clock(self) -> None:
        self._maintenance = None
        try:
            if isinstance(self.clock, SlewingClock):
                self.clock.maintain()
        except OSError as exc:
            log.error("cannot end the clock's slew: %s", exc)
        except Exception:
            self.loop_errors += 1
            log.exception("clock maintenance failed")
        self._schedule_clock_maintenance()

    def _tell_kernel(self, tracking: Tracking) -> None:
        """Synchronised: the kernel's error estimates, as chronyd keeps them.

        maxerror/esterror always (``adjtimex`` readers such as systemd judge by
        maxerror); STA_UNSYNC is cleared only with ``rtcsync``, which is what turns
        on the kernel's 11-minute copy of the system time to the RTC (chronyd's rule).
        """
        if not isinstance(self.clock, SlewingClock):
            return
        try:
            self.clock.set_sync_status(self.config.rtcsync,
                                       tracking.root_delay / 2 + tracking.root_dispersion,
                                       tracking.rms_offset)
        except OSError as exc:
            log.error("cannot update the kernel's synchronisation status: %s", exc)

    def _note_selection(self, selection: Selection) -> None:
        """Log when the reference changes or is lost, once per change."""
        name = selection.selected
        if name == self._logged_reference:
            return
        # chronyd's words: scripts and people grep for them.
        if name is None:
            log.warning("Can't synchronise: %s", selection.reason or "no majority")
        else:
            src = self._by_key(name)
            if src is None or src.address == src.name:
                log.info("Selected source %s", src.name if src else name)
            else:
                log.info("Selected source %s (%s)", src.address, src.name)
        self._logged_reference = name

    def _by_key(self, key: str) -> Source | None:
        for src in self.sources:
            if src.key == key:
                return src
        return None

    @property
    def selection(self) -> Selection | None:
        """The latest selection round (None before the first)."""
        return self.engine.selection

    @property
    def clock_updates(self) -> int:
        """Clock updates carried out."""
        return self.engine.updates

    @property
    def discipline(self) -> Discipline:
        return self.engine.discipline

    def disciplined_now(self) -> int:
        """Now on the disciplined timescale: the clock plus its pending correction.

        Samples are kept on this timescale (see :meth:`Source.poll_once`); with
        ``-x`` it is the virtual clock that was never applied to the system clock.
        """
        return self.clock.now_ns() + round(self.clock.pending_slew_s() * 1e9)

    # -- drift and time files -------------------------------------------------

    def _load_drift(self) -> tuple[float, float] | None:
        path = self.config.driftfile
        if path is None:
            return None
        try:
            data = read_state(path)
            return parse_drift(data.decode("ascii", "replace")) if data is not None else None
        except StateFileError as exc:
            moved = set_aside(path)
            log.error("ignoring drift file: %s%s", exc, f" (moved to {moved})" if moved else "")
            return None

    def _save_drift(self) -> None:
        path = self.config.driftfile
        if path is None or self.discipline.updates == 0:
            return
        text = format_drift(self.discipline.frequency_ppm, self.discipline.skew_ppm)
        try:
            atomic_write(path, text.encode(), 0o644)
        except (OSError, StateFileError) as exc:
            log.error("cannot write drift file %s: %s", path, exc)

    def _time_file(self) -> Path | None:
        base = self.config.ntsdumpdir or (
            self.config.driftfile.parent if self.config.driftfile else None
        )
        return base / TIME_FILE if base else None

    def _save_time(self) -> None:
        path = self._time_file()
        if path is None:
            return
        try:
            atomic_write(path, f"{self.clock.now_ns()}\n".encode(), 0o644)
        except (OSError, StateFileError) as exc:
            log.error("cannot save the time to %s: %s", path, exc)

    def _restore_time(self) -> None:
        """chronyd -s: if the clock is behind the time saved at shutdown, step it there.

        Without an RTC a machine boots in 1970; certificates then look not yet
        valid and NTS-KE cannot start. The saved time is a lower bound.
        """
        path = self._time_file()
        if path is None:
            return
        try:
            data = read_state(path)
            if data is None:
                return
            saved = int(data.decode("ascii").strip())
        except (StateFileError, ValueError, UnicodeDecodeError) as exc:
            moved = set_aside(path)
            log.error("ignoring saved time: %s%s", exc, f" (moved to {moved})" if moved else "")
            return
        behind = (saved - self.clock.now_ns()) / 1e9
        if behind > 0:
            log.warning("clock is %.3f s behind the time saved at shutdown: stepping", behind)
            try:
                self.clock.step(behind)
            except OSError as exc:
                log.error("cannot step the clock: %s", exc)

    # -- commands (ntspy ctl, chronyc) -------------------------------------------

    def matching(self, spec: str | None) -> list[Source]:
        """The sources a command's ADDRESS names: all for None; else those whose
        address, name or configured name is ``spec``, or whose address lies in
        ``spec`` written as ADDRESS/PREFIX or chronyc's MASK/ADDRESS."""
        if spec is None:
            return list(self.sources)
        network = _network(spec)
        found = []
        for src in self.sources:
            if spec in (src.address, src.name, src.cfg.name):
                found.append(src)
                continue
            try:
                address = ipaddress.ip_address(src.address)
            except ValueError:
                continue
            if network is not None and address.version == network.version \
                    and address in network:
                found.append(src)
        return found

    def _wake_up(self, src: Source) -> None:
        wake = self._wake.get(src)
        if wake is not None:
            wake.set()

    async def add_source(self, words: list[str]) -> dict[str, Any]:
        """``add server|pool HOST [options]``: a real source (NTS, cookies, dumps) from
        now on, kept by ``reload sources``, gone at restart (as with chronyc)."""
        if len(words) < 2 or words[0] not in ("server", "pool", "peer"):
            raise NtsError("usage: add server|pool HOST [option]...")
        if words[0] == "peer":
            raise NtsError("peer sources are not supported (symmetric mode)")
        try:
            cfg = parse_source_line(words[1:], words[0] == "pool", "ntspy ctl add", 1)
        except ConfigError as exc:
            raise NtsError(str(exc)) from None
        if any(_identity(s.cfg) == _identity(cfg) for s in self.sources) or \
                any(_identity(c) == _identity(cfg) for c in self.added_sources):
            raise NtsError(f"source {cfg.name} already present")
        self._deleted.discard(_identity(cfg))
        self.added_sources.append(cfg)
        new = await self._make_sources([cfg])
        for src in new:
            self.sources.append(src)
            self._spawn(src)
        log.info("Added %s %s%s (ntspy ctl add)", "pool" if cfg.pool else "source", cfg.name,
                 f" ignoring {', '.join(cfg.ignored_options)}" if cfg.ignored_options else "")
        return {"added": [s.name for s in new], "ignored_options": cfg.ignored_options}

    async def delete_source(self, spec: str) -> dict[str, Any]:
        """``delete ADDRESS``: stop polling it, keep its cookies on disk."""
        found = self.matching(spec)
        if not found:
            raise NtsError(f"no such source {spec}")
        for src in found:
            await self._remove(src)
            log.info("Removed source %s (ntspy ctl delete)", src.name)
            ident = _identity(src.cfg)
            if not any(_identity(s.cfg) == ident for s in self.sources):
                self.added_sources = [c for c in self.added_sources if _identity(c) != ident]
                self._deleted.add(ident)
                if src.cfg.pool:
                    self._pools.pop(_pool_key(src.cfg), None)
        return {"removed": [s.name for s in found]}

    def burst(self, good: int, total: int, spec: str | None = None) -> dict[str, int]:
        """``burst [good/max] [ADDRESS]``: polls 2 s apart for a while, from now."""
        if not 0 < good <= total <= 2048:
            raise NtsError("burst: need 0 < good <= max <= 2048")
        found = self.matching(spec)
        for src in found:
            src.machine.burst(good, total)
            self._wake_up(src)
        return {"sources": len(found)}

    def set_online(self, online: bool, spec: str | None = None) -> dict[str, int]:
        """``online``/``offline [ADDRESS]``: an offline source sends nothing."""
        found = self.matching(spec)
        for src in found:
            if src.online != online:
                src.online = online
                log.info("Source %s %s", src.name, "online" if online else "offline")
            self._wake_up(src)
        return {"sources": len(found)}

    def make_step(self, args: list[str]) -> dict[str, Any]:
        """``makestep``: step the clock now by the correction still being slewed;
        ``makestep THRESHOLD LIMIT``: set the automatic step as the directive does."""
        if args:
            if len(args) != 2:
                raise NtsError("usage: makestep [threshold limit]")
            try:
                threshold, limit = float(args[0]), int(args[1])
            except ValueError:
                raise NtsError("usage: makestep [threshold limit]") from None
            if not math.isfinite(threshold) or threshold < 0:
                raise NtsError("makestep: the threshold must be a number of seconds >= 0")
            self.discipline.makestep = (threshold, limit)
            return {"threshold": threshold, "limit": limit}
        if not self.clock.can_control:
            raise NtsError("makestep: clock control is off (-x)")
        if isinstance(self.clock, SlewingClock):
            left = self.clock.finish()
        else:
            left = self.clock.pending_slew_s()
            if left:
                self.clock.slew(-left, 0.0)
        if left:
            try:
                self.clock.step(left)
            except OSError as exc:
                raise NtsError(f"makestep: cannot step the clock: {exc}") from None
            log.warning("System clock wrong by %.6f seconds, stepping (makestep)", -left)
        return {"stepped": left}

    def activity(self) -> dict[str, int]:
        """chronyc activity's five counts."""
        rows = {"online": 0, "offline": 0, "burst_online": 0, "burst_offline": 0,
                "unresolved": 0}
        for src in self.sources:
            if not src.resolved:
                rows["unresolved"] += 1
            elif src.machine.bursting:
                rows["burst_online" if src.online else "burst_offline"] += 1
            else:
                rows["online" if src.online else "offline"] += 1
        return rows

    def selectdata_view(self) -> list[dict[str, Any]]:
        """Per source what selection made of it (chronyc selectdata)."""
        now_ns = self.disciplined_now()
        mono = time.monotonic()
        selection = self.selection
        states = selection.states if selection else {}
        cfg = self.select_config
        candidates = [Candidate(name=s.key, offset=0.0, distance=0.0,
                                authenticated=s.cfg.nts, prefer=s.cfg.prefer,
                                noselect=s.cfg.noselect, trust=s.cfg.trust,
                                require=s.cfg.require) for s in self.sources]
        effective = effective_options(candidates, cfg.authselectmode)
        rows = []
        for src, eff in zip(self.sources, effective, strict=True):
            st = src.stats
            state = states.get(src.key, SourceState.UNUSABLE)
            has = st.np > 0 and src.last is not None
            distance = src.root_distance(now_ns) if has else 0.0
            offset = -st.offset_at(now_ns) if has else 0.0
            score = None
            if has:
                score = distance + cfg.stratum_weight * (src.last.stratum if src.last else 0)
                if selection is None or selection.selected != src.key:
                    score += cfg.reselect_dist
            rows.append({
                "name": src.name, "configured": src.cfg.name, "address": src.address,
                "state": _select_letter(state, src, eff.noselect, distance, cfg.max_distance),
                "authenticated": src.cfg.nts,
                "conf_options": _options_text(src.cfg.noselect, src.cfg.prefer, src.cfg.trust,
                                              src.cfg.require),
                "eff_options": _options_text(eff.noselect, src.cfg.prefer, eff.trust,
                                             eff.require),
                "last": mono - src.last_rx if src.last_rx is not None else None,
                "score": score,
                "low": offset - distance, "high": offset + distance,
                "leap": src.last.leap if src.last else int(Leap.UNSYNCHRONIZED),
            })
        return rows

    def dump(self) -> dict[str, int]:
        """chronyc dump: every source's NTS state and the drift file, now."""
        for src in self.sources:
            src.save_dump()
        self._save_drift()
        return {"sources": len(self.sources)}

    def cycle_logs(self) -> None:
        """chronyc cyclelogs: close the log files; the next line opens them anew
        (after logrotate moved them)."""
        self.logs.close()

    async def refresh(self) -> dict[str, int]:
        """chronyc refresh: resolve the sources given by name again; one whose name
        now points elsewhere moves there (new NTS-KE with the new server)."""
        moved = 0
        self._resolver = self._resolver or Resolver()
        for src in list(self.sources):
            if src.cfg.pool or not src.resolved or is_ip_address(src.cfg.name):
                continue
            try:
                addresses = await self._resolver.resolve(src.cfg.name, self.options.families)
            except NtsError as exc:
                log.warning("%s: refresh: %s", src.name, exc)
                continue
            if addresses and src.address not in addresses:
                log.info("Source %s moves from %s to %s (refresh)", src.name, src.address,
                         addresses[0])
                src.save_dump()
                src.session.close()
                src.set_address(addresses[0])
                src.load_dump(time.monotonic())
                moved += 1
        return {"sources": moved}

    # -- status ---------------------------------------------------------------

    def source_by_key(self, key: str) -> Source:
        src = self._by_key(key)
        if src is None:
            raise KeyError(key)
        return src

    def tracking(self) -> Tracking:
        return self.engine.tracking(self.clock.pending_slew_s())

    def sources_view(self) -> list[dict[str, Any]]:
        now_ns = self.disciplined_now()
        mono = time.monotonic()
        states = self.selection.states if self.selection else {}
        rows = []
        for src in self.sources:
            last = src.stats.last_sample
            has = last is not None and src.last is not None
            rows.append({
                "name": src.name,
                "configured": src.cfg.name,
                "address": src.address,
                "mode": "^",
                "state": str(states.get(src.key, SourceState.UNUSABLE)),
                "stratum": src.last.stratum if src.last else 0,
                "poll": src.poll,
                "reach": src.reach.value,
                "last_rx": mono - src.last_rx if src.last_rx is not None else None,
                # chronyc's sign: positive = local clock ahead of the source.
                "adjusted_offset": -src.stats.offset_at(now_ns) if has else 0.0,
                "measured_offset": -src.last.offset if src.last else 0.0,
                "error": src.root_distance(now_ns) if has else 0.0,
                "nts": src.cfg.nts,
                "options": {"noselect": src.cfg.noselect, "prefer": src.cfg.prefer,
                            "trust": src.cfg.trust, "require": src.cfg.require},
                "online": src.online,
                "last_error": src.last_error,
            })
        return rows

    def sourcestats_view(self) -> list[dict[str, Any]]:
        now_ns = self.disciplined_now()
        rows = []
        for src in self.sources:
            st = src.stats
            rows.append({
                "name": src.name, "configured": src.cfg.name, "address": src.address,
                "np": st.np, "nr": st.nr,
                "span": st.span, "frequency_ppm": st.frequency_ppm,
                "skew_ppm": st.skew_ppm if math.isfinite(st.skew_ppm) else None,
                "offset": -st.offset_at(now_ns) if st.np else 0.0,
                "std_dev": st.std_dev,
            })
        return rows

    def authdata_view(self) -> list[dict[str, Any]]:
        mono = time.monotonic()
        return [src.authdata(mono) for src in self.sources]

    def ntpdata_view(self) -> list[dict[str, Any]]:
        rows = []
        for src in self.sources:
            m = src.last
            if m is None:
                continue
            rows.append({
                "name": src.name, "remote_address": m.address, "remote_port": m.port,
                "leap": m.leap, "version": m.version, "mode": 4, "stratum": m.stratum,
                "reference_id_raw": _refid_number(m.reference_id),
                "poll": m.poll, "precision": m.precision, "root_delay": m.root_delay,
                "root_dispersion": m.root_dispersion, "reference_id": m.reference_id,
                "reference_time_ns": m.reference_time_ns, "offset": -m.offset,
                "peer_delay": m.delay, "authenticated": m.authenticated,
                "kernel_rx": m.kernel_rx_timestamp,
                "requests": int(src.session.stats["requests"]),
                "accepted": int(src.session.stats["accepted"]),
                "rejected": {k[len("rejected: "):]: v for k, v in src.session.stats.items()
                             if k.startswith("rejected: ")},
                # Answers whose times cannot be of a real exchange (sync/sanity.py).
                "bad_samples": dict(src.sync.rejected),
                "loop_errors": src.errors,
            })
        return rows

    def sync_state_for_server(self) -> tuple[int, int, float, float, bytes, int] | None:
        """(leap, stratum, root delay, root dispersion, reference id, reference time)."""
        sel = self.selection
        if sel is None or not sel.synchronised or sel.selected is None:
            return None
        t = self.tracking()
        refid = reference_id_for(self.source_by_key(sel.selected).address)
        return (int(t.leap) if t.leap != Leap.UNSYNCHRONIZED else 0, t.stratum, t.root_delay,
                t.root_dispersion, refid,
                unix_ns_to_ntp(t.ref_time_ns) if t.ref_time_ns else 0)


def _identity(cfg: SourceConfig) -> tuple[str, int, bool]:
    return (cfg.name, cfg.port, cfg.nts)


def _network(spec: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """ADDRESS/PREFIX, or chronyc's MASK/ADDRESS (255.255.255.0/192.168.1.0), as a network."""
    if "/" not in spec:
        return None
    left, right = spec.split("/", 1)
    try:
        if re.fullmatch(r"\d+", right):
            return ipaddress.ip_network(spec, strict=False)
        mask = ipaddress.ip_address(left)
        address = ipaddress.ip_address(right)
        prefix = bin(int(mask)).count("1")
        return ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    except ValueError:
        return None


def _options_text(noselect: bool, prefer: bool, trust: bool, require: bool) -> str:
    """chronyc selectdata's option column: N P T R, '-' where unset."""
    return "".join(c if on else "-" for c, on in
                   (("N", noselect), ("P", prefer), ("T", trust), ("R", require)))


def _select_letter(state: SourceState, src: Source, noselect: bool, distance: float,
                   max_distance: float) -> str:
    """chronyc selectdata's state letter from what selection decided."""
    if state is SourceState.SELECTED:
        return "*"
    if state is SourceState.COMBINED:
        return "+"
    if state is SourceState.FALSETICKER:
        return "x"
    if state is SourceState.JITTERY:
        return "~"
    if state is SourceState.NOT_COMBINED:
        return "D"  # a truechimer too distant to be combined
    if noselect:
        return "N"
    if src.stats.np == 0:
        return "M"
    if distance > max_distance:
        return "d"
    return "s" if src.last is not None and src.last.leap == Leap.UNSYNCHRONIZED else "M"


def _refid_number(text: str) -> int:
    """A reference id as ``Measurement`` shows it (dotted quad or ASCII) back as 32 bits."""
    import ipaddress

    try:
        return int(ipaddress.IPv4Address(text))
    except ValueError:
        return int.from_bytes(text.encode("ascii", "replace")[:4].ljust(4, b"\0"), "big")
