"""One configured time source of the client daemon: polling, reach, NTS-KE, samples.

A :class:`Source` owns a session (NTS or plain), decides when to poll and when
to (re)do NTS-KE, keeps the 8-bit reach register and the per-source sample
statistics, and saves its NTS keys and cookies so a restart needs no NTS-KE.
The event loop and the clock are the daemon's; nothing here sleeps.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..clock import Clock
from ..config import SourceConfig
from ..errors import KeConnectionError, KeError, KissOfDeath, NtsError, StateFileError
from ..net.tls import TrustConfig
from ..proto.aead import info
from ..proto.ntp import Leap
from ..state import check_permissions, load_state, save_state, set_aside
from ..sync.engine import EngineSource, Exchange, PollScore, SourceOptions
from ..sync.filter import ReachRegister, SourceStats
from .session import Measurement, NtsSession, PlainSession

log = logging.getLogger("ntspy.client.source")

# chrony's NTS-KE retry intervals: 2^4 s after a failure to connect, 2^10 s
# after a failure in TLS or NTS-KE itself (the server is there but refuses
# us: hammering it will not help), doubling per failure up to the cap.
KE_BACKOFF_CONNECT_LOG2 = 4
KE_BACKOFF_TLS_LOG2 = 10
KE_BACKOFF_MAX_LOG2 = 17
IBURST_COUNT = 4
IBURST_INTERVAL = 2.0
MAX_POLL_LOG2 = 17  # RFC 5905's largest poll exponent (36 h)
DUMP_KIND = "ntspy-nts-source"
DUMP_VERSION = 1


@dataclass(slots=True)
class KeStatus:
    """What ``authdata`` shows for an NTS source."""

    successes: int = 0  # chrony's KeyID column for NTS
    attempts: int = 0  # attempts since the last success
    last_success: float | None = None  # monotonic seconds
    last_success_wall: float | None = None  # Unix seconds, for the dump file
    last_error: str = ""
    retry_at: float = 0.0  # monotonic seconds


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
        self.poll = cfg.minpoll
        self._poll_score = PollScore()
        self._in_burst = False
        self.polls = 0
        self.iburst_left = IBURST_COUNT if cfg.iburst else 0
        self.ke = KeStatus()
        self.ntsrefresh = ntsrefresh
        self.backoff_scale = backoff_scale
        self.last_rx: float | None = None  # monotonic
        self.last: Measurement | None = None
        self.last_error = ""
        self.errors = 0
        """Poll rounds of this source that raised (bugs; logged once per kind)."""
        self.logged_errors: set[str] = set()
        self.dumpdir = dumpdir
        self.dump_path: Path | None = None
        self._trust = trust or (lambda _set: TrustConfig())
        self.session: NtsSession | PlainSession
        self.set_address(address if address is not None else cfg.name)
        self.resolved = _is_ip(self.address)

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
                server_name=cfg.name,
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

    # -- scheduling ----------------------------------------------------------

    def interval(self) -> float:
        """Seconds until the next poll."""
        if self.iburst_left > 0 and self.polls > 0:
            return min(IBURST_INTERVAL, 2.0 ** self.poll)
        return 2.0 ** self.poll

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
        except OSError as exc:
            log.error("%s: cannot save NTS cookies to %s: %s", self.name, self.dump_path, exc)

    def set_time_check(self, enabled: bool) -> None:
        """``nocerttimecheck``: relax only the certificate time checks until the clock is set."""
        if isinstance(self.session, NtsSession) and self.session.trust is not None:
            self.session.trust.no_cert_time_check = not enabled

    async def _key_exchange(self, now: float) -> bool:
        assert isinstance(self.session, NtsSession)
        if now < self.ke.retry_at:
            return False
        self.ke.attempts += 1
        try:
            await self.session.key_exchange()
        except KeError as exc:
            base = KE_BACKOFF_CONNECT_LOG2 if isinstance(exc, KeConnectionError) \
                else KE_BACKOFF_TLS_LOG2
            delay = 2.0 ** min(KE_BACKOFF_MAX_LOG2, base + self.ke.attempts - 1)
            self.ke.retry_at = now + delay * self.backoff_scale
            self.ke.last_error = self.last_error = str(exc)
            log.warning("%s: NTS-KE failed (retry in %.0f s): %s", self.name,
                        delay * self.backoff_scale, exc)
            return False
        self._ke_succeeded(now)
        return True

    def _ke_succeeded(self, now: float) -> None:
        self.ke.successes += 1
        self.ke.attempts = 0
        self.ke.last_success = now
        self.ke.last_success_wall = self.clock.now_ns() / 1e9
        self.ke.last_error = ""
        self.save_dump()

    def rekey(self) -> None:
        """Drop keys and cookies: the next poll does a fresh NTS-KE (``ntspy ctl rekey``)."""
        if isinstance(self.session, NtsSession):
            self.session.ke = None
            self.session.cookies.clear()
            self.ke.retry_at = 0.0

    # -- polling -------------------------------------------------------------

    async def poll_once(self, now: float) -> Measurement | None:
        """One exchange at monotonic time ``now``; updates the poll interval.

        Returns the measurement (None when the poll got no usable answer) for
        the daemon to hand to the sync engine, which owns reach and statistics.
        """
        self.polls += 1
        in_burst = self.iburst_left > 0
        if in_burst:
            self.iburst_left -= 1
        measurement = await self._exchange(now)
        if measurement is None:
            return None
        self.last, self.last_rx, self.last_error = measurement, now, ""
        self._in_burst = in_burst
        return measurement

    def adjust_poll(self, advice: float) -> None:
        """Follow the sync engine's advice on the polling interval (see
        :class:`~ntspy.sync.engine.PollScore`).  Burst samples come 2 s apart and
        say nothing about the source over the poll interval, so they do not count."""
        if self._in_burst:
            return
        self.poll = self._poll_score.step(advice, self.poll, self.cfg.minpoll,
                                          max(self.cfg.minpoll, self.cfg.maxpoll))

    async def _exchange(self, now: float) -> Measurement | None:
        session = self.session
        if isinstance(session, NtsSession):
            refresh_due = (
                self.ke.last_success is not None
                and now - self.ke.last_success >= self.ntsrefresh
            )
            if (session.ke is None or not session.cookies or refresh_due) \
                    and not await self._key_exchange(now):
                return None
            naks_before = session.stats["naks"]
            kes_before = session.stats["key exchanges"]
        try:
            measurement = await session.measure()
        except KeError as exc:  # a NAK led to a new NTS-KE, which failed
            self.ke.attempts += 1
            self.ke.last_error = self.last_error = str(exc)
            self.ke.retry_at = now + 2.0 ** KE_BACKOFF_CONNECT_LOG2 * self.backoff_scale
            return None
        except KissOfDeath as exc:
            # Authenticated (NTS) or not, a kiss only costs us this poll. RATE
            # asks us to poll less often: double the interval, past maxpoll if
            # need be, as RFC 5905 s7.4 expects of a client.
            self.last_error = str(exc)
            if exc.code == "RATE":
                self.poll = min(self.poll + 1, MAX_POLL_LOG2)
            return None
        except NtsError as exc:
            self.last_error = str(exc)
            return None
        if isinstance(session, NtsSession):
            self.ke.attempts = 0
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
            "name": self.name, "configured": self.cfg.name, "mode": "-", "key_id": 0,
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


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-_:" else "_" for c in name)
