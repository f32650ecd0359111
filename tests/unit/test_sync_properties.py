"""Property tests: the sync math takes any numbers and never raises or emits a non-finite.

A server can send anything, statistics can degenerate, and a bug upstream can
hand selection a NaN: none of that may crash the daemon's poll loop or put an
infinity into the kernel. Selection must return a :class:`Selection` whatever
it is given; the discipline's actions must be finite; the engine must take any
timestamps (0, negative, decades off, time going backwards) without raising and
without storing a non-finite offset.
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ntspy.proto.ntp import Leap
from ntspy.sync.discipline import ClockAction, Discipline
from ntspy.sync.engine import Exchange, SyncEngine
from ntspy.sync.filter import SourceStats
from ntspy.sync.select import (
    AuthSelectMode,
    Candidate,
    SelectConfig,
    Selection,
    SourceState,
    _intersection,
    select_sources,
)

PROPS = settings(max_examples=400, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

any_float = st.floats(allow_nan=True, allow_infinity=True)
NS = 1_000_000_000
NOW = 1_800_000_000 * NS
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@st.composite
def candidates(draw: st.DrawFn) -> list[Candidate]:
    n = draw(st.integers(min_value=0, max_value=6))
    out = []
    for i in range(n):
        out.append(Candidate(
            name=f"s{i}",
            # Mostly floats anywhere; some in the range real sources live in, so
            # that rounds also get past the intersection and into combining.
            offset=draw(any_float | st.floats(-0.1, 0.1)),
            distance=draw(any_float | st.floats(-0.1, 0.5)),
            stratum=draw(st.integers(0, 255)),
            reachable=draw(st.booleans()),
            has_samples=draw(st.booleans()),
            authenticated=draw(st.booleans()),
            prefer=draw(st.booleans()),
            noselect=draw(st.booleans()),
            trust=draw(st.booleans()),
            require=draw(st.booleans()),
            jitter=draw(any_float | st.floats(0.0, 0.01)),
            frequency_ppm=draw(any_float | st.floats(-100.0, 100.0)),
            skew_ppm=draw(any_float | st.floats(0.0, 2000.0)),
            root_delay=draw(any_float),
            root_dispersion=draw(any_float),
            leap=draw(st.sampled_from(Leap)),
            offset_sd=draw(any_float | st.floats(0.0, 0.01)),
        ))
    return out


select_configs = st.builds(
    SelectConfig,
    minsources=st.integers(1, 4),
    authselectmode=st.sampled_from(AuthSelectMode),
    max_distance=st.floats(0.0, 16.0),
    max_jitter=st.floats(0.0, 2.0),
    combine_limit=st.floats(0.0, 10.0),
    reselect_dist=st.floats(0.0, 1e-3),
    stratum_weight=st.floats(0.0, 1e-2),
)


# -- selection ---------------------------------------------------------------------------


@PROPS
@given(cands=candidates(), config=select_configs, current=st.none() | st.sampled_from(
    ["s0", "s1", "s2", "gone"]))
def test_select_sources_takes_any_numbers(cands: list[Candidate], config: SelectConfig,
                                          current: str | None) -> None:
    result = select_sources(cands, config, current)
    assert isinstance(result, Selection)
    names = {c.name for c in cands}
    assert set(result.states) == names
    assert all(isinstance(state, SourceState) for state in result.states.values())
    if result.synchronised:
        assert result.selected in names
        assert result.states[result.selected] is SourceState.SELECTED
        assert list(result.states.values()).count(SourceState.SELECTED) == 1
        assert result.combined and result.combined[0] == result.selected
        for value in (result.offset, result.error, result.frequency_ppm, result.offset_sd,
                      result.skew_ppm):
            assert math.isfinite(value), result
        assert result.error <= config.max_distance * (1 + 1e-9)
    else:
        assert result.selected is None and result.reason
        assert SourceState.SELECTED not in result.states.values()


proper_intervals = st.lists(
    st.tuples(st.floats(-1e6, 1e6), st.floats(0.0, 1e3), st.booleans()).map(
        lambda t: (t[0], t[0] + t[1], t[2])), max_size=12)


@PROPS
@given(intervals=proper_intervals)
def test_intersection_finds_the_most_covered_region(
        intervals: list[tuple[float, float, bool]]) -> None:
    untrusted = [(lo, hi, False) for lo, hi, _ in intervals]
    low, high, depth, trusted_depth = _intersection(untrusted)
    assert trusted_depth == 0
    if not intervals:
        assert depth == 0
        return
    assert low <= high
    # Marzullo: `depth` intervals hold the whole region, and no point is in more.
    assert sum(lo <= low and high <= hi for lo, hi, _ in untrusted) >= depth
    points = [p for lo, hi, _ in untrusted for p in (lo, hi)]
    assert max(sum(lo <= p <= hi for lo, hi, _ in untrusted) for p in points) == depth


@PROPS
@given(intervals=st.lists(st.tuples(st.floats(allow_nan=False), st.floats(allow_nan=False),
                                    st.booleans()), max_size=12))
def test_intersection_takes_inverted_and_infinite_intervals(
        intervals: list[tuple[float, float, bool]]) -> None:
    # select_sources never builds such intervals (an unsound candidate is
    # unusable); the sweep must still end, and no count exceed the intervals.
    low, high, depth, trusted_depth = _intersection(intervals)
    assert isinstance(low, float) and isinstance(high, float)
    assert depth <= len(intervals)
    assert trusted_depth <= sum(trusted for _, _, trusted in intervals)


# -- discipline ------------------------------------------------------------------------


selections = st.builds(
    Selection,
    states=st.just({}),
    synchronised=st.booleans(),
    reason=st.just(""),
    selected=st.none() | st.just("s0"),
    offset=any_float | st.floats(-1.0, 1.0),
    error=any_float,
    offset_sd=any_float | st.floats(0.0, 0.01),
    frequency_ppm=any_float | st.floats(-500.0, 500.0),
    skew_ppm=any_float | st.floats(0.0, 2000.0),
    stratum=st.integers(0, 255),
    root_delay=any_float,
    root_dispersion=any_float,
    leap=st.sampled_from(Leap),
)


def assert_finite_action(action: ClockAction) -> None:
    assert action.step_s is None or math.isfinite(action.step_s), action
    assert math.isfinite(action.slew_offset_s), action
    assert math.isfinite(action.frequency_ppm), action
    assert math.isfinite(action.correction_rate) and action.correction_rate >= 0, action
    assert math.isfinite(action.frequency_change_ppm), action
    assert math.isfinite(action.offset_correction_s), action


@PROPS
@given(
    updates=st.lists(st.tuples(INT64, selections), min_size=1, max_size=8),
    makestep=st.none() | st.tuples(st.floats(0.0, 10.0), st.integers(-1, 3)),
    drift=st.floats(-500.0, 500.0),
)
def test_discipline_actions_are_always_finite(
        updates: list[tuple[int, Selection]], makestep: tuple[float, int] | None,
        drift: float) -> None:
    discipline = Discipline(makestep=makestep, frequency_ppm=drift)
    for now_ns, selection in updates:
        action = discipline.update(now_ns, selection)
        if not selection.synchronised or not math.isfinite(selection.offset):
            assert action is None
            continue
        assert action is not None
        assert_finite_action(action)
        assert abs(action.frequency_ppm) <= discipline.max_drift_ppm
    tracking = discipline.tracking()
    assert math.isfinite(tracking.frequency_ppm)


# -- the engine --------------------------------------------------------------------------


any_ns = st.integers(min_value=-(2**64), max_value=2**64)
"""Any timestamp an adapter could hand in, well past int64 either way."""


@st.composite
def exchanges(draw: st.DrawFn) -> Exchange:
    return Exchange(
        t1=draw(any_ns | st.just(0) | st.integers(NOW - NS, NOW + NS)),
        t2=draw(any_ns | st.just(0) | st.integers(NOW - NS, NOW + NS)),
        t3=draw(any_ns | st.just(0) | st.integers(NOW - NS, NOW + NS)),
        t4=draw(any_ns | st.just(0) | st.integers(NOW - NS, NOW + NS)),
        root_delay=draw(any_float),
        root_dispersion=draw(any_float),
        precision=draw(st.integers(-128, 127)),
        stratum=draw(st.integers(0, 255)),
        leap=draw(st.sampled_from(Leap)),
        authenticated=draw(st.booleans()),
    )


def assert_stats_finite(stats: SourceStats, now_ns: int) -> None:
    for sample in stats.samples:
        assert math.isfinite(sample.offset), sample
        assert math.isfinite(sample.delay) and sample.delay > 0, sample
        assert math.isfinite(sample.dispersion), sample
    if stats.np:
        assert math.isfinite(stats.offset_at(now_ns))
        assert math.isfinite(stats.frequency_ppm)
        assert math.isfinite(stats.jitter)
        assert not math.isnan(stats.root_distance(now_ns))


@PROPS
@given(
    polls=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), exchanges(), INT64,
                             st.floats(-10.0, 10.0)), max_size=20),
)
def test_engine_takes_any_timestamps(polls: list[tuple[str, Exchange, int, float]]) -> None:
    engine = SyncEngine()
    for key in ("a", "b", "c"):
        engine.add_source(key, maxsamples=8)
    for key, ex, now_ns, pending in polls:
        decision = engine.sample(key, now_ns, ex, pending)
        if decision.action is not None:
            assert_finite_action(decision.action)
            engine.applied(now_ns, decision)
        for src in engine.sources.values():
            assert_stats_finite(src.stats, now_ns)
            assert src.stats.np <= 8


@st.composite
def plausible_polls(draw: st.DrawFn) -> list[tuple[str, Exchange, int]]:
    """Exchanges a real (possibly broken) server and clock could produce: times that
    jump back and forth by up to a day, offsets up to a year, delays up to seconds."""
    out = []
    local = NOW
    for _ in range(draw(st.integers(1, 40))):
        local += draw(st.integers(-86400 * NS, 86400 * NS) | st.integers(0, 64 * NS))
        offset = draw(st.integers(-365 * 86400 * NS, 365 * 86400 * NS)
                      | st.integers(-NS, NS))
        rtt = draw(st.integers(-NS, 4 * NS) | st.integers(0, 10**6))
        hold = draw(st.integers(-10**6, 10**7))
        t1 = local
        t2 = t1 + rtt // 2 + offset
        t3 = t2 + hold
        t4 = t1 + rtt + hold
        ex = Exchange(t1=t1, t2=t2, t3=t3, t4=t4,
                      root_delay=draw(st.floats(0.0, 0.1)),
                      root_dispersion=draw(st.floats(0.0, 0.1)),
                      precision=draw(st.integers(-30, 0)))
        out.append((draw(st.sampled_from(["a", "b", "c"])), ex, t4))
    return out


@PROPS
@given(polls=plausible_polls(), makestep=st.booleans())
def test_engine_statistics_survive_time_going_backwards(
        polls: list[tuple[str, Exchange, int]], makestep: bool) -> None:
    engine = SyncEngine(Discipline(makestep=(1.0, -1) if makestep else None))
    for key in ("a", "b", "c"):
        engine.add_source(key, maxsamples=16)
    for key, ex, now_ns in polls:
        decision = engine.sample(key, now_ns, ex)
        src = engine.sources[key]
        if decision.rejected is None:
            last = src.stats.last_sample
            assert last is not None and last.time == ex.t4
            assert math.isclose(last.offset, ex.offset, abs_tol=1e-9)
        if decision.action is not None:
            assert_finite_action(decision.action)
            engine.applied(now_ns, decision)
        for s in engine.sources.values():
            assert_stats_finite(s.stats, now_ns)
            times = [sample.time for sample in s.stats.samples]
            assert times == sorted(times)
        engine.select(now_ns)
    assert math.isfinite(engine.tracking().frequency_ppm)


# -- corners hypothesis may not reach, each on its own -------------------------------------


def test_selection_of_a_huge_but_finite_offset_stays_finite() -> None:
    # 1/distance weighting: 1e300 s times the weight of a 0.1 ns distance (1e9)
    # overflows to inf unless the weights are normalised before multiplying.
    lone = Candidate("s0", offset=1e300, distance=1e-10, frequency_ppm=1e300, skew_ppm=1e-9)
    result = select_sources([lone])
    assert result.synchronised and result.selected == "s0"
    assert math.isfinite(result.offset) and math.isfinite(result.frequency_ppm), result


@given(offset_sd=st.sampled_from([math.nan, math.inf]),
       second_after_s=st.sampled_from([0.0, 16.0]))
def test_discipline_correction_rate_is_finite_whatever_the_offset_error(
        offset_sd: float, second_after_s: float) -> None:
    # correction_rate = ratio * interval * max(offset_sd, floor): max() keeps a
    # NaN, and 0 s * inf (a first update, or two at one instant) is NaN too.
    # A NaN rate reaches the clock as a NaN slew duration.
    discipline = Discipline()
    first = discipline.update(NOW, Selection({}, True, offset=0.001))
    assert first is not None and math.isfinite(first.correction_rate)
    action = discipline.update(NOW + round(second_after_s * NS),
                               Selection({}, True, offset=0.001, offset_sd=offset_sd))
    assert action is not None
    assert_finite_action(action)


def test_discipline_takes_a_skew_whose_square_underflows() -> None:
    # gain = old^2 / (old^2 + new^2): both squares are 0.0 for a denormal skew.
    discipline = Discipline()
    for i in range(2):
        action = discipline.update(NOW + i * 16 * NS,
                                   Selection({}, True, offset=0.001, skew_ppm=5e-324))
        assert action is not None
        assert_finite_action(action)
    assert math.isfinite(discipline.skew_ppm) and discipline.skew_ppm >= 0
