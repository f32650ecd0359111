"""Clocks: where the adapters read the time.

Protocol code never reads a clock; the I/O adapters (``ntspy.net``,
``ntspy.client``, ``ntspy.server``) take a :class:`Clock` and pass the
readings in.  Tests hand them a :class:`ManualClock` instead.

Reading never needs CAP_SYS_TIME. Correcting the clock goes through the
:class:`ClockControl` interface: :class:`SystemClockControl` (``clock_adjtime``,
needs CAP_SYS_TIME), :class:`MeasureOnlyClock` (``-x``: records, never
changes anything) and the simulated clock in :mod:`ntspy.sync.sim`.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Anything that tells the current real (wall-clock) time."""

    def now_ns(self) -> int:
        """Current time as Unix nanoseconds (CLOCK_REALTIME scale)."""
        ...


class SystemClock:
    """The kernel's CLOCK_REALTIME, the same clock SO_TIMESTAMPNS stamps with."""

    __slots__ = ()

    def now_ns(self) -> int:
        return time.clock_gettime_ns(time.CLOCK_REALTIME)


class ManualClock:
    """A clock that only moves when told to; for tests and simulation."""

    __slots__ = ("_now",)

    def __init__(self, start_ns: int = 0) -> None:
        self._now = start_ns

    def now_ns(self) -> int:
        return self._now

    def set(self, now_ns: int) -> None:
        """Jump to ``now_ns``."""
        self._now = now_ns

    def advance(self, delta_ns: int) -> None:
        """Move forward (or back, if negative) by ``delta_ns``."""
        self._now += delta_ns


# ---------------------------------------------------------------------------
# Controlling the clock


@runtime_checkable
class ClockControl(Clock, Protocol):
    """A clock the sync loop may correct (see :class:`ntspy.sync.discipline.DisciplinedClock`).

    Offsets are positive when the clock is behind: ``step(+0.5)`` moves it
    0.5 s forward; ``slew`` does the same gradually; ``pending_slew_s`` is what
    is still to be applied, i.e. how far the clock is behind the disciplined
    timescale right now.
    """

    can_control: bool

    def step(self, offset_s: float) -> None: ...

    def slew(self, offset_s: float, duration_s: float) -> None: ...

    def set_frequency(self, ppm: float) -> None: ...

    def pending_slew_s(self) -> float: ...

    def set_leap(self, leap: int) -> None:
        """Arm the kernel for a leap second at the end of the UTC day (RFC 5905 LI:
        1 insert, 2 delete, 0 none)."""
        ...


@runtime_checkable
class SlewingClock(Protocol):
    """A clock whose slews need the adapter's help: :meth:`maintain` must run
    when :meth:`next_maintenance_s` says, and :meth:`finish` at exit."""

    def next_maintenance_s(self) -> float | None: ...

    def maintain(self) -> None: ...

    def finish(self) -> float: ...

    def set_sync_status(self, synchronised: bool, max_error_s: float,
                        est_error_s: float) -> None: ...


class MeasureOnlyClock(SystemClock):
    """The system clock left free-running (``chronyd -x``).

    Corrections are kept as a virtual timescale on top of the system clock:
    every step, slew and frequency correction counts as never applied, so
    :meth:`pending_slew_s` is the offset of the system clock from the
    disciplined time, and the sync loop tracks the clock's offset and drift
    without ever changing it.
    """

    __slots__ = ("_correction", "_freq_since_ns", "frequency_ppm", "leap", "steps")

    can_control = False

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.frequency_ppm = 0.0
        self.leap = 0
        self._correction = 0.0
        self._freq_since_ns = self.now_ns()

    def _integrate(self) -> None:
        now = self.now_ns()
        self._correction += self.frequency_ppm * 1e-6 * (now - self._freq_since_ns) / 1e9
        self._freq_since_ns = now

    def step(self, offset_s: float) -> None:
        self.steps.append(offset_s)
        self._correction += offset_s

    def slew(self, offset_s: float, duration_s: float = 0.0) -> None:
        self._correction += offset_s

    def set_frequency(self, ppm: float) -> None:
        self._integrate()
        self.frequency_ppm = ppm

    def pending_slew_s(self) -> float:
        self._integrate()
        return self._correction

    def set_leap(self, leap: int) -> None:
        self.leap = leap


# Linux struct timex (include/uapi/linux/timex.h), read and written with
# clock_adjtime(). Resolved from the process's own symbol table (CDLL(None)) so
# that preloaded time simulators interpose it as they do for chronyd.
_ADJ_FREQUENCY = 0x0002
_ADJ_MAXERROR = 0x0004
_ADJ_ESTERROR = 0x0008
_ADJ_STATUS = 0x0010
_ADJ_SETOFFSET = 0x0100
_ADJ_NANO = 0x2000
_ADJ_TICK = 0x4000
_STA_PLL = 0x0001
_STA_PPSFREQ = 0x0002
_STA_PPSTIME = 0x0004
_STA_FLL = 0x0008
_STA_INS = 0x0010
_STA_DEL = 0x0020
_STA_UNSYNC = 0x0040
_MAX_ERROR_US = 16_000_000  # the kernel's NTP_PHASE_LIMIT: beyond it, unsynchronised
_FREQ_SCALE = 65536.0  # timex.freq is ppm with a 16-bit fraction
MAX_FREQUENCY_PPM = 500.0  # the kernel's limit for timex.freq


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class Timex(ctypes.Structure):
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_padding", ctypes.c_int * 11),
    ]


class ClockAdjtimeError(OSError):
    """clock_adjtime() failed; without CAP_SYS_TIME every change does (EPERM)."""


MIN_SLEW_S = 1.0
"""Shortest slew: a correction is never crammed into less than this (chrony's
minimum slew timeout), so the timer that ends it is never the larger error."""
DEFAULT_MAX_SLEW_PPM = 1e6 / 12
"""chrony's default ``maxslewrate``: 83333.333 ppm."""


class SystemClockControl(SystemClock):
    """The system clock, corrected through ``clock_adjtime`` the way chronyd does.

    Every phase correction is a slew made by changing the clock's frequency:
    ``slew(offset, duration)`` adds the kernel frequency ``offset / duration``
    (at most ``max_slew_ppm``) on top of the frequency correction, and
    :meth:`maintain`, called when :meth:`next_maintenance_s` says, takes it off
    again when the offset has been corrected.  The part corrected so far is
    accounted from the monotonic clock and the rate that was actually set, so
    a late timer only leaves a tiny overshoot that the next slew takes back.
    Frequencies beyond the kernel's +-500 ppm ``timex.freq`` go partly into
    ``timex.tick``.  Steps use ``ADJ_SETOFFSET``; the fixed-rate
    ``adjtime()`` singleshot is never used.

    ``adjtime`` and ``monotonic_ns`` can be replaced for tests (a fake kernel);
    by default they are ``clock_adjtime(CLOCK_REALTIME, ...)`` resolved from the
    process's own symbols (so preloaded simulators interpose it) and
    ``time.monotonic_ns``.
    """

    __slots__ = ("_adjtime", "_base_ppm", "_end_ns", "_kernel_ppm", "_max_slew", "_mono",
                 "_nominal_tick", "_pending", "_rate", "_since_ns")

    can_control = True

    def __init__(
        self,
        max_slew_ppm: float = DEFAULT_MAX_SLEW_PPM,
        *,
        adjtime: Callable[[Timex], int] | None = None,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if adjtime is None:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.clock_adjtime
            fn.argtypes = [ctypes.c_int, ctypes.POINTER(Timex)]
            fn.restype = ctypes.c_int

            def adjtime(tx: Timex) -> int:
                return int(fn(time.CLOCK_REALTIME, ctypes.byref(tx)))

        self._adjtime = adjtime
        self._mono = monotonic_ns
        self._max_slew = max(0.0, max_slew_ppm) * 1e-6
        self._nominal_tick = 1_000_000 // (os.sysconf("SC_CLK_TCK") or 100)
        self._base_ppm = 0.0
        self._pending = 0.0
        """Seconds still to correct at :attr:`_since_ns` (positive: clock behind)."""
        self._rate = 0.0
        """Slew rate in force, s/s (signed like the offset)."""
        self._since_ns = monotonic_ns()
        self._end_ns: int | None = None
        self._kernel_ppm: float | None = None

    # -- the kernel interface -------------------------------------------------

    def adjtime(self, tx: Timex) -> int:
        """Call clock_adjtime(CLOCK_REALTIME, tx); returns the clock state."""
        rc = self._adjtime(tx)
        if rc < 0:
            err = ctypes.get_errno()
            raise ClockAdjtimeError(err, f"clock_adjtime: {os.strerror(err)}")
        return rc

    def read(self) -> Timex:
        """The kernel's clock state, without changing it (needs no privilege)."""
        tx = Timex()
        self.adjtime(tx)
        return tx

    def _program(self) -> None:
        """Set the kernel frequency to the correction plus the slew in force."""
        total = self._base_ppm + self._rate * 1e6
        if total == self._kernel_ppm:
            return
        tx = Timex()
        tx.modes = _ADJ_FREQUENCY | _ADJ_TICK
        # Whole 1/nominal steps of the tick carry what timex.freq cannot.
        per_tick_ppm = 1e6 / self._nominal_tick
        ticks = 0
        if abs(total) > MAX_FREQUENCY_PPM:
            ticks = round(total / per_tick_ppm)
            limit = self._nominal_tick // 10  # the kernel allows +-10%
            ticks = max(-limit, min(limit, ticks))
        freq = max(-MAX_FREQUENCY_PPM, min(MAX_FREQUENCY_PPM, total - ticks * per_tick_ppm))
        tx.tick = self._nominal_tick + ticks
        tx.freq = round(freq * _FREQ_SCALE)
        self.adjtime(tx)
        self._kernel_ppm = total

    def probe(self) -> None:
        """Check that the kernel lets us steer the clock, without changing it.

        Writes the kernel's own frequency back to it: a no-op where allowed,
        EPERM (:class:`ClockAdjtimeError`) without CAP_SYS_TIME, so a daemon
        that cannot do its job says so at start, as chronyd does.
        """
        tx = self.read()
        write = Timex()
        write.modes = _ADJ_FREQUENCY
        write.freq = tx.freq
        self.adjtime(write)

    # -- bookkeeping ----------------------------------------------------------

    def _account(self) -> int:
        """Take what the slew corrected since the last look off the pending offset."""
        now = self._mono()
        # The monotonic clock runs at the corrected rate, slew included: per
        # second of it the slew corrected rate / (1 + frequency) of a second.
        self._pending -= self._rate * (now - self._since_ns) * 1e-9 / self._speed()
        self._since_ns = now
        return now

    def _speed(self) -> float:
        """Local seconds per true second at the kernel's current setting."""
        return 1.0 + (self._kernel_ppm or 0.0) * 1e-6

    def _plan(self, now: int, duration_s: float) -> None:
        """Slew the pending offset over ``duration_s`` (bounded) from ``now``."""
        if abs(self._pending) < 1e-9 or self._max_slew <= 0:
            self._rate, self._end_ns = 0.0, None
        else:
            rate = min(abs(self._pending) / max(duration_s, MIN_SLEW_S), self._max_slew)
            self._rate = math.copysign(rate, self._pending)
        self._program()
        if self._rate:
            self._end_ns = now + round(abs(self._pending) / abs(self._rate) * self._speed() * 1e9)

    # -- ClockControl -----------------------------------------------------------

    def step(self, offset_s: float) -> None:
        tx = Timex()
        tx.modes = _ADJ_SETOFFSET | _ADJ_NANO
        ns = round(offset_s * 1e9)
        tx.time.tv_sec, tx.time.tv_usec = divmod(ns, 1_000_000_000)  # tv_usec holds ns here
        self.adjtime(tx)

    def slew(self, offset_s: float, duration_s: float = 0.0) -> None:
        """Add ``offset_s`` to the pending correction and slew all of it over
        ``duration_s`` (at least :data:`MIN_SLEW_S`, at most ``max_slew_ppm``)."""
        if not math.isfinite(offset_s):
            raise ValueError(f"slew offset must be finite, not {offset_s}")
        now = self._account()
        self._pending += offset_s
        # An unknown duration (NaN) means no preference: the shortest slew.
        self._plan(now, duration_s if duration_s == duration_s else 0.0)

    def pending_slew_s(self) -> float:
        self._account()
        return self._pending

    def set_frequency(self, ppm: float) -> None:
        self._account()
        self._base_ppm = ppm
        self._program()

    def next_maintenance_s(self) -> float | None:
        """Seconds until :meth:`maintain` must run (None: no slew in progress)."""
        if self._end_ns is None:
            return None
        return max(0.0, (self._end_ns - self._mono()) * 1e-9)

    def maintain(self) -> None:
        """End a slew whose time is up; what a late call overshot is slewed back."""
        if self._end_ns is None:
            return
        now = self._account()
        if now < self._end_ns:
            return
        self._plan(now, MIN_SLEW_S)

    def finish(self) -> float:
        """Stop slewing (at exit): the kernel is left at the frequency correction
        alone, never at a slew rate nobody will end.  Returns the offset that
        was still pending."""
        self._account()
        left, self._rate, self._end_ns = self._pending, 0.0, None
        self._pending = 0.0
        self._program()
        return left

    def frequency_ppm(self) -> float:
        """The kernel's frequency setting, ppm (tick and freq together)."""
        tx = self.read()
        return (float(tx.freq) / _FREQ_SCALE
                + float(tx.tick - self._nominal_tick) * 1e6 / self._nominal_tick)

    def set_leap(self, leap: int) -> None:
        tx = self.read()
        status = tx.status & ~(_STA_INS | _STA_DEL)
        status |= {1: _STA_INS, 2: _STA_DEL}.get(leap, 0)
        if status == tx.status:
            return
        tx = Timex()
        tx.modes = _ADJ_STATUS
        tx.status = status
        self.adjtime(tx)

    def set_sync_status(self, synchronised: bool, max_error_s: float, est_error_s: float) -> None:
        """Tell the kernel (and so every ``adjtimex`` reader) how good the clock is.

        Synchronised: STA_UNSYNC cleared, maxerror and esterror set (the
        kernel grows maxerror by itself and marks the clock unsynchronised
        when it passes 16 s, as it does for chronyd); the kernel's own PLL and
        FLL stay off, since the frequency is ours.
        """
        tx = self.read()
        status = tx.status & ~(_STA_PLL | _STA_FLL | _STA_PPSFREQ | _STA_PPSTIME)
        status = status & ~_STA_UNSYNC if synchronised else status | _STA_UNSYNC
        tx = Timex()
        tx.modes = _ADJ_STATUS | _ADJ_MAXERROR | _ADJ_ESTERROR
        tx.status = status
        tx.maxerror = min(_MAX_ERROR_US, max(0, round(max_error_s * 1e6)))
        tx.esterror = min(_MAX_ERROR_US, max(0, round(est_error_s * 1e6)))
        self.adjtime(tx)
