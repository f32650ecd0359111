"""Clock discipline: makestep, slewing, frequency, tracking, drift file."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntspy.errors import StateFileError
from ntspy.proto.ntp import Leap
from ntspy.sync.discipline import (
    ClockAction,
    Discipline,
    apply_action,
    format_drift,
    parse_drift,
    slew_duration,
)
from ntspy.sync.select import Selection, SourceState
from ntspy.sync.sim import SimClock

S = 1_000_000_000
T0 = 1_700_000_000 * S


def synced(offset: float, freq: float = 0.0, skew: float = 1000.0) -> Selection:
    return Selection({"a": SourceState.SELECTED}, True, selected="a", offset=offset,
                     error=0.01, frequency_ppm=freq, skew_ppm=skew, stratum=2,
                     root_delay=0.02, root_dispersion=0.001, leap=Leap.NONE, combined=["a"])


def test_makestep_steps_only_above_threshold_within_limit() -> None:
    d = Discipline(makestep=(0.1, 3))
    first = d.update(T0, synced(0.5))
    assert first is not None and first.step_s == 0.5 and first.slew_offset_s == 0.0
    small = d.update(T0 + 16 * S, synced(0.05))
    assert small is not None and small.step_s is None and small.slew_offset_s == 0.05
    third = d.update(T0 + 32 * S, synced(-0.3))
    assert third is not None and third.step_s == -0.3
    # Three updates done: from now on large offsets are slewed.
    fourth = d.update(T0 + 48 * S, synced(0.3))
    assert fourth is not None and fourth.step_s is None and fourth.slew_offset_s == 0.3


def test_makestep_below_threshold_slews_and_unlimited_always_steps() -> None:
    no_step = Discipline(makestep=(1.0, 3)).update(T0, synced(0.5))
    assert no_step is not None and no_step.step_s is None and no_step.slew_offset_s == 0.5
    never = Discipline().update(T0, synced(100.0))
    assert never is not None and never.step_s is None
    always = Discipline(makestep=(0.1, -1))
    for i in range(10):
        action = always.update(T0 + i * S, synced(0.2))
        assert action is not None and action.step_s == 0.2


def test_not_synchronised_leaves_the_clock_alone() -> None:
    d = Discipline(makestep=(0.1, 3))
    assert d.update(T0, Selection({}, False, "no majority agrees")) is None
    assert d.updates == 0
    assert d.tracking().leap == Leap.UNSYNCHRONIZED


def test_slew_time_is_inversely_proportional_to_the_offset() -> None:
    # chrony's corrtimeratio: an offset as large as the estimate's error takes
    # ratio x update interval to slew; ten times larger, a tenth of that.
    d = Discipline(corr_time_ratio=3.0)
    d.update(T0, synced(0.001))
    selection = synced(0.001)
    selection.offset_sd = 1e-4
    action = d.update(T0 + 64 * S, selection)
    assert action is not None
    assert slew_duration(action.correction_rate, 1e-4) == pytest.approx(192.0)
    assert slew_duration(action.correction_rate, 1e-3) == pytest.approx(19.2)
    assert slew_duration(action.correction_rate, 0.0) == 0.0


def test_frequency_follows_confident_estimates_only() -> None:
    d = Discipline(frequency_ppm=10.0, skew_ppm=5.0)
    ignored = d.update(T0, synced(0.0, freq=40.0, skew=2000.0))
    assert ignored is not None and ignored.frequency_ppm == 10.0
    confident = d.update(T0 + 16 * S, synced(0.0, freq=4.0, skew=0.1))
    assert confident is not None
    assert confident.frequency_ppm == pytest.approx(14.0, abs=0.01)
    assert confident.frequency_change_ppm == pytest.approx(4.0, abs=0.01)
    assert d.skew_ppm == pytest.approx(0.1)  # the residual's own bound


def test_tracking_report() -> None:
    d = Discipline()
    d.update(T0, synced(0.002))
    d.update(T0 + 32 * S, synced(-0.001, freq=1.0, skew=0.5))
    t = d.tracking(pending_slew_s=0.0005)
    assert t.reference == "a" and t.stratum == 3 and t.ref_time_ns == T0 + 32 * S
    assert t.last_offset == -0.001 and t.system_time_offset == 0.0005
    assert 0.001 < t.rms_offset < 0.002
    assert t.update_interval == 32.0
    assert t.root_delay == 0.02 and t.root_dispersion >= 0.001
    assert t.leap == Leap.NONE
    assert t.frequency_ppm == pytest.approx(1.0, abs=0.01)


def test_apply_action_on_sim_clock() -> None:
    clock = SimClock(random.Random(1), start_ns=T0, offset_s=-0.25)
    apply_action(clock, ClockAction(step_s=0.25, slew_offset_s=0.001, frequency_ppm=-3.0))
    assert clock.now_ns() == T0
    assert clock.pending_slew_s() == 0.001
    clock.advance(10 * S)
    assert clock.pending_slew_s() == 0.0
    assert clock.now_ns() - (T0 + 10 * S) == pytest.approx(1e6 - 30_000, abs=2)


@settings(max_examples=200, deadline=None)
@given(freq=st.floats(-500000.0, 500000.0), skew=st.floats(0.0, 1e6))
def test_drift_file_round_trip(freq: float, skew: float) -> None:
    parsed_freq, parsed_skew = parse_drift(format_drift(freq, skew))
    assert parsed_freq == pytest.approx(freq, abs=1e-6)
    assert parsed_skew == pytest.approx(skew, abs=1e-6)


def test_drift_file_reads_chrony_format() -> None:
    assert parse_drift("          -12.345678             0.123456\n") == (-12.345678, 0.123456)


@pytest.mark.parametrize("text", ["", "12.5", "1 2 3", "abc 0.1", "1.0 nan", "inf 1",
                                  "1e9 0.1", "1.0 -0.5", "\x00\x01", "1,0 0,1"])
def test_drift_file_garbage_is_rejected(text: str) -> None:
    with pytest.raises(StateFileError):
        parse_drift(text)


def test_format_drift_refuses_non_finite() -> None:
    with pytest.raises(ValueError):
        format_drift(float("nan"), 0.1)


def test_maxchange_ignores_large_offsets_after_start_then_gives_up() -> None:
    from ntspy.sync.discipline import MaxChangeExceeded
    # chrony.conf(5)'s example: after the first update, ignore two adjustments
    # larger than 1000 s and give up on the next one.
    d = Discipline(maxchange=(1000.0, 1, 2))
    assert d.update(T0, synced(5000.0)) is not None  # the first update may be anything
    assert d.update(T0 + 16 * S, synced(0.5)) is not None  # within the limit
    for i in range(2):
        assert d.update(T0 + (32 + 16 * i) * S, synced(-2000.0)) is None
        assert d.refused is not None and "exceeds the allowed maximum" in d.refused
    with pytest.raises(MaxChangeExceeded, match="giving up"):
        d.update(T0 + 80 * S, synced(-2000.0))
    forever = Discipline(maxchange=(1.0, 0, -1))
    for i in range(10):
        assert forever.update(T0 + i * S, synced(10.0)) is None  # never gives up


def test_engine_turns_maxchange_exceeded_into_a_fatal_decision() -> None:
    from ntspy.sync.engine import Exchange, SyncEngine
    engine = SyncEngine(Discipline(maxchange=(0.5, 0, 0)))
    engine.add_source("a")
    t = T0
    decision = engine.sample("a", t, Exchange(t1=t - 2000, t2=t + 2 * S, t3=t + 2 * S, t4=t))
    assert decision.action is None and decision.fatal is not None
    assert "maxchange" in decision.fatal
