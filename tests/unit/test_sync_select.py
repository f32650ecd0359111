"""Source selection: falsetickers, majority, authselectmode, combining, hysteresis."""

from __future__ import annotations

from typing import Any

import pytest

from ntspy.sync.filter import Sample, SourceStats
from ntspy.sync.select import (
    AuthSelectMode,
    Candidate,
    SelectConfig,
    Selection,
    SourceState,
    candidate_from_stats,
    select_sources,
)

STAR, PLUS, MINUS = SourceState.SELECTED, SourceState.COMBINED, SourceState.NOT_COMBINED
X, TILDE, QM = SourceState.FALSETICKER, SourceState.JITTERY, SourceState.UNUSABLE


def cand(name: str, offset: float = 0.0, distance: float = 0.01, **kw: Any) -> Candidate:
    return Candidate(name, offset, distance, **kw)


def letters(result: Selection) -> str:
    return "".join(str(s) for s in result.states.values())


def test_one_hour_off_is_a_falseticker() -> None:
    result = select_sources([cand("a", 0.001, 0.01), cand("b", -0.002, 0.02),
                             cand("bad", 3600.0, 0.005)])
    assert result.synchronised
    assert result.states == {"a": STAR, "b": PLUS, "bad": X}
    assert result.selected == "a"
    assert abs(result.offset) < 0.002


def test_combined_offset_weighted_by_inverse_distance() -> None:
    result = select_sources([cand("a", 0.010, 0.01), cand("b", 0.004, 0.02)])
    assert result.combined == ["a", "b"]
    assert result.offset == pytest.approx((0.010 / 0.01 + 0.004 / 0.02) / (1 / 0.01 + 1 / 0.02))


def test_no_majority_means_no_synchronisation() -> None:
    # Two disjoint pairs: two of four is not more than half.
    result = select_sources([cand("a", 0.0), cand("b", 0.001), cand("c", 1.0), cand("d", 1.001)])
    assert not result.synchronised
    assert result.selected is None
    assert set(result.states.values()) == {X}


def test_two_disagreeing_sources_cannot_be_told_apart() -> None:
    result = select_sources([cand("a", 0.0), cand("b", 5.0)])
    assert not result.synchronised


def test_minsources_with_one_reachable_source() -> None:
    cands = [cand("a", 0.0), cand("b", 0.0, reachable=False)]
    result = select_sources(cands, SelectConfig(minsources=2))
    assert not result.synchronised
    assert result.states == {"a": QM, "b": QM}
    assert select_sources(cands).synchronised  # minsources 1 (default)


def test_unusable_and_jittery_sources() -> None:
    cfg = SelectConfig(max_distance=1.0, max_jitter=0.1)
    result = select_sources([
        cand("ok", 0.0),
        cand("far", 0.0, 2.0),
        cand("shaky", 0.0, jitter=0.5),
        cand("never", has_samples=False),
        cand("off", 0.0, noselect=True),
    ], cfg)
    assert result.states == {"ok": STAR, "far": QM, "shaky": TILDE, "never": QM, "off": QM}


def test_prefer_wins_over_shorter_distance_and_limits_combining() -> None:
    result = select_sources([cand("a", 0.0, 0.005), cand("p", 0.0, 0.010, prefer=True),
                             cand("c", 0.0, 0.006)])
    assert result.selected == "p"
    assert result.states == {"a": MINUS, "p": STAR, "c": MINUS}


def test_combine_limit() -> None:
    cands = [cand("a", 0.0, 0.01), cand("b", 0.0, 0.02), cand("far", 0.0, 0.05)]
    assert letters(select_sources(cands)) == "*+-"
    assert letters(select_sources(cands, SelectConfig(combine_limit=0))) == "*--"


def test_sources_with_different_frequencies_are_not_combined() -> None:
    cands = [cand("a", 0.0, 0.01, frequency_ppm=0.0, skew_ppm=0.1),
             cand("b", 0.0, 0.01, frequency_ppm=30.0, skew_ppm=0.1)]
    assert sorted(str(s) for s in select_sources(cands).states.values()) == ["*", "-"]


def test_current_source_is_kept_within_reselect_distance() -> None:
    cands = [cand("a", 0.0, 0.01000), cand("b", 0.0, 0.01005)]
    assert select_sources(cands).selected == "a"
    assert select_sources(cands, current="b").selected == "b"
    # Much better is better, whatever is current.
    cands[0].distance = 0.005
    assert select_sources(cands, current="b").selected == "a"


# --- authselectmode (chrony.conf(5)) ------------------------------------------

def mixed(unauth_offset: float = 0.0) -> list[Candidate]:
    return [cand("nts1", 0.0, 0.02, authenticated=True),
            cand("plain1", unauth_offset, 0.01),
            cand("plain2", unauth_offset + 0.001, 0.01)]


def test_authselectmode_require_never_selects_unauthenticated() -> None:
    cfg = SelectConfig(authselectmode=AuthSelectMode.REQUIRE)
    result = select_sources(mixed(), cfg)
    assert result.states == {"nts1": STAR, "plain1": QM, "plain2": QM}
    only_plain = select_sources(mixed()[1:], cfg)
    assert not only_plain.synchronised


def test_authselectmode_prefer_drops_unauthenticated_only_if_authenticated_exist() -> None:
    cfg = SelectConfig(authselectmode=AuthSelectMode.PREFER)
    assert select_sources(mixed(), cfg).states == {"nts1": STAR, "plain1": QM, "plain2": QM}
    only_plain = select_sources(mixed()[1:], cfg)
    assert only_plain.synchronised and only_plain.selected == "plain1"


def test_authselectmode_mix_combines_agreeing_sources() -> None:
    result = select_sources(mixed(), SelectConfig(authselectmode=AuthSelectMode.MIX))
    assert result.synchronised
    assert result.selected == "plain1"  # shortest distance, agreeing with the NTS source
    assert result.states == {"nts1": PLUS, "plain1": STAR, "plain2": PLUS}


def test_authselectmode_mix_trusts_authenticated_over_unauthenticated_majority() -> None:
    cands = mixed(unauth_offset=0.5)  # two unauthenticated sources agree on a lie
    mix = select_sources(cands, SelectConfig(authselectmode=AuthSelectMode.MIX))
    assert mix.states == {"nts1": STAR, "plain1": X, "plain2": X}
    assert mix.offset == pytest.approx(0.0)
    ignore = select_sources(cands, SelectConfig(authselectmode=AuthSelectMode.IGNORE))
    assert ignore.states["nts1"] == X
    assert ignore.offset == pytest.approx(0.5, abs=0.002)


def test_authselectmode_mix_needs_an_authenticated_source() -> None:
    cands = mixed()
    cands[0].reachable = False
    mix = select_sources(cands, SelectConfig(authselectmode=AuthSelectMode.MIX))
    assert not mix.synchronised  # the authenticated source is required
    ignore = select_sources(cands, SelectConfig(authselectmode=AuthSelectMode.IGNORE))
    assert ignore.synchronised and ignore.selected == "plain1"


def test_noselect_sources_do_not_count_for_authselectmode() -> None:
    cands = [cand("nts-off", 0.0, authenticated=True, noselect=True), cand("plain", 0.0)]
    result = select_sources(cands, SelectConfig(authselectmode=AuthSelectMode.PREFER))
    assert result.selected == "plain"


def test_candidate_from_stats() -> None:
    stats = SourceStats()
    empty = candidate_from_stats("s", stats, 0)
    assert not empty.has_samples
    assert select_sources([empty]).states == {"s": QM}
    t0 = 1_700_000_000 * 10**9
    for i in range(5):
        stats.add(Sample(time=t0 + i * 16 * 10**9, offset=0.003, delay=0.02, stratum=2,
                         root_delay=0.01, authenticated=True))
    c = candidate_from_stats("s", stats, t0 + 64 * 10**9, prefer=True)
    assert c.offset == pytest.approx(0.003)
    assert c.authenticated and c.prefer and c.stratum == 2
    assert c.root_delay == pytest.approx(0.03)
    result = select_sources([c])
    assert result.selected == "s" and result.stratum == 2
