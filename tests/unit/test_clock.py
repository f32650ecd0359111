"""Clock interface: reading, the measure-only clock, and the real clock_adjtime binding.

The suite runs without CAP_SYS_TIME (test.sh uses setpriv); these tests check
that, and that every attempt to change the real clock is refused by the kernel.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ntspy.clock import (
    ClockAdjtimeError,
    ClockControl,
    MeasureOnlyClock,
    SystemClock,
    SystemClockControl,
)

CAP_SYS_TIME = 25


def effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff in /proc/self/status")


def test_suite_runs_without_cap_sys_time() -> None:
    assert not effective_caps() & (1 << CAP_SYS_TIME), "run the tests under setpriv -sys_time"


def test_system_clock_reads_realtime() -> None:
    assert abs(SystemClock().now_ns() - time.time_ns()) < 50_000_000


def test_clock_adjtime_binding_reads_the_kernel_state() -> None:
    tx = SystemClockControl().read()
    # USER_HZ 100 -> tick 10000 us; the kernel keeps the frequency within +-500 ppm.
    assert 9000 <= tx.tick <= 11000
    assert abs(tx.freq / 65536.0) <= 512


@pytest.mark.parametrize("change", ["step", "slew", "set_frequency"])
def test_changing_the_real_clock_is_refused_without_the_capability(change: str) -> None:
    assert not effective_caps() & (1 << CAP_SYS_TIME)  # never risk the machine's clock
    clock = SystemClockControl()
    before = clock.read().freq
    with pytest.raises(ClockAdjtimeError) as info:
        getattr(clock, change)(before / 65536.0 if change == "set_frequency" else 0.001)
    assert info.value.errno == 1  # EPERM
    assert clock.read().freq == before


def test_measure_only_clock_keeps_corrections_virtual_and_never_changes_time() -> None:
    clock = MeasureOnlyClock()
    assert isinstance(clock, ClockControl) and not clock.can_control
    before = clock.now_ns()
    clock.step(3600.0)
    clock.slew(0.5, 10.0)
    assert clock.steps == [3600.0] and clock.pending_slew_s() == 3600.5
    clock.set_frequency(1e5)  # 0.1 s per second, so the integration shows quickly
    time.sleep(0.05)
    assert 3600.5 + 0.004 < clock.pending_slew_s() < 3600.5 + 0.05
    assert abs(clock.now_ns() - before) < 1_000_000_000


def test_arming_a_leap_second_is_refused_without_the_capability() -> None:
    assert not effective_caps() & (1 << CAP_SYS_TIME)
    clock = SystemClockControl()
    before = clock.read().status
    with pytest.raises(ClockAdjtimeError):
        clock.set_leap(1)
    assert clock.read().status == before
    measured = MeasureOnlyClock()
    measured.set_leap(2)
    assert measured.leap == 2
