"""Per-source statistics: regression, runs test, clock filter, reach register."""

from __future__ import annotations

import random

import pytest

from ntspy.sync.filter import MAX_CLOCK_ERROR, PHI, ReachRegister, Sample, SourceStats, count_runs

S = 1_000_000_000
T0 = 1_700_000_000 * S


def feed(stats: SourceStats, n: int, slope_ppm: float, noise: float, seed: int,
         poll: float = 16.0, offset0: float = 0.0, t0: int = T0) -> int:
    rng = random.Random(seed)
    t = t0
    for i in range(n):
        t = t0 + round(i * poll * S)
        offset = offset0 + slope_ppm * 1e-6 * i * poll + rng.gauss(0.0, noise)
        stats.add(Sample(time=t, offset=offset, delay=0.02 + rng.random() * 1e-3))
    return t


def test_reach_register_shifts_and_prints_octal() -> None:
    reach = ReachRegister()
    assert reach.octal() == "000" and not reach.reachable
    for _ in range(8):
        reach.update(True)
    assert reach.value == 0xFF and reach.octal() == "377"
    reach.update(False)
    assert reach.octal() == "376" and reach.reachable
    for _ in range(7):
        reach.update(False)
    assert reach.value == 0 and not reach.reachable


def test_frequency_within_skew_of_truth() -> None:
    # Skew is a 95% bound, so judge it over many fixed seeds, like a coverage test.
    rng = random.Random(9)
    within = within_twice = 0
    runs = 100
    for seed in range(runs):
        slope = rng.uniform(-200.0, 200.0)
        stats = SourceStats()
        last = feed(stats, 40, slope, 1e-3, seed)
        error = abs(stats.frequency_ppm - slope)
        within += error <= stats.skew_ppm
        within_twice += error <= 2 * stats.skew_ppm
        assert stats.skew_ppm < 5.0
        assert stats.offset_at(last) == pytest.approx(slope * 1e-6 * 39 * 16.0, abs=3e-3)
    assert within >= 0.85 * runs
    assert within_twice == runs


def test_skew_shrinks_with_more_samples_and_std_dev_tracks_noise() -> None:
    few, many = SourceStats(), SourceStats()
    feed(few, 8, 10.0, 1e-3, 7)
    feed(many, 64, 10.0, 1e-3, 7)
    assert many.skew_ppm < few.skew_ppm
    assert many.std_dev == pytest.approx(1e-3, rel=0.35)
    assert many.np == 64
    assert many.span == pytest.approx(63 * 16.0)


def test_unknown_frequency_before_three_samples() -> None:
    stats = SourceStats()
    assert stats.np == 0 and stats.last_sample is None
    stats.add(Sample(time=T0, offset=0.01, delay=0.02))
    stats.add(Sample(time=T0 + 16 * S, offset=0.02, delay=0.02))
    assert stats.nr == 0 and stats.skew_ppm >= 1000.0
    assert stats.offset_at(T0 + 16 * S) in (0.01, 0.02)


def test_memory_is_bounded_by_maxsamples() -> None:
    stats = SourceStats(maxsamples=10)
    feed(stats, 500, 3.0, 1e-4, 1)
    assert stats.np <= 10
    assert len(stats.samples) == stats.np


def test_maxsamples_below_four_is_refused() -> None:
    with pytest.raises(ValueError):
        SourceStats(maxsamples=3)


def test_count_runs() -> None:
    assert count_runs([]) == 0
    assert count_runs([1.0, 2.0, 3.0]) == 1
    assert count_runs([1.0, -1.0, 1.0, -1.0]) == 4
    assert count_runs([1.0, 0.0, 1.0, -2.0, -1.0]) == 2


def test_random_residuals_keep_all_samples_and_plausible_runs() -> None:
    stats = SourceStats(maxsamples=32)
    feed(stats, 32, -5.0, 1e-3, 11)
    assert stats.np >= 24  # a good fit rarely loses anything
    assert stats.nr >= 8  # about np/2 runs for random signs


def test_offset_jump_discards_old_samples() -> None:
    stats = SourceStats(maxsamples=64, minsamples=6)
    last = feed(stats, 40, 0.0, 1e-4, 3)
    rng = random.Random(4)
    for i in range(1, 13):
        # The same path as before: only the source's offset jumped.
        stats.add(Sample(time=last + i * 16 * S, offset=0.5 + rng.gauss(0.0, 1e-4),
                         delay=0.02 + rng.random() * 1e-3))
        if i == 1:
            # The runs test saw two regimes at once and let most of the old one go.
            assert stats.np < 20
    assert stats.np <= 20
    end = last + 12 * 16 * S
    assert stats.offset_at(end) == pytest.approx(0.5, abs=0.01)
    assert abs(stats.frequency_ppm) < 50.0


def test_clock_filter_picks_lowest_delay_of_last_eight() -> None:
    stats = SourceStats()
    delays = [0.001, 0.05, 0.04, 0.03, 0.02, 0.025, 0.035, 0.045, 0.06, 0.055]
    for i, d in enumerate(delays):
        stats.add(Sample(time=T0 + i * S, offset=d, delay=d))
    best = stats.best_sample()
    assert best is not None
    # 0.001 is older than the last eight, so 0.02 wins.
    assert best.delay == 0.02


def test_lower_delay_samples_weigh_more() -> None:
    stats = SourceStats()
    for i in range(20):
        congested = i % 2 == 1
        stats.add(Sample(time=T0 + i * 16 * S, offset=0.010 if congested else 0.0,
                         delay=0.200 if congested else 0.020))
    assert abs(stats.offset_at(T0 + 19 * 16 * S)) < 0.004


def test_root_distance_grows_with_age() -> None:
    stats = SourceStats()
    assert stats.root_distance(T0) == float("inf")
    stats.add(Sample(time=T0, offset=0.0, delay=0.02, dispersion=1e-5,
                     root_delay=0.01, root_dispersion=0.002))
    d0 = stats.root_distance(T0)
    assert d0 == pytest.approx(0.005 + 0.002 + 0.01 + 1e-5)
    # Without a frequency estimate the error grows at PHI plus our own clock's error.
    assert stats.root_distance(T0 + 1000 * S) == pytest.approx(
        d0 + (PHI + MAX_CLOCK_ERROR) * 1000)


def test_root_distance_grows_with_the_frequency_estimate_skew() -> None:
    stats = SourceStats()
    last = feed(stats, 20, 20.0, 1e-6, 2)
    assert stats.skew_ppm < 1.0
    d0 = stats.root_distance(last)
    grown = stats.root_distance(last + 64 * S) - d0
    assert grown == pytest.approx((stats.skew_ppm * 1e-6 + MAX_CLOCK_ERROR) * 64)
    assert grown < PHI * 64 / 5


def test_apply_correction_reexpresses_history() -> None:
    stats = SourceStats()
    last = feed(stats, 20, 20.0, 1e-5, 2, offset0=0.3)
    before = stats.offset_at(last)
    stats.apply_correction(last, before, dfreq_ppm=20.0)
    assert stats.offset_at(last) == pytest.approx(0.0, abs=1e-4)
    assert stats.frequency_ppm == pytest.approx(0.0, abs=0.5)


def test_samples_must_come_in_time_order() -> None:
    stats = SourceStats()
    stats.add(Sample(time=T0, offset=0.0, delay=0.01))
    with pytest.raises(ValueError):
        stats.add(Sample(time=T0 - 1, offset=0.0, delay=0.01))


def test_frequency_ramp_is_tracked_at_the_newest_sample() -> None:
    # A frequency changing by 2e-9 s/s^2 (temperature) under noise of 20 us,
    # polled every 64 s: windows keep being cut for the bend, so the regression
    # models it, and the frequency it reports is the one at the newest sample.
    # A line through the window kept would lag by half the window (~0.39 ppm).
    rate, poll, noise = 2e-9, 64.0, 2e-5
    freq_errors, phase_errors = [], []
    for seed in range(10):
        rng = random.Random(seed)
        stats = SourceStats()
        for i in range(150):
            t = i * poll
            stats.add(Sample(time=T0 + round(t * S), offset=0.5 * rate * t * t
                             + rng.gauss(0.0, noise), delay=0.02 + rng.random() * 1e-4))
            if i >= 60:
                freq_errors.append(stats.frequency_ppm - rate * t * 1e6)
                phase_errors.append(stats.offset_at(T0 + round(t * S)) - 0.5 * rate * t * t)
    rms_freq = (sum(e * e for e in freq_errors) / len(freq_errors)) ** 0.5
    rms_phase = (sum(e * e for e in phase_errors) / len(phase_errors)) ** 0.5
    assert rms_freq < 0.36
    assert rms_phase < 2.5e-5


def test_a_straight_line_is_never_bent() -> None:
    # Noise alone (a constant frequency) leaves the extrapolation a straight line.
    stats = SourceStats()
    last = feed(stats, 200, 5.0, 1e-4, 3, poll=64.0)
    ahead = last + 600 * S
    expected = stats.offset_at(last) + stats.frequency_ppm * 1e-6 * 600
    assert stats.offset_at(ahead) == pytest.approx(expected, abs=1e-12)


def _asymmetric_path(stats: SourceStats, n: int, seed: int, queue_s: float = 1e-3,
                     other_s: float = 1e-4) -> list[float]:
    """Feed ``n`` samples of a clock that is exactly right (offset 0) over a
    path whose server->client leg queues (Exp(queue_s)) far more than the
    other one (Exp(other_s)); return the offsets as measured."""
    rng = random.Random(seed)
    measured = []
    for i in range(n):
        up, down = rng.expovariate(1 / other_s), rng.expovariate(1 / queue_s)
        offset = (up - down) / 2  # NTP's theta: the late answer makes us look ahead
        measured.append(offset)
        stats.add(Sample(time=T0 + i * 64 * S, offset=offset, delay=2e-4 + up + down))
    return measured


@pytest.mark.parametrize("seed", range(6))
def test_asymmetric_queueing_is_found_within_twenty_samples(seed: int) -> None:
    # A path that queues on one leg biases every offset by half that leg's
    # queueing: the estimate must learn it from the first windows (not after
    # an hour of polls) and then say where the clock is.
    stats = SourceStats()
    measured = _asymmetric_path(stats, 20, seed)
    assert stats.asymmetry < -0.3
    now = T0 + 19 * 64 * S
    assert abs(stats.offset_at(now)) < 1.2e-4
    # what a plain mean of the offsets would have said: hundreds of microseconds off
    assert sum(measured) / len(measured) < -2.5e-4


@pytest.mark.parametrize("seed", range(12))
def test_asymmetric_path_frequency_is_within_its_skew(seed: int) -> None:
    # The offsets scatter by ~0.5 ms, yet the frequency the clock is steered
    # by stays within a few hundredths of a ppm of the truth (0), and within
    # the 95% bound it reports (which decides whether it may steer at all).
    stats = SourceStats()
    _asymmetric_path(stats, 64, seed)
    assert abs(stats.frequency_ppm) < 0.06
    assert abs(stats.frequency_ppm) <= stats.skew_ppm


@pytest.mark.parametrize("seed", range(6))
def test_symmetric_path_is_never_corrected_for_asymmetry(seed: int) -> None:
    stats = SourceStats()
    rng = random.Random(seed)
    for i in range(300):
        up, down = rng.expovariate(1e4), rng.expovariate(1e4)
        stats.add(Sample(time=T0 + i * 64 * S, offset=(up - down) / 2, delay=2e-4 + up + down))
        assert stats.asymmetry == 0.0, i
