"""One configured time source of the client daemon: polling, reach, NTS-KE, samples.

A :class:`Source` owns a session (NTS or plain), decides when to poll and when
to (re)do NTS-KE, keeps the 8-bit reach register and the per-source sample
statistics, and saves its NTS keys and cookies so a restart needs no NTS-KE.
The event loop and the clock are the daemon's; nothing here sleeps.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..clock import Clock
from ..config import SourceConfig
from ..errors import KeConnectionError, KeError, KissOfDeath, NtsError, StateFileError
from ..net.dns import is_ip_address
from ..net.tls.trust import TrustConfig
from ..proto.aead import info
from ..proto.ntp import Leap
from ..state import check_permissions, load_state, save_state, set_aside
from ..sync.engine import EngineSource, Exchange, SourceOptions
from ..sync.filter import ReachRegister, SourceStats
from .machine import SourceMachine, Step
from .session import Measurement, NtsSession, PlainSession

log = logging.getLogger("ntspy.client.source")

DUMP_KIND = "ntspy-nts-source"
DUMP_VERSION = 1


class Source:
    _ids = itertools.count(1)

    def __init__(
        self,
        cfg: SourceConfig,
        clock: Clock,
        *,
        address: str | None = None,
        trust: Callable[[int], TrustConfig] | None = None,
        dumpdir: Path | None = None,
        ntsrefresh: int = 2419200,
        timeout: float = 2.0,
        backoff_scale: float = 1.0,
        sync: EngineSource | None = None,
    ) -> None:
        """``sync`` is the engine's record of this source (statistics, reach);
        a standalone one is made without it."""
        self.cfg = cfg
        self.clock = clock
        self.key = f"{cfg.name}#{next(self._ids)}"  # unique even for twice-configured names
        self.name = cfg.name if address is None or not cfg.pool else address
        self.timeout = timeout
        self.sync = sync or EngineSource(self.key, SourceOptions(
            authenticated=cfg.nts, prefer=cfg.prefer, noselect=cfg.noselect,
            trust=cfg.trust, require=cfg.require), cfg.maxsamples or 64)
        self.machine = SourceMachine(cfg.minpoll, cfg.maxpoll, iburst=cfg.iburst, nts=cfg.nts,
                                     ntsrefresh=ntsrefresh, backoff_scale=backoff_scale)
        self.ke = self.machine.ke
        self.last_rx: float | None = None  # monotonic
        self.last: Measurement | None = None
        self.last_error = ""
        self.online = True
        """``ntspy ctl offline``/``online``: an offline source is not polled."""
        self.errors = 0
        """Poll rounds of this source that raised (bugs; logged once per kind)."""
        self.logged_errors: set[str] = set()
        self.dumpdir = dumpdir
        self.dump_path: Path | None = None
        self._save_error = ""
        self._trust = trust or (lambda _set: TrustConfig())
        self.session: NtsSession | PlainSession
        self.set_address(address if address is not None else cfg.name)
        self.resolved = is_ip_address(self.address)

    def set_address(self, address: str) -> None:
        """Talk to ``address`` (an IP, once the name is resolved); keeps the statistics."""
        cfg = self.cfg
        self.address = address
        self.resolved = True
        self.dump_path = (
            self.dumpdir / f"{_safe(cfg.name)}-{_safe(address)}-{cfg.ntsport}.nts"
            if self.dumpdir and cfg.nts else None
        )
        if cfg.nts:
            self.session = NtsSession(
                address, cfg.ntsport, trust=self._trust(cfg.certset), timeout=self.timeout,
                clock=self.clock, ntp_port=cfg.port if cfg.port != 123 else None,
                server_name=cfg.name, on_cookie_spent=self.save_dump,
            )
        else:
            self.session = PlainSession(address, cfg.port, timeout=self.timeout, clock=self.clock)

    @property
    def stats(self) -> SourceStats:
        """The source's sample statistics (kept by the sync engine)."""
        return self.sync.stats

    @property
    def reach(self) -> ReachRegister:
        """The reach register (kept by the sync engine)."""
        return self.sync.reach

    # -- scheduling (the machine decides) -------------------------------------

    @property
    def poll(self) -> int:
        """Current poll exponent (log2 seconds)."""
        return self.machine.poll

    @property
    def polls(self) -> int:
        """Polls started so far."""
        return self.machine.polls

    def interval(self) -> float:
        """Seconds until the next poll."""
        return self.machine.interval()

    def adjust_poll(self, advice: float) -> None:
        """Hand the sync engine's poll advice to the machine."""
        self.machine.advise(advice)

    # -- NTS state -----------------------------------------------------------

    def load_dump(self, now: float) -> bool:
        """Take saved keys and cookies; True if the source can skip NTS-KE."""
        if self.dump_path is None or not isinstance(self.session, NtsSession):
            return False
        try:
            state = load_state(self.dump_path, DUMP_KIND, DUMP_VERSION)
            if state is None:
                return False
            self.session.restore(state.payload["session"])
            self.ke.successes = int(state.payload.get("ke_count", 0))
            wall = state.payload.get("ke_time")
            if wall is not None:
                self.ke.last_success_wall = float(wall)
                age = max(0.0, self.clock.now_ns() / 1e9 - float(wall))
                self.ke.last_success = now - age
        except (StateFileError, KeyError, TypeError, ValueError, OverflowError) as exc:
            moved = set_aside(self.dump_path)
            where = f" (moved to {moved})" if moved else ""
            log.warning("%s: ignoring saved NTS cookies: %s%s", self.name, exc, where)
            return False
        log.info("%s: loaded %d NTS cookies from %s", self.name, len(self.session.cookies),
                 self.dump_path)
        warning = check_permissions(self.dump_path)
        if warning is not None:
            log.warning("%s; rewriting it owner-only", warning)
            self.save_dump()
        return True

    def save_dump(self) -> None:
        if self.dump_path is None or not isinstance(self.session, NtsSession):
            return
        dumped = self.session.dump()
        try:
            if dumped is None:
                self.dump_path.unlink(missing_ok=True)
            else:
                save_state(self.dump_path, DUMP_KIND, DUMP_VERSION,
                           {"session": dumped, "ke_count": self.ke.successes,
                            "ke_time": self.ke.last_success_wall})
        except (OSError, StateFileError, ValueError) as exc:
            # Retried at the next change (every poll); said once until it works again.
            message = f"cannot save NTS cookies to {self.dump_path}: {exc}"
            if message != self._save_error:
                log.error("%s: %s", self.name, message)
            self._save_error = message
            return
        if self._save_error:
            log.info("%s: NTS cookies saved to %s again", self.name, self.dump_path)
        self._save_error = ""

    def set_time_check(self, enabled: bool) -> None:
        """``nocerttimecheck``: relax only the certificate time checks until the clock is set."""
        if isinstance(self.session, NtsSession) and self.session.trust is not None:
            self.session.trust.no_cert_time_check = not enabled

    async def _key_exchange(self, now: float) -> bool:
        assert isinstance(self.session, NtsSession)
        try:
            await self.session.key_exchange()
        except KeError as exc:
            delay = self.machine.ke_failed(now, str(exc),
                                           connect=isinstance(exc, KeConnectionError))
            self.last_error = str(exc)
            log.warning("%s: NTS-KE failed (retry in %.0f s): %s", self.name, delay, exc)
            return False
        self._ke_succeeded(now)
        return True

    def _ke_succeeded(self, now: float) -> None:
        self.machine.ke_succeeded(now, self.clock.now_ns() / 1e9)
        self.save_dump()

    def rekey(self) -> None:
        """Drop keys and cookies: the next poll does a fresh NTS-KE (``ntspy ctl rekey``)."""
        if isinstance(self.session, NtsSession):
            self.session.ke = None
            self.session.cookies.clear()
            self.machine.rekey()

    # -- polling -------------------------------------------------------------

    async def poll_once(self, now: float) -> Measurement | None:
        """One poll at monotonic time ``now``: the machine's steps, carried out.

        Returns the measurement (None when the poll got no usable answer) for
        the daemon to hand to the sync engine, which owns reach and statistics.
        """
        session = self.session
        have_keys = isinstance(session, NtsSession) and session.ke is not None \
            and bool(session.cookies)
        step = self.machine.begin_poll(now, have_keys)
        if step is Step.SKIP:
            return None
        if step is Step.KEY_EXCHANGE and not await self._key_exchange(now):
            return None
        measurement = await self._exchange(now)
        if measurement is None:
            return None
        self.last, self.last_rx, self.last_error = measurement, now, ""
        return measurement

    async def _exchange(self, now: float) -> Measurement | None:
        session = self.session
        naks_before = session.stats["naks"]
        kes_before = session.stats["key exchanges"]
        try:
            measurement = await session.measure()
        except KeError as exc:  # a NAK led to a new NTS-KE, which failed
            self.machine.renewal_failed(now, str(exc))
            self.last_error = str(exc)
            return None
        except KissOfDeath as exc:
            # Authenticated (NTS) or not, a kiss only costs us this poll.
            self.last_error = str(exc)
            self.machine.kissed(exc.code)
            return None
        except NtsError as exc:
            self.last_error = str(exc)
            return None
        self.machine.answered()
        if isinstance(session, NtsSession):
            if session.stats["key exchanges"] > kes_before:
                self._ke_succeeded(now)
            if session.stats["naks"] > naks_before:
                log.info("%s: NTS NAK: cookies dropped, new NTS-KE done", self.name)
        return measurement

    # -- status --------------------------------------------------------------

    def root_distance(self, now_ns: int) -> float:
        if self.stats.np == 0:
            return math.inf
        return self.stats.root_distance(now_ns)

    def authdata(self, now: float) -> dict[str, Any]:
        row: dict[str, Any] = {
            "name": self.name, "configured": self.cfg.name, "address": self.address,
            "mode": "-", "key_id": 0,
            "type": 0, "key_bits": 0, "last": None, "attempts": 0, "naks": 0,
            "cookies": 0, "cookie_length": 0,
        }
        if isinstance(self.session, NtsSession):
            ke = self.session.ke
            row.update({
                "mode": "NTS",
                "key_id": self.ke.successes,
                "type": ke.aead_id if ke else 0,
                "key_bits": info(ke.aead_id).key_length * 8 if ke else 0,
                "last": now - self.ke.last_success if self.ke.last_success is not None else None,
                "attempts": self.ke.attempts,
                "naks": int(self.session.stats["naks"]),
                "cookies": len(self.session.cookies),
                "cookie_length": len(self.session.cookies[0]) if self.session.cookies else 0,
                "last_error": self.ke.last_error,
            })
        return row


def exchange_of(m: Measurement) -> Exchange:
    """The sync engine's view of a measurement."""
    try:
        leap = Leap(m.leap)
    except ValueError:
        leap = Leap.UNSYNCHRONIZED
    return Exchange(t1=m.t1, t2=m.t2, t3=m.t3, t4=m.t4, root_delay=m.root_delay,
                    root_dispersion=m.root_dispersion, precision=m.precision,
                    stratum=m.stratum, leap=leap, authenticated=m.authenticated)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-_:" else "_" for c in name)
