"""End-to-end sync in virtual time: filter + selection + discipline on a simulated clock."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

from ntspy.clock import Clock
from ntspy.sync.select import AuthSelectMode, SelectConfig, SourceState
from ntspy.sync.sim import SimClock, SimServer, simulate

JITTER = 0.001
NOISE = JITTER / math.sqrt(2)  # offset noise of exponential one-way jitter


def three(**third: Any) -> list[SimServer]:
    return [SimServer("a", one_way_delay_s=0.010, jitter_s=JITTER),
            SimServer("b", one_way_delay_s=0.013, jitter_s=JITTER),
            SimServer("c", one_way_delay_s=0.016, jitter_s=JITTER, **third)]


def test_sim_clock_is_a_clock() -> None:
    assert isinstance(SimClock(random.Random(0)), Clock)


def test_converges_by_slewing_and_tracks_within_network_noise() -> None:
    trace = simulate(three(), 3 * 3600, poll=16, seed=3, initial_offset_s=0.5,
                     frequency_error_ppm=50.0, makestep=(1.0, 3))
    assert all(r.action is None or r.action.step_s is None for r in trace.rows)
    settled = trace.first_below(1e-3)
    assert settled is not None and settled < 600
    rms = trace.rms_error_after(3600)
    assert rms < 2 * NOISE
    # The discipline learned the clock's frequency error.
    assert abs(trace.tracking.frequency_ppm + 50.0) < 0.5
    # Similar sources: hysteresis keeps the selection from flapping.
    selected = [r.selected for r in trace.rows]
    assert sum(x != y for x, y in itertools.pairwise(selected)) <= 3
    assert trace.tracking.stratum == 3


def test_makestep_steps_on_first_update() -> None:
    trace = simulate(three(), 600, poll=16, seed=3, initial_offset_s=0.5,
                     frequency_error_ppm=50.0, makestep=(0.1, 3))
    first = trace.rows[0].action
    assert first is not None and first.step_s is not None
    assert abs(first.step_s + 0.5) < 0.01
    assert abs(trace.rows[0].clock_error_s) < 0.01
    assert all(r.action is None or r.action.step_s is None for r in trace.rows[1:])


def test_same_seed_same_trace() -> None:
    one = simulate(three(), 1200, seed=7, initial_offset_s=0.1)
    two = simulate(three(), 1200, seed=7, initial_offset_s=0.1)
    assert [r.clock_error_s for r in one.rows] == [r.clock_error_s for r in two.rows]


def test_source_one_hour_off_is_never_selected() -> None:
    trace = simulate(three(error_s=3600.0), 3600, seed=5, initial_offset_s=0.2,
                     frequency_error_ppm=-20.0)
    for row in trace.rows:
        assert row.states["c"] == SourceState.FALSETICKER
        assert row.selected != "c"
        assert sorted(str(row.states[n]) for n in ("a", "b")) == ["*", "+"]
    assert max(abs(e) for e in trace.errors_after(600)) < 1e-3


def test_source_that_starts_lying_is_dropped_and_not_followed() -> None:
    liar = SimServer("liar", one_way_delay_s=0.005, jitter_s=JITTER, lie_after_s=1800,
                     lie_offset_s=0.5)
    trace = simulate([*three()[:2], liar], 2 * 3600, seed=5, initial_offset_s=0.2,
                     frequency_error_ppm=-20.0)
    before = [r for r in trace.rows if 900 < r.elapsed_s < 1800]
    assert any(r.selected == "liar" for r in before)  # lowest delay: the best, while honest
    after = [r for r in trace.rows if r.elapsed_s >= 1800 + 5 * 16]
    assert all(r.states["liar"] == SourceState.FALSETICKER for r in after)
    assert all(r.selected != "liar" for r in after)
    assert max(abs(e) for e in trace.errors_after(900)) < 1e-3


def test_minsources_two_with_one_reachable_source_never_synchronises() -> None:
    servers = three()
    servers[1].reachable = servers[2].reachable = False
    trace = simulate(servers, 1800, seed=2, initial_offset_s=0.2,
                     select_config=SelectConfig(minsources=2))
    assert not any(r.synchronised for r in trace.rows)
    assert all(r.action is None for r in trace.rows)
    assert abs(trace.rows[-1].clock_error_s - 0.2) < 1e-3


def test_authselectmode_require_ignores_better_unauthenticated_sources() -> None:
    servers = three()
    servers[2].authenticated = True  # the slowest path is the only NTS one
    trace = simulate(servers, 1800, seed=4, initial_offset_s=0.05,
                     select_config=SelectConfig(authselectmode=AuthSelectMode.REQUIRE))
    for row in trace.rows:
        assert row.states == {"a": SourceState.UNUSABLE, "b": SourceState.UNUSABLE,
                              "c": SourceState.SELECTED}
    assert abs(trace.rows[-1].clock_error_s) < 1e-3


def test_authselectmode_mix_resists_lying_unauthenticated_majority() -> None:
    servers = [SimServer("nts", one_way_delay_s=0.02, jitter_s=JITTER, authenticated=True),
               SimServer("p1", one_way_delay_s=0.01, jitter_s=JITTER, error_s=0.3),
               SimServer("p2", one_way_delay_s=0.01, jitter_s=JITTER, error_s=0.301)]
    mix = simulate(servers, 1800, seed=6)
    assert all(r.selected == "nts" for r in mix.rows)
    assert abs(mix.rows[-1].clock_error_s) < 1e-3
    ignore = simulate(servers, 1800, seed=6,
                      select_config=SelectConfig(authselectmode=AuthSelectMode.IGNORE))
    assert ignore.rows[-1].states["nts"] == SourceState.FALSETICKER
    assert abs(ignore.rows[-1].clock_error_s - 0.3) < 0.01  # followed the majority


def test_after_the_first_correction_no_update_slews_faster_than_500_ppm() -> None:
    # The first update removes the start-up offset as fast as the clock
    # allows; after that every correction is a few hundred microseconds of
    # drift, and slewing it at more than 500 ppm would make the clock useless
    # for measuring intervals (as it is for chronyd's "synchronised" figure).
    # Three samples can happen to line up; their fit's error must not be
    # taken as that small.
    from ntspy.sync.discipline import slew_duration

    worst = 0.0
    for seed in range(1, 21):
        trace = simulate([SimServer("a", one_way_delay_s=1e-4, jitter_s=1e-4)], 600, poll=16,
                         seed=seed, initial_offset_s=0.1, frequency_error_ppm=10.0)
        actions = [r.action for r in trace.rows if r.action is not None]
        assert len(actions) > 10
        for action in actions[1:]:
            if not action.slew_offset_s:
                continue
            duration = slew_duration(action.correction_rate, action.slew_offset_s)
            rate = abs(action.slew_offset_s) / duration if duration else math.inf
            worst = max(worst, rate)
    assert worst < 500e-6, f"{worst * 1e6:.0f} ppm"
