"""The sample checks (RFC 5905 s8 and chrony's packet tests) and how the engine counts them.

Every exchange here is four timestamps as the daemon would see them; each bad
one must be refused with its own reason, each merely rounded one accepted, and a
refused one must never reach the statistics the clock is steered by.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from ntspy.sync.engine import Exchange, SyncEngine
from ntspy.sync.sanity import (
    SERVER_TIME_MIN_NS,
    SERVER_TIME_SPAN_NS,
    SampleLimits,
    SampleReject,
    check_exchange,
)
from ntspy.sync.select import SelectConfig

NS = 1_000_000_000
T1 = 1_800_000_000 * NS
YEAR_1995_NS = 788_918_400 * NS  # 1995-01-01 00:00 UTC
US = 1_000


def exchange(
    t1: int = T1,
    to_server_ns: int = 100 * US,
    hold_ns: int = 10 * US,
    back_ns: int = 90 * US,
    **kw: float | int,
) -> Exchange:
    """A 200 us round trip to a server in step with us, 10 us of it in the server."""
    t2 = t1 + to_server_ns
    t3 = t2 + hold_ns
    return Exchange(t1=t1, t2=t2, t3=t3, t4=t3 + back_ns, **kw)  # type: ignore[arg-type]


def check(ex: Exchange, limits: SampleLimits | None = None) -> SampleReject | None:
    """check_exchange as the engine calls it."""
    return check_exchange(ex.t1, ex.t2, ex.t3, ex.t4, root_delay=ex.root_delay,
                          root_dispersion=ex.root_dispersion, dispersion=ex.dispersion,
                          precision=ex.precision, limits=limits)


def test_an_ordinary_exchange_passes() -> None:
    ex = exchange(root_delay=0.01, root_dispersion=0.02)
    assert ex.delay == pytest.approx(190e-6)
    assert check(ex) is None


# -- each reason, from a crafted exchange ---------------------------------------------


def test_negative_delay_beyond_precision() -> None:
    # The server claims to have held the request for a second of a 200 us round trip.
    ex = exchange(hold_ns=NS, back_ns=-NS + 100 * US)
    assert ex.t4 - ex.t1 == 200 * US and ex.delay < -0.99
    assert check(ex) is SampleReject.NEGATIVE_DELAY


def test_negative_delay_just_beyond_both_precisions_is_rejected() -> None:
    # precision -20 (0.95 us) + our 1 us: a round trip of -3 us cannot be rounding.
    ex = exchange(to_server_ns=5 * US, hold_ns=13 * US, back_ns=-8 * US)
    assert ex.delay == pytest.approx(-3e-6)
    assert check(ex) is SampleReject.NEGATIVE_DELAY


def test_server_transmit_before_receive() -> None:
    ex = exchange(hold_ns=-1_000 * US, back_ns=1_090 * US)
    assert ex.t3 < ex.t2 and ex.t4 > ex.t1
    assert check(ex) is SampleReject.SERVER_TIME_REVERSED


def test_local_receive_before_transmit() -> None:
    ex = replace(exchange(), t4=T1 - 1)
    assert check(ex) is SampleReject.LOCAL_TIME_REVERSED


@pytest.mark.parametrize("which", ["t1", "t2", "t3", "t4"])
def test_zero_timestamp(which: str) -> None:
    ex = exchange()
    setattr(ex, which, 0)
    assert check(ex) is SampleReject.ZERO_TIMESTAMP


@pytest.mark.parametrize("which", ["t2", "t3", "both"])
def test_server_time_in_1995(which: str) -> None:
    good = exchange()
    t2 = YEAR_1995_NS if which in ("t2", "both") else good.t2
    t3 = YEAR_1995_NS + 10 * US if which in ("t3", "both") else good.t3
    assert check(replace(good, t2=t2, t3=t3)) is SampleReject.SERVER_TIME_IMPLAUSIBLE


def test_server_time_beyond_the_span_is_implausible_but_a_year_off_is_not() -> None:
    late = SERVER_TIME_MIN_NS + SERVER_TIME_SPAN_NS + NS
    assert check(exchange(t1=late)) is SampleReject.SERVER_TIME_IMPLAUSIBLE
    # A server a year ahead of us is a falseticker for selection to find, not garbage.
    year = 365 * 86400 * NS
    off = exchange()
    off = replace(off, t2=off.t2 + year, t3=off.t3 + year)
    assert off.offset == pytest.approx(365 * 86400, abs=1e-3)
    assert check(off) is None


@pytest.mark.parametrize(("field", "value"), [
    ("root_delay", math.nan), ("root_delay", math.inf), ("root_delay", -0.001),
    ("root_dispersion", math.nan), ("root_dispersion", -math.inf),
    ("root_dispersion", -1e-9),
])
def test_non_finite_or_negative_root_values(field: str, value: float) -> None:
    ex = exchange()
    setattr(ex, field, value)
    assert check(ex) is SampleReject.NON_FINITE


@pytest.mark.parametrize("dispersion", [math.nan, math.inf, -1.0])
def test_non_finite_or_negative_own_dispersion(dispersion: float) -> None:
    ex = exchange()
    reason = check_exchange(ex.t1, ex.t2, ex.t3, ex.t4, root_delay=0.0, root_dispersion=0.0,
                            dispersion=dispersion)
    assert reason is SampleReject.NON_FINITE


@pytest.mark.parametrize(("root_delay", "root_dispersion"), [(0.0, 3.1), (6.2, 0.0),
                                                             (2.0, 2.0)])
def test_root_distance_over_maxdistance(root_delay: float, root_dispersion: float) -> None:
    ex = exchange(root_delay=root_delay, root_dispersion=root_dispersion)
    assert check(ex) is SampleReject.ROOT_DISTANCE
    # The same sample passes a more lenient maxdistance.
    assert check(ex, SampleLimits(max_distance=10.0)) is None


def test_root_distance_counts_our_own_half_round_trip() -> None:
    # 2.9 s of root dispersion alone passes; 2.9 s plus half a 0.4 s round trip does not.
    assert check(exchange(root_dispersion=2.9)) is None
    slow = exchange(root_dispersion=2.9, to_server_ns=200_000 * US, back_ns=200_000 * US)
    assert slow.delay == pytest.approx(0.4)
    assert check(slow) is SampleReject.ROOT_DISTANCE


def test_delay_over_maxdelay() -> None:
    ex = exchange(to_server_ns=1_600_000 * US, back_ns=1_600_000 * US)
    assert ex.delay == pytest.approx(3.2)
    assert check(ex, SampleLimits(max_distance=100.0)) is SampleReject.DELAY_TOO_LONG
    assert check(ex, SampleLimits(max_distance=100.0, max_delay=4.0)) is None
    short = exchange(to_server_ns=10_000 * US, back_ns=10_000 * US)
    assert check(short, SampleLimits(max_delay=0.01)) is SampleReject.DELAY_TOO_LONG


# -- what is only rounding passes ----------------------------------------------------


def test_rounding_size_negative_delay_passes() -> None:
    # A fast loopback path: 10 us round trip, the server's fuzzed bits say 11 us hold.
    ex = exchange(to_server_ns=5 * US, hold_ns=11 * US, back_ns=-6 * US)
    assert ex.t4 > ex.t1 and ex.delay == pytest.approx(-1e-6)
    assert check(ex) is None


def test_t3_a_hair_before_t2_passes() -> None:
    ex = exchange(hold_ns=-500, back_ns=100 * US)
    assert ex.t3 < ex.t2
    assert check(ex) is None


def test_tolerance_follows_the_servers_precision() -> None:
    # T3 half a millisecond before T2: rounding for a server of 2^-10 s precision
    # (about 1 ms), a broken server at 2^-20 s.
    ex = exchange(hold_ns=-500 * US, back_ns=600 * US)
    assert check(replace(ex, precision=-10)) is None
    assert check(replace(ex, precision=-20)) is SampleReject.SERVER_TIME_REVERSED


# -- the engine counts rejects and keeps them out of the statistics ---------------------


def test_engine_counts_rejects_per_source_and_keeps_them_out_of_the_stats() -> None:
    engine = SyncEngine()
    good_src = engine.add_source("good")
    bad_src = engine.add_source("bad")
    t = T1
    # The good source answers first: its sample is kept.
    decision = engine.sample("good", t, exchange(t1=t))
    assert decision.rejected is None and good_src.stats.np == 1

    bad_exchanges = [
        exchange(t1=t, hold_ns=NS, back_ns=-NS + 100 * US),  # negative delay
        exchange(t1=t, hold_ns=-1_000 * US, back_ns=1_090 * US),  # T3 < T2
        replace(exchange(t1=t), t2=YEAR_1995_NS, t3=YEAR_1995_NS),  # 1995
        exchange(t1=t, hold_ns=NS, back_ns=-NS + 100 * US),  # negative delay again
    ]
    for i, ex in enumerate(bad_exchanges, start=1):
        decision = engine.sample("bad", t + i * NS, ex)
        assert decision.rejected is not None
        assert decision.action is None and decision.selection is None
        assert bad_src.stats.np == 0
        assert bad_src.stats.last_sample is None
        # The server did answer: reach counts it, as chrony's does.
        assert bad_src.reach.value == (1 << i) - 1
        assert bad_src.polls == i
    assert bad_src.rejected == {
        str(SampleReject.NEGATIVE_DELAY): 2,
        str(SampleReject.SERVER_TIME_REVERSED): 1,
        str(SampleReject.SERVER_TIME_IMPLAUSIBLE): 1,
    }
    # The other source's counters are its own.
    assert good_src.rejected == {} and good_src.stats.np == 1

    # Selection never sees the rejected source as usable.
    selection = engine.select(t + 10 * NS)
    assert selection.synchronised and selection.selected == "good"
    assert str(selection.states["bad"]) == "?"

    # A good sample of the same source afterwards is taken as usual.
    decision = engine.sample("bad", t + 11 * NS, exchange(t1=t + 11 * NS))
    assert decision.rejected is None and bad_src.stats.np == 1
    assert sum(bad_src.rejected.values()) == 4


def test_engine_rejects_against_the_configured_maxdistance() -> None:
    engine = SyncEngine(select_config=SelectConfig(max_distance=0.01))
    src = engine.add_source("s")
    decision = engine.sample("s", T1, exchange(root_dispersion=0.02))
    assert decision.rejected is SampleReject.ROOT_DISTANCE
    assert src.stats.np == 0 and src.rejected[str(SampleReject.ROOT_DISTANCE)] == 1
    assert engine.sample("s", T1 + NS, exchange(t1=T1 + NS, root_dispersion=0.001)).rejected \
        is None


def test_a_rounding_negative_delay_is_kept_as_a_tiny_positive_one() -> None:
    engine = SyncEngine()
    src = engine.add_source("s")
    ex = exchange(to_server_ns=5 * US, hold_ns=11 * US, back_ns=-6 * US)
    assert engine.sample("s", T1, ex).rejected is None
    last = src.stats.last_sample
    assert last is not None
    assert 0 < last.delay <= 2.0 ** -20
