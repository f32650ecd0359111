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
import os
import time
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
_ADJ_OFFSET_SINGLESHOT = 0x8001
_ADJ_OFFSET_SS_READ = 0xA001
_ADJ_FREQUENCY = 0x0002
_ADJ_SETOFFSET = 0x0100
_ADJ_STATUS = 0x0010
_STA_INS = 0x0010
_STA_DEL = 0x0020
_ADJ_NANO = 0x2000
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


class SystemClockControl(SystemClock):
    """The system clock, corrected through ``clock_adjtime`` (needs CAP_SYS_TIME)."""

    __slots__ = ("_adjtime",)

    can_control = True

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.clock_adjtime
        fn.argtypes = [ctypes.c_int, ctypes.POINTER(Timex)]
        fn.restype = ctypes.c_int
        self._adjtime = fn

    def adjtime(self, tx: Timex) -> int:
        """Call clock_adjtime(CLOCK_REALTIME, tx); returns the clock state."""
        rc = int(self._adjtime(time.CLOCK_REALTIME, ctypes.byref(tx)))
        if rc < 0:
            err = ctypes.get_errno()
            raise ClockAdjtimeError(err, f"clock_adjtime: {os.strerror(err)}")
        return rc

    def read(self) -> Timex:
        """The kernel's clock state, without changing it (needs no privilege)."""
        tx = Timex()
        self.adjtime(tx)
        return tx

    def step(self, offset_s: float) -> None:
        tx = Timex()
        tx.modes = _ADJ_SETOFFSET | _ADJ_NANO
        ns = round(offset_s * 1e9)
        tx.time.tv_sec, tx.time.tv_usec = divmod(ns, 1_000_000_000)  # tv_usec holds ns here
        self.adjtime(tx)

    def slew(self, offset_s: float, duration_s: float = 0.0) -> None:
        """Add ``offset_s`` to the kernel's pending adjtime() slew (500 ppm;
        ``duration_s`` cannot be honoured by this kernel interface)."""
        tx = Timex()
        tx.modes = _ADJ_OFFSET_SINGLESHOT
        tx.offset = round((self.pending_slew_s() + offset_s) * 1e6)  # microseconds
        self.adjtime(tx)

    def pending_slew_s(self) -> float:
        tx = Timex()
        tx.modes = _ADJ_OFFSET_SS_READ
        self.adjtime(tx)
        return float(tx.offset) / 1e6

    def set_frequency(self, ppm: float) -> None:
        tx = Timex()
        tx.modes = _ADJ_FREQUENCY
        clamped = max(-MAX_FREQUENCY_PPM, min(MAX_FREQUENCY_PPM, ppm))
        tx.freq = round(clamped * _FREQ_SCALE)
        self.adjtime(tx)

    def frequency_ppm(self) -> float:
        return float(self.read().freq) / _FREQ_SCALE

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
