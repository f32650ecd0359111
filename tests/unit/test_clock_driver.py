"""SystemClockControl against a fake kernel: what it asks ``clock_adjtime`` for, and when.

The fake kernel keeps a ``struct timex`` state the way Linux does (each mode bit
sets its field; every call returns the state) and records every call, so the
tests see exactly the frequencies, ticks, status bits and errors the daemon
would set. The monotonic clock is an integer the test moves. Nothing here can
reach the real ``clock_adjtime``: every SystemClockControl gets the fake.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
from dataclasses import dataclass, field

import pytest

from ntspy.clock import MIN_SLEW_S, ClockAdjtimeError, SystemClockControl, Timex

ADJ_OFFSET = 0x0001
ADJ_FREQUENCY = 0x0002
ADJ_MAXERROR = 0x0004
ADJ_ESTERROR = 0x0008
ADJ_STATUS = 0x0010
ADJ_SETOFFSET = 0x0100
ADJ_NANO = 0x2000
ADJ_TICK = 0x4000
ADJ_OFFSET_SINGLESHOT = 0x8001
STA_PLL = 0x0001
STA_FLL = 0x0008
STA_INS = 0x0010
STA_DEL = 0x0020
STA_UNSYNC = 0x0040
FREQ_SCALE = 65536

NOMINAL_TICK = 1_000_000 // (os.sysconf("SC_CLK_TCK") or 100)
PPM_PER_TICK = 1e6 / NOMINAL_TICK
MAX_SLEW_PPM = 1e6 / 12
MAX_SLEW = MAX_SLEW_PPM * 1e-6
NS = 1_000_000_000


@dataclass(frozen=True)
class Call:
    """One clock_adjtime call as the driver made it (the fields it passed in)."""

    modes: int
    freq: int
    tick: int
    status: int
    maxerror: int
    esterror: int
    tv_sec: int
    tv_usec: int


@dataclass
class FakeKernel:
    """The kernel's timex state and every call made to change or read it."""

    freq: int = 0
    tick: int = NOMINAL_TICK
    status: int = STA_UNSYNC | STA_PLL | STA_FLL
    maxerror: int = 16_000_000
    esterror: int = 16_000_000
    calls: list[Call] = field(default_factory=list)
    refuse: bool = False

    def __call__(self, tx: Timex) -> int:
        self.calls.append(Call(tx.modes, tx.freq, tx.tick, tx.status, tx.maxerror,
                               tx.esterror, tx.time.tv_sec, tx.time.tv_usec))
        if self.refuse and tx.modes:
            ctypes.set_errno(errno.EPERM)
            return -1
        if tx.modes & ADJ_FREQUENCY:
            self.freq = tx.freq
        if tx.modes & ADJ_TICK:
            self.tick = tx.tick
        if tx.modes & ADJ_STATUS:
            self.status = tx.status
        if tx.modes & ADJ_MAXERROR:
            self.maxerror = tx.maxerror
        if tx.modes & ADJ_ESTERROR:
            self.esterror = tx.esterror
        tx.freq, tx.tick, tx.status = self.freq, self.tick, self.status
        tx.maxerror, tx.esterror = self.maxerror, self.esterror
        return 0  # TIME_OK

    @property
    def ppm(self) -> float:
        """The total frequency the kernel runs at: timex.freq and the tick together."""
        return self.freq / FREQ_SCALE + (self.tick - NOMINAL_TICK) * PPM_PER_TICK

    @property
    def writes(self) -> list[Call]:
        return [c for c in self.calls if c.modes]


@dataclass
class Monotonic:
    now: int = 1_000 * NS

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * NS)


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def mono() -> Monotonic:
    return Monotonic()


@pytest.fixture
def clock(kernel: FakeKernel, mono: Monotonic) -> SystemClockControl:
    return SystemClockControl(adjtime=kernel, monotonic_ns=mono)


def pending_after(pending: float, rate: float, local_s: float, kernel_ppm: float) -> float:
    """What is left of ``pending`` after ``local_s`` of a clock running at ``kernel_ppm``
    while slewing at ``rate`` (signed, s/s): the true time that passed is shorter."""
    return pending - rate * local_s / (1 + kernel_ppm * 1e-6)


# -- the fastest slew ---------------------------------------------------------------------


def test_fastest_slew_is_maxslewrate_split_between_tick_and_freq(
        clock: SystemClockControl, kernel: FakeKernel) -> None:
    clock.slew(0.1, 0.0)
    call = kernel.writes[-1]
    assert call.modes == ADJ_FREQUENCY | ADJ_TICK
    # +83333 ppm cannot go into timex.freq (+-500 ppm): whole ticks carry it.
    assert call.tick > NOMINAL_TICK
    assert abs(call.freq / FREQ_SCALE) <= 500.0
    assert kernel.ppm == pytest.approx(MAX_SLEW_PPM, abs=1.0)
    assert clock.frequency_ppm() == pytest.approx(MAX_SLEW_PPM, abs=1.0)


def test_fastest_slew_back_is_negative_maxslewrate(
        clock: SystemClockControl, kernel: FakeKernel) -> None:
    clock.set_frequency(-30.0)
    clock.slew(-0.1, 0.0)
    assert kernel.tick < NOMINAL_TICK and abs(kernel.freq / FREQ_SCALE) <= 500.0
    assert kernel.ppm == pytest.approx(-30.0 - MAX_SLEW_PPM, abs=1.0)


def test_pending_slew_shrinks_on_the_true_timescale(
        clock: SystemClockControl, mono: Monotonic) -> None:
    clock.slew(0.1, 0.0)
    assert clock.pending_slew_s() == pytest.approx(0.1, abs=1e-12)
    mono.advance(0.6)
    expected = pending_after(0.1, MAX_SLEW, 0.6, MAX_SLEW_PPM)
    assert clock.pending_slew_s() == pytest.approx(expected, abs=1e-9)
    # The local clock runs 8.3% fast while slewing: 0.6 local seconds corrected
    # less than 0.6 * maxslewrate.
    assert clock.pending_slew_s() > 0.1 - MAX_SLEW * 0.6 + 1e-3
    mono.advance(0.4)
    assert clock.pending_slew_s() == pytest.approx(
        pending_after(0.1, MAX_SLEW, 1.0, MAX_SLEW_PPM), abs=1e-9)


def test_next_maintenance_is_when_the_slew_is_done(
        clock: SystemClockControl, mono: Monotonic, kernel: FakeKernel) -> None:
    assert clock.next_maintenance_s() is None
    clock.slew(0.1, 0.0)
    end = 0.1 / MAX_SLEW * (1 + MAX_SLEW)  # 1.2 true seconds = 1.3 local seconds
    due = clock.next_maintenance_s()
    assert due == pytest.approx(end, abs=1e-6)
    mono.advance(0.5)
    assert clock.next_maintenance_s() == pytest.approx(end - 0.5, abs=1e-6)
    # Early maintenance changes nothing.
    writes = len(kernel.writes)
    clock.maintain()
    assert len(kernel.writes) == writes and kernel.ppm == pytest.approx(MAX_SLEW_PPM, abs=1)
    mono.advance(end - 0.5)
    assert clock.pending_slew_s() == pytest.approx(0.0, abs=1e-9)


def test_maintain_at_the_end_restores_the_base_frequency(
        clock: SystemClockControl, mono: Monotonic, kernel: FakeKernel) -> None:
    clock.set_frequency(12.5)
    assert kernel.ppm == pytest.approx(12.5, abs=1e-4) and kernel.tick == NOMINAL_TICK
    clock.slew(0.1, 0.0)
    due = clock.next_maintenance_s()
    assert due is not None
    mono.advance(due)
    clock.maintain()
    assert kernel.ppm == pytest.approx(12.5, abs=1e-4)
    assert kernel.tick == NOMINAL_TICK
    assert clock.next_maintenance_s() is None
    assert clock.pending_slew_s() == pytest.approx(0.0, abs=1e-9)


def test_late_maintain_slews_the_small_overshoot_back(
        clock: SystemClockControl, mono: Monotonic, kernel: FakeKernel) -> None:
    clock.set_frequency(12.5)
    clock.slew(0.1, 0.0)
    due = clock.next_maintenance_s()
    assert due is not None
    late = 0.2
    mono.advance(due + late)
    clock.maintain()
    overshoot = pending_after(0.0, MAX_SLEW, late, 12.5 + MAX_SLEW_PPM)
    assert -0.02 < overshoot < -0.01
    assert clock.pending_slew_s() == pytest.approx(overshoot, abs=1e-6)
    # Taken back the other way, over the shortest slew, at |overshoot| / 1 s.
    assert kernel.ppm < 12.5
    assert kernel.ppm - 12.5 == pytest.approx(overshoot / MIN_SLEW_S * 1e6, rel=1e-4)
    again = clock.next_maintenance_s()
    assert again is not None and again == pytest.approx(MIN_SLEW_S, rel=0.02)
    mono.advance(again)
    clock.maintain()
    assert kernel.ppm == pytest.approx(12.5, abs=1e-4)
    assert clock.pending_slew_s() == pytest.approx(0.0, abs=1e-9)
    assert clock.next_maintenance_s() is None


# -- slower slews, frequency changes, the end ---------------------------------------------


@pytest.mark.parametrize(("offset", "duration", "ppm"), [
    (0.001, 10.0, 100.0),  # 1 ms over 10 s: 100 ppm
    (-0.002, 4.0, -500.0),  # exactly what timex.freq holds
    (0.001, 0.1, 1000.0),  # never faster than over MIN_SLEW_S (1 s)
    (0.5, 1.0, MAX_SLEW_PPM),  # never faster than maxslewrate
])
def test_slew_rate_is_offset_over_duration_within_the_limits(
        clock: SystemClockControl, kernel: FakeKernel, offset: float, duration: float,
        ppm: float) -> None:
    clock.slew(offset, duration)
    assert kernel.ppm == pytest.approx(ppm, abs=1e-3)
    if abs(ppm) <= 500:
        assert kernel.tick == NOMINAL_TICK
        assert kernel.freq == round(ppm * FREQ_SCALE)
    due = clock.next_maintenance_s()
    assert due == pytest.approx(abs(offset) / abs(ppm * 1e-6) * (1 + ppm * 1e-6), rel=1e-6)


def test_slews_add_up_and_are_replanned_together(
        clock: SystemClockControl, kernel: FakeKernel, mono: Monotonic) -> None:
    clock.slew(0.001, 10.0)
    mono.advance(2.0)
    left = pending_after(0.001, 100e-6, 2.0, 100.0)
    clock.slew(0.001, 10.0)
    assert clock.pending_slew_s() == pytest.approx(left + 0.001, abs=1e-12)
    assert kernel.ppm == pytest.approx((left + 0.001) / 10.0 * 1e6, abs=1e-3)


def test_set_frequency_moves_the_base_under_a_running_slew(
        clock: SystemClockControl, kernel: FakeKernel, mono: Monotonic) -> None:
    clock.slew(0.1, 0.0)
    mono.advance(0.5)
    clock.set_frequency(-20.0)
    assert kernel.ppm == pytest.approx(-20.0 + MAX_SLEW_PPM, abs=1.0)
    first = pending_after(0.1, MAX_SLEW, 0.5, MAX_SLEW_PPM)
    assert clock.pending_slew_s() == pytest.approx(first, abs=1e-9)
    mono.advance(0.3)
    # From now on the clock runs 20 ppm slower: accounted at the new speed.
    assert clock.pending_slew_s() == pytest.approx(
        pending_after(first, MAX_SLEW, 0.3, -20.0 + MAX_SLEW_PPM), abs=1e-12)
    due = clock.next_maintenance_s()
    assert due is not None
    mono.advance(due)
    clock.maintain()
    # The end was planned at the old speed: a few microseconds are left, taken
    # back slowly; the base is what was set.
    assert abs(clock.pending_slew_s()) < 1e-5
    assert kernel.ppm == pytest.approx(-20.0, abs=10.0)
    clock.finish()
    assert kernel.ppm == pytest.approx(-20.0, abs=1e-4)


def test_set_frequency_alone_programs_tick_past_500_ppm(
        clock: SystemClockControl, kernel: FakeKernel) -> None:
    clock.set_frequency(1234.5)
    assert kernel.tick != NOMINAL_TICK and abs(kernel.freq / FREQ_SCALE) <= 500.0
    assert kernel.ppm == pytest.approx(1234.5, abs=1e-3)
    writes = len(kernel.writes)
    clock.set_frequency(1234.5)  # unchanged: no second write
    assert len(kernel.writes) == writes


def test_finish_leaves_only_the_base_frequency(
        clock: SystemClockControl, kernel: FakeKernel, mono: Monotonic) -> None:
    clock.set_frequency(7.0)
    clock.slew(0.1, 0.0)
    mono.advance(0.4)
    left = clock.finish()
    assert left == pytest.approx(pending_after(0.1, MAX_SLEW, 0.4, 7.0 + MAX_SLEW_PPM),
                                 abs=1e-9)
    assert kernel.ppm == pytest.approx(7.0, abs=1e-4) and kernel.tick == NOMINAL_TICK
    assert clock.pending_slew_s() == 0.0
    assert clock.next_maintenance_s() is None
    writes = len(kernel.writes)
    mono.advance(5.0)
    clock.maintain()
    assert len(kernel.writes) == writes and clock.pending_slew_s() == 0.0


# -- steps, status, leap ----------------------------------------------------------------


@pytest.mark.parametrize(("offset", "sec", "nsec"), [
    (-1.5, -2, 500_000_000),
    (2.25, 2, 250_000_000),
    (-1e-9, -1, 999_999_999),
    (3600.0, 3600, 0),
])
def test_step_uses_setoffset_with_a_normalised_time(
        clock: SystemClockControl, kernel: FakeKernel, offset: float, sec: int,
        nsec: int) -> None:
    clock.step(offset)
    (call,) = kernel.writes
    assert call.modes == ADJ_SETOFFSET | ADJ_NANO
    assert (call.tv_sec, call.tv_usec) == (sec, nsec)  # tv_usec holds ns with ADJ_NANO
    assert 0 <= call.tv_usec < NS
    assert kernel.ppm == 0.0  # a step leaves the frequency alone


def test_set_sync_status_clears_unsync_and_sets_the_errors(
        clock: SystemClockControl, kernel: FakeKernel) -> None:
    kernel.status |= STA_INS  # a leap second armed earlier stays armed
    clock.set_sync_status(True, 0.0123, 0.000456)
    call = kernel.writes[-1]
    assert call.modes == ADJ_STATUS | ADJ_MAXERROR | ADJ_ESTERROR
    assert not kernel.status & STA_UNSYNC
    assert not kernel.status & (STA_PLL | STA_FLL)  # the kernel's own loops stay off
    assert kernel.status & STA_INS
    assert (kernel.maxerror, kernel.esterror) == (12_300, 456)

    clock.set_sync_status(False, 100.0, 0.5)
    assert kernel.status & STA_UNSYNC
    assert kernel.maxerror == 16_000_000  # the kernel's NTP_PHASE_LIMIT
    assert kernel.esterror == 500_000


def test_set_leap_arms_and_disarms_without_touching_other_bits(
        clock: SystemClockControl, kernel: FakeKernel) -> None:
    clock.set_leap(1)
    assert kernel.status & STA_INS and not kernel.status & STA_DEL
    assert kernel.status & STA_UNSYNC
    clock.set_leap(2)
    assert kernel.status & STA_DEL and not kernel.status & STA_INS
    clock.set_leap(0)
    assert not kernel.status & (STA_INS | STA_DEL)
    writes = len(kernel.writes)
    clock.set_leap(0)  # already so: read, no write
    assert len(kernel.writes) == writes


def test_a_refusing_kernel_raises_clock_adjtime_error(kernel: FakeKernel,
                                                      mono: Monotonic) -> None:
    kernel.refuse = True
    clock = SystemClockControl(adjtime=kernel, monotonic_ns=mono)
    with pytest.raises(ClockAdjtimeError) as info:
        clock.slew(0.01, 0.0)
    assert info.value.errno == errno.EPERM
    assert isinstance(info.value, OSError)  # what the daemon catches and logs
    with pytest.raises(ClockAdjtimeError):
        clock.step(1.0)


def test_no_call_ever_uses_the_singleshot_or_the_kernel_pll(
        clock: SystemClockControl, kernel: FakeKernel, mono: Monotonic) -> None:
    clock.set_frequency(-12.0)
    for offset, duration in [(0.1, 0.0), (-0.003, 5.0), (2.0, 30.0), (-0.5, 0.0)]:
        clock.slew(offset, duration)
        mono.advance(0.7)
        clock.maintain()
    for _ in range(100):
        due = clock.next_maintenance_s()
        if due is None:
            break
        mono.advance(due + 0.01)
        clock.maintain()
    assert clock.next_maintenance_s() is None
    clock.step(-0.25)
    clock.set_sync_status(True, 0.01, 0.001)
    clock.set_leap(1)
    clock.finish()
    clock.read()
    assert len(kernel.writes) > 10
    for call in kernel.calls:
        assert call.modes & ADJ_OFFSET_SINGLESHOT != ADJ_OFFSET_SINGLESHOT, call
        assert not call.modes & ADJ_OFFSET, call  # phase goes by frequency, never the PLL
    assert kernel.ppm == pytest.approx(-12.0, abs=1e-4)


def test_a_nan_slew_duration_neither_raises_nor_poisons_the_state(
        clock: SystemClockControl, kernel: FakeKernel) -> None:
    # apply_action() hands slew() correction_rate / |pending|: a NaN rate from
    # the discipline arrives here as a NaN duration.
    clock.slew(0.001, math.nan)
    assert math.isfinite(clock.pending_slew_s())
    assert math.isfinite(kernel.ppm) and abs(kernel.ppm) <= 0.001 / MIN_SLEW_S * 1e6 + 1e-3
    clock.slew(0.001, 10.0)
    assert clock.pending_slew_s() == pytest.approx(0.002, abs=1e-9)
