"""Per-source samples and their statistics (what ``chronyc sourcestats`` shows).

Conventions of this module:

* sample times are **local-clock Unix nanoseconds** (``int``), as the adapter
  read them when the exchange finished;
* offsets, delays, dispersions and the like are **float seconds**;
* frequencies and skews are **ppm**.

An offset is NTP's theta: positive when the source is *ahead* of us (our clock
is slow).  ``chronyc`` prints the opposite sign; display code negates.

Offsets are meant to be measured against the *disciplined* timescale: the
measured offset minus any slew the clock has been asked for but has not yet
finished.  Whenever the discipline corrects the clock, :meth:`SourceStats.
apply_correction` re-expresses the stored samples on the corrected timescale,
so the regression only ever sees what is still left to correct.  That is how
chrony keeps its sample history meaningful across clock updates.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass
from functools import cache

from ntspy.proto.ntp import Leap

PHI = 15e-6
"""Frequency tolerance, s/s (RFC 5905 s7.2): how fast an old sample's error grows."""

MAX_CLOCK_ERROR = 1e-6
"""chrony's ``maxclockerror``: how fast our own clock may wander, s/s."""

FILTER_LENGTH = 8
"""RFC 5905 clock filter: the best sample is the lowest-delay one of the last 8."""

DEFAULT_MAXSAMPLES = 64
MIN_MAXSAMPLES = 4
MIN_REGRESSION_SAMPLES = 3
"""A line through fewer points has no residuals left to judge the fit by."""

UNKNOWN_SKEW_PPM = 1000.0
"""Skew reported before a frequency can be estimated; equals chrony's default
``maxupdateskew``, so such an estimate is never used to steer the frequency."""

PHASE_TAPER = 1.0
"""How much less the oldest sample of the window counts for the phase estimate
than the newest (weights fall linearly from 1 to 1 / (1 + taper))."""

MAX_ASYMMETRY = 0.5
"""The largest share of the excess delay that can show in the offset (all of
the queueing on one leg of the path)."""
ASYMMETRY_AVERAGING = 0.03
"""Weight of one window's asymmetry estimate in the running one, once there
have been 1 / ASYMMETRY_AVERAGING windows (before, the running estimate is
their plain mean: a path's asymmetry is there from the first sample, and a
running estimate that starts at 0 would take an hour to find it)."""
ASYMMETRY_GATE = 6.0
"""The running estimate corrects the offsets only when it exceeds this many
standard errors of the newest window's estimate."""
MIN_RESIDUAL_SHARE = 0.05
"""Share of its excess delay a sample's offset is still taken to be wrong by
after the asymmetry correction (the weights of the frequency fit)."""
PHASE_EXCESS_SHARE = 1.5
"""Where the path is asymmetric, how hard excess delay counts against a sample
in the phase estimate (see :meth:`SourceStats._refit`)."""
MIN_ASYMMETRY_SAMPLES = 8
"""Samples needed before the asymmetry of the queueing is estimated."""

MIN_WEIGHT_SD = 1e-9
"""Floor of the spread that excess delays are judged against, seconds."""
WEIGHT_FLOOR = 0.125
"""... and its floor as a share of the window's median excess delay."""

CURVATURE_T = 2.5
"""How many standard errors a quadratic term must reach to call the window bent."""
MIN_CURVATURE_SAMPLES = 8
"""Fewer samples cannot tell a bend from noise."""
BEND_TRIMS = 6
BEND_MEMORY = 30
"""A window cut for a bend :data:`BEND_TRIMS` times within the last
:data:`BEND_MEMORY` samples says the frequency keeps changing (temperature):
the regression then models the bend (a shrunk quadratic term) instead of
only cutting the window.  Fewer cuts are left to chance."""
PERFECT_FIT_S = 1e-12
"""Residual spread below which a fit is exact (no sign runs to count)."""

RUNS_SIGNIFICANCE = 0.01
"""Probability below which too few sign runs mean "the line no longer fits"."""

_NS = 1e-9


@dataclass(slots=True)
class Sample:
    """One NTP measurement of a source."""

    time: int
    """Local clock, Unix ns, when the response was received."""
    offset: float
    """Seconds; positive when the source is ahead of us (RFC 5905 theta)."""
    delay: float
    """Round-trip delay, seconds."""
    dispersion: float = 0.0
    """Error of this sample at ``time``: precisions plus PHI times the round trip."""
    root_delay: float = 0.0
    root_dispersion: float = 0.0
    stratum: int = 1
    leap: Leap = Leap.NONE
    authenticated: bool = False


class ReachRegister:
    """The 8-bit reachability shift register (RFC 5905 s13): 1 = poll answered."""

    __slots__ = ("_value",)

    def __init__(self, value: int = 0) -> None:
        self._value = value & 0xFF

    def update(self, ok: bool) -> None:
        """Shift in the result of one poll."""
        self._value = ((self._value << 1) | int(ok)) & 0xFF

    @property
    def value(self) -> int:
        """The register as an integer, newest poll in bit 0."""
        return self._value

    @property
    def reachable(self) -> bool:
        """True if any of the last 8 polls was answered."""
        return self._value != 0

    def octal(self) -> str:
        """As ``chronyc sources`` prints it: three octal digits, ``377`` = all answered."""
        return f"{self._value:03o}"


@cache
def _max_suspicious_runs(n: int) -> int:
    """Largest run count that is implausibly small for ``n`` random-sign residuals.

    Under a good fit the residual signs are independent fair coins, so the
    number of runs minus one is Binomial(n - 1, 1/2).  A count whose lower tail
    probability is below :data:`RUNS_SIGNIFICANCE` says the residuals have
    structure: the clock or the source changed and old samples mislead.
    Returns 0 when no count is suspicious (small ``n``).
    """
    trials = n - 1
    total = 2.0**trials
    cumulative = 0.0
    worst = 0
    for changes in range(trials + 1):
        cumulative += math.comb(trials, changes) / total
        if cumulative >= RUNS_SIGNIFICANCE:
            break
        worst = changes + 1  # runs = sign changes + 1
    return worst


def count_runs(residuals: list[float]) -> int:
    """Number of runs of residuals with the same sign (zeros join the current run)."""
    runs = 0
    sign = 0
    for r in residuals:
        s = (r > 0) - (r < 0)
        if s == 0:
            continue
        if s != sign:
            runs += 1
            sign = s
    return runs


def _t_quantile(dof: int) -> float:
    """Two-sided 95% Student t quantile, tabulated for small ``dof``, asymptotic after.

    Scales the standard error of the slope into a bound worth calling a skew.
    """
    table = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23)
    if dof <= 0:
        return table[0]
    if dof <= len(table):
        return table[dof - 1]
    return 1.96 + 2.5 / dof


@dataclass(slots=True)
class _Fit:
    """A weighted line ``offset = intercept + slope * (t - ref)``, t in seconds."""

    ref_ns: int
    intercept: float
    slope: float
    slope_sd: float
    intercept_var: float
    mean_t: float
    sxx: float
    sigma: float
    runs: int
    dof: int
    curvature: float = 0.0
    """s/s^2: the bend taken out of the offsets before the line was fitted
    (0: none); the model is ``intercept + slope * x + curvature * x^2``."""


def _weights(delays: list[float], sd: float | None, share: float = 0.5) -> list[float]:
    """Lower-delay samples count more: queueing adds asymmetry, hence offset error.

    A sample's offset can be wrong by up to ``share`` (half, by default) of
    its delay in excess of the shortest one.  That excess is judged against
    ``sd``, the spread of the offsets the previous fit found (as chrony
    does): where the path's queues dominate the noise, samples that met them
    weigh little.  Before there is a fit the median excess stands in, keeping
    the weights mild.
    """
    least = min(delays)
    excess = [(d - least) * share for d in delays]
    typical = sorted(excess)[len(excess) // 2]
    if sd is None or not sd > 0:
        sd = typical
    # Never judged against much less than the typical excess: a spread that
    # small would give all weight to the one or two quickest samples, whose
    # fit then leaves no residuals, which makes the next spread smaller still.
    scale = max(sd, typical * WEIGHT_FLOOR, MIN_WEIGHT_SD)
    return [1.0 / (1.0 + e / scale) ** 2 for e in excess]


def _fit(times_ns: list[int], offsets: list[float], weights: list[float]) -> _Fit:
    ref = times_ns[-1]
    xs = [(t - ref) * _NS for t in times_ns]
    n = len(xs)
    # Normalised weights keep sigma in seconds comparable to an unweighted SD.
    mean_w = sum(weights) / n
    ws = [w / mean_w for w in weights]
    sw = float(n)
    mean_t = sum(w * x for w, x in zip(ws, xs, strict=True)) / sw
    mean_y = sum(w * y for w, y in zip(ws, offsets, strict=True)) / sw
    sxx = sum(w * (x - mean_t) ** 2 for w, x in zip(ws, xs, strict=True))
    sxy = sum(w * (x - mean_t) * (y - mean_y) for w, x, y in zip(ws, xs, offsets, strict=True))
    slope = sxy / sxx if sxx > 0 else 0.0
    intercept = mean_y - slope * mean_t
    residuals = [y - (intercept + slope * x) for x, y in zip(xs, offsets, strict=True)]
    dof = n - 2
    if dof > 0:
        ss = sum(w * r * r for w, r in zip(ws, residuals, strict=True))
        sigma = math.sqrt(ss / dof)
    else:
        sigma = 0.0
    if sxx > 0 and dof > 0:
        # Sandwich estimate: stays honest when the delay-based weights do not
        # match the real noise of each sample (they are a guess, after all).
        meat = sum((w * (x - mean_t) * r) ** 2 for w, x, r in zip(ws, xs, residuals, strict=True))
        slope_sd = math.sqrt(meat * n / dof) / sxx
    else:
        slope_sd = math.inf
    intercept_var = sigma * sigma * (1.0 / sw + (mean_t**2 / sxx if sxx > 0 else 0.0))
    return _Fit(ref, intercept, slope, slope_sd, intercept_var, mean_t, sxx, sigma,
                count_runs(residuals), dof)


def _asymmetry(times_ns: list[int], offsets: list[float], delays: list[float],
               weights: list[float]) -> tuple[float, float] | None:
    """How much of a sample's excess delay shows in its offset, and that
    estimate's standard error (None with too few samples).

    When the queues that delay a packet sit mostly on one leg of the path, a
    sample's offset error is a fixed share of its excess delay: +-half of it
    when all of the excess is on one side.  That share is estimated as the
    slope of the line's residuals against the excess delay, bounded to
    +-:data:`MAX_ASYMMETRY` by the caller, which corrects the offsets by it,
    so even samples that met a queue say where the clock is (chrony does the
    like).
    """
    n = len(offsets)
    if n < MIN_ASYMMETRY_SAMPLES:
        return None
    least = min(delays)
    excess = [d - least for d in delays]
    fit = _fit(times_ns, offsets, weights)
    xs = [(t - fit.ref_ns) * _NS for t in times_ns]
    resid = [y - (fit.intercept + fit.slope * x) for x, y in zip(xs, offsets, strict=True)]
    mean_e = sum(excess) / n
    mean_r = sum(resid) / n
    see = sum((e - mean_e) ** 2 for e in excess)
    if not see > 0:
        return None
    share = sum((e - mean_e) * (r - mean_r) for e, r in zip(excess, resid, strict=True)) / see
    spread = sum((r - mean_r - share * (e - mean_e)) ** 2
                 for e, r in zip(excess, resid, strict=True)) / max(1, n - 2)
    return share, math.sqrt(spread / see)


@dataclass(slots=True)
class _Poly:
    """A weighted least-squares polynomial over ``u = (x - centre) / span``, x in
    seconds from the newest sample: centred and scaled, the normal equations
    stay well conditioned whatever the window's length."""

    centre: float
    span: float
    coef: list[float]
    inv: list[list[float]]
    """Inverse of the normal matrix (weights normalised to a mean of 1)."""
    sigma: float
    runs: int
    dof: int

    def coef_sd(self, k: int) -> float:
        """Standard error of the coefficient of ``u**k``."""
        return self.sigma * math.sqrt(max(self.inv[k][k], 0.0))

    def significant(self, k: int, t: float) -> bool:
        """Whether the coefficient of ``u**k`` is more than ``t`` standard errors."""
        sd = self.coef_sd(k)
        return sd > 0 and abs(self.coef[k]) > t * sd


def _poly(times_ns: list[int], offsets: list[float], weights: list[float],
          degree: int) -> _Poly | None:
    """Weighted polynomial of ``degree`` through the window (None: too few
    samples for residuals to remain, or a singular system)."""
    n = len(times_ns)
    if n <= degree + 1:
        return None
    ref = times_ns[-1]
    xs = [(t - ref) * _NS for t in times_ns]
    sw = sum(weights)
    if not (sw > 0 and math.isfinite(sw)):
        return None
    ws = [w * n / sw for w in weights]
    centre = sum(w * x for w, x in zip(ws, xs, strict=True)) / n
    span = max(abs(x - centre) for x in xs) or 1.0
    us = [(x - centre) / span for x in xs]
    size = degree + 1
    m = [[0.0] * size for _ in range(size)]
    v = [0.0] * size
    for w, u, y in zip(ws, us, offsets, strict=True):
        basis = [u**k for k in range(size)]
        for i in range(size):
            v[i] += w * basis[i] * y
            for j in range(size):
                m[i][j] += w * basis[i] * basis[j]
    inv = _inverse(m)
    if inv is None:
        return None
    coef = [sum(inv[i][j] * v[j] for j in range(size)) for i in range(size)]
    residuals = [y - sum(c * u**k for k, c in enumerate(coef)) for u, y in zip(us, offsets,
                                                                                 strict=True)]
    dof = n - size
    ss = sum(w * r * r for w, r in zip(ws, residuals, strict=True))
    sigma = math.sqrt(ss / dof) if ss >= 0 else math.nan
    if not math.isfinite(sigma):
        return None
    return _Poly(centre, span, coef, inv, sigma, count_runs(residuals), dof)


def _curved(times_ns: list[int], offsets: list[float], weights: list[float]) -> bool:
    """Whether a weighted parabola fits significantly better than the line.

    A frequency that changed within the window (temperature, a drifting
    oscillator) bends the offsets; the runs test misses a bend that is small
    next to the noise, yet extrapolating a line through it is off by about
    the bend times the window squared.  A significant quadratic term says the
    window is bent.
    """
    if len(times_ns) < MIN_CURVATURE_SAMPLES:
        return False
    quad = _poly(times_ns, offsets, weights, 2)
    return quad is not None and quad.significant(2, CURVATURE_T)


def _inverse(m: list[list[float]]) -> list[list[float]] | None:
    """Inverse of a small square matrix (Gauss-Jordan with partial pivoting),
    None when it is (nearly) singular or holds a non-finite number."""
    size = len(m)
    scale = max(abs(x) for row in m for x in row)
    if not (scale > 0 and math.isfinite(scale)):
        return None
    a = [[x / scale for x in row] + [float(i == j) for j in range(size)]
         for i, row in enumerate(m)]
    for col in range(size):
        pivot = max(range(col, size), key=lambda r: abs(a[r][col]))
        if not abs(a[pivot][col]) > 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        p = a[col][col]
        a[col] = [x / p for x in a[col]]
        for r in range(size):
            if r != col and a[r][col]:
                f = a[r][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
    return [[x / scale for x in row[size:]] for row in a]


def _shrunk_curvature(times_ns: list[int], offsets: list[float], weights: list[float]) -> float:
    """The window's quadratic term, s/s^2, shrunk towards 0 by its uncertainty.

    The weighted parabola's term ``c`` with standard error ``e`` counts with
    weight ``c^2 / (c^2 + e^2)``: in full when it stands well above its
    noise, hardly at all when it is within it (the weight that minimises the
    error of the estimate were ``c`` the true term).
    """
    if len(times_ns) < MIN_CURVATURE_SAMPLES:
        return 0.0
    quad = _poly(times_ns, offsets, weights, 2)
    if quad is None:
        return 0.0
    c = quad.coef[2]
    var = quad.coef_sd(2) * quad.coef_sd(2)
    if not (c * c + var > 0):
        return 0.0
    term = c * (c * c / (c * c + var)) / (quad.span * quad.span)
    return term if math.isfinite(term) else 0.0


class SourceStats:
    """Sample history of one source and the linear regression over it.

    Each :meth:`add` refits ``offset = a + b * t`` by weighted least squares.
    When the residuals show too few sign runs for their number the line no
    longer describes the source (it stepped, or its frequency changed), so the
    oldest samples are discarded until the newer ones fit again, keeping at
    least ``minsamples``.  Memory is bounded by ``maxsamples``.
    """

    __slots__ = ("_added", "_asym", "_asym_error", "_asym_n", "_fit", "_maxsamples", "_minsamples",
                 "_phase", "_samples", "_trims")

    def __init__(self, maxsamples: int = DEFAULT_MAXSAMPLES, minsamples: int = 6) -> None:
        if maxsamples < MIN_MAXSAMPLES:
            raise ValueError(f"maxsamples must be at least {MIN_MAXSAMPLES}, not {maxsamples}")
        self._maxsamples = maxsamples
        self._minsamples = max(MIN_REGRESSION_SAMPLES, min(minsamples, maxsamples))
        self._samples: deque[Sample] = deque(maxlen=maxsamples)
        self._fit: _Fit | None = None
        self._asym = 0.0
        self._phase = 0.0
        self._asym_error = math.inf
        self._asym_n = 0
        self._added = 0
        self._trims: deque[int] = deque(maxlen=BEND_TRIMS)
        """Sample counts (:attr:`_added`) at which a window was cut for a bend."""

    # -- feeding --------------------------------------------------------------

    def add(self, sample: Sample) -> None:
        """Record a sample (times must not go backwards) and refit."""
        if self._samples and sample.time < self._samples[-1].time:
            raise ValueError("samples must be added in time order")
        self._samples.append(dataclasses.replace(sample))
        self._added += 1
        self._refit()

    def apply_correction(self, now_ns: int, offset_s: float, dfreq_ppm: float = 0.0) -> None:
        """Re-express stored samples after the clock was corrected at ``now_ns``.

        ``offset_s`` is how far the disciplined clock moved forward (step or
        accepted slew), ``dfreq_ppm`` how much faster it now runs.  A past
        sample then reads as if the corrected clock had always been running.
        """
        if not self._samples:
            return
        rate = dfreq_ppm * 1e-6
        shift_ns = round(offset_s * 1e9)
        for s in self._samples:
            s.offset -= offset_s + rate * (s.time - now_ns) * _NS
            s.time += shift_ns
        self._refit()

    def reset(self) -> None:
        """Forget everything, e.g. after the source was replaced."""
        self._samples.clear()
        self._fit = None
        self._trims.clear()

    def _refit(self) -> None:
        n = len(self._samples)
        if n < MIN_REGRESSION_SAMPLES:
            self._fit = None
            return
        samples = list(self._samples)
        times = [s.time for s in samples]
        delays = [s.delay for s in samples]
        sd = self._fit.sigma if self._fit else None
        weights = _weights(delays, sd)
        offsets = self._correct_asymmetry(times, [s.offset for s in samples], delays, weights)
        phase_weights = weights
        share = self.asymmetry
        if share:
            # The correction took most of the queueing error out of the
            # offsets: for the line (the frequency) a sample that met a queue
            # is now nearly as good as one that did not, and the more samples
            # count the steadier the slope.  What is left in them is the other
            # leg's queueing, which the correction cannot see and which only
            # ever adds: the phase, whose error the clock shows directly, is
            # taken from the quickest samples.
            weights = _weights(delays, sd, max(0.5 - abs(share), MIN_RESIDUAL_SHARE))
            phase_weights = _weights(delays, sd, PHASE_EXCESS_SHARE)
        start = 0
        while True:
            fit = _fit(times[start:], offsets[start:], weights[start:])
            remaining = n - start
            if remaining <= self._minsamples or fit.sigma <= PERFECT_FIT_S:
                break  # too few to trim, or residuals of nothing: the line fits
            if fit.runs > _max_suspicious_runs(remaining):
                if not _curved(times[start:], offsets[start:], weights[start:]):
                    break
                self._trims.append(self._added)  # cut for a bend
            # Drop a quarter of what is left (at least one sample) and try
            # again: a handful of refits finds where the model broke.
            start += max(1, min(remaining // 4, remaining - self._minsamples))
        for _ in range(start):
            self._samples.popleft()
        ts, ys, ws = times[start:], offsets[start:], weights[start:]
        curvature = _shrunk_curvature(ts, ys, ws) if self._bending() else 0.0
        if curvature:
            # The frequency keeps changing: take the window's bend out of the
            # offsets, so that the line's slope is the frequency at the newest
            # sample rather than at the window's middle, half a window ago.
            ys = [y - curvature * ((t - ts[-1]) * _NS) ** 2 for t, y in zip(ts, ys, strict=True)]
            fit = _fit(ts, ys, ws)
            fit.curvature = curvature
        self._fit = fit
        # The phase now: the same window refitted with older samples counting
        # a little less.  Where the clock's frequency wanders the plain line
        # lags at its newest end; the slope (and so the frequency, whose noise
        # the clock would feel) stays the plain fit's.
        span = max(1, ts[-1] - ts[0])
        tapered = [w / (1.0 + PHASE_TAPER * (ts[-1] - t) / span)
                   for w, t in zip(phase_weights[start:], ts, strict=True)]
        self._phase = _fit(ts, ys, tapered).intercept

    def _bending(self) -> bool:
        """Whether windows keep being cut for a bend: the frequency keeps changing.

        One cut can be the curvature test's false alarm (or a random-walk
        wiggle); :data:`BEND_TRIMS` cuts within :data:`BEND_MEMORY` samples are
        a trend that a line through the remaining window still lags behind.
        """
        t = self._trims
        return len(t) >= BEND_TRIMS and self._added - t[-BEND_TRIMS] <= BEND_MEMORY

    def _correct_asymmetry(self, times: list[int], offsets: list[float], delays: list[float],
                           weights: list[float]) -> list[float]:
        """Offsets less the long-run share of excess delay they carry."""
        found = _asymmetry(times, offsets, delays, weights)
        if found is not None:
            share, error = found
            if math.isfinite(share) and math.isfinite(error):
                # Averaged over refits: one window's estimate is noisy, the
                # path's asymmetry changes slowly.  The gate compares with
                # the newest window's error, which shrinks as the window grows.
                self._asym_n += 1
                self._asym += max(ASYMMETRY_AVERAGING, 1.0 / self._asym_n) * (share - self._asym)
                self._asym_error = error
        share = self.asymmetry
        if not share:
            return offsets
        least = min(delays)
        return [y - share * (d - least) for y, d in zip(offsets, delays, strict=True)]

    # -- what sourcestats shows -----------------------------------------------

    @property
    def asymmetry(self) -> float:
        """Share of excess delay taken out of the offsets (0 while not clearly asymmetric:
        on a symmetric path the estimate is noise, and correcting by it adds noise)."""
        if not abs(self._asym) > ASYMMETRY_GATE * self._asym_error:
            return 0.0
        return max(-MAX_ASYMMETRY, min(MAX_ASYMMETRY, self._asym))

    @property
    def maxsamples(self) -> int:
        """Bound on the samples kept."""
        return self._maxsamples

    @property
    def np(self) -> int:
        """Number of samples kept (NP)."""
        return len(self._samples)

    @property
    def nr(self) -> int:
        """Runs of residuals with the same sign in the last fit (NR); 0 without a fit."""
        return self._fit.runs if self._fit else 0

    @property
    def span(self) -> float:
        """Seconds between the oldest and newest sample."""
        if len(self._samples) < 2:
            return 0.0
        return (self._samples[-1].time - self._samples[0].time) * _NS

    @property
    def frequency_ppm(self) -> float:
        """Slope of offset over local time, ppm: positive means the source gains on us
        (our clock runs slow against it).  chrony prints the negated value."""
        return self._fit.slope * 1e6 if self._fit else 0.0

    @property
    def skew_ppm(self) -> float:
        """95% error bound of :attr:`frequency_ppm`."""
        if self._fit is None or not math.isfinite(self._fit.slope_sd):
            return UNKNOWN_SKEW_PPM
        bound = _t_quantile(self._fit.dof) * self._fit.slope_sd * 1e6
        return min(bound, UNKNOWN_SKEW_PPM)

    @property
    def std_dev(self) -> float:
        """Weighted standard deviation of the residuals, seconds."""
        if self._fit is not None:
            return self._fit.sigma
        return self.jitter

    @property
    def last_sample(self) -> Sample | None:
        """Newest sample, or None."""
        return self._samples[-1] if self._samples else None

    @property
    def samples(self) -> tuple[Sample, ...]:
        """Copy of the kept samples, oldest first."""
        return tuple(dataclasses.replace(s) for s in self._samples)

    def best_sample(self) -> Sample | None:
        """RFC 5905 clock filter: lowest delay among the last :data:`FILTER_LENGTH`."""
        if not self._samples:
            return None
        recent = list(self._samples)[-FILTER_LENGTH:]
        return min(recent, key=lambda s: s.delay)

    @property
    def jitter(self) -> float:
        """RMS of recent offsets around the filter's best one (RFC 5905 peer jitter)."""
        best = self.best_sample()
        if best is None:
            return 0.0
        recent = list(self._samples)[-FILTER_LENGTH:]
        if len(recent) < 2:
            return 0.0
        ss = sum((s.offset - best.offset) ** 2 for s in recent)
        return math.sqrt(ss / (len(recent) - 1))

    def offset_at(self, t_ns: int) -> float:
        """Estimated offset at local time ``t_ns``, seconds.

        Extrapolates the regression line; before there is one, the clock
        filter's best sample stands in.
        """
        fit = self._fit
        if fit is not None:
            x = (t_ns - fit.ref_ns) * _NS
            return self._phase + fit.slope * x + fit.curvature * x * x
        best = self.best_sample()
        return best.offset if best else 0.0

    def offset_error_at(self, t_ns: int) -> float:
        """Standard error of :meth:`offset_at`, seconds (grows away from the data)."""
        fit = self._fit
        if fit is None:
            return self.jitter
        x = (t_ns - fit.ref_ns) * _NS
        if fit.sxx <= 0:
            return fit.sigma
        var = fit.intercept_var + fit.sigma**2 * ((x - fit.mean_t) ** 2 - fit.mean_t**2) / fit.sxx
        # With few residuals the spread itself is a guess (three samples can
        # happen to line up): widen the error by how much the t distribution
        # of so few degrees of freedom is wider than the normal one.
        return math.sqrt(max(var, 0.0)) * _t_quantile(fit.dof) / _t_quantile(10**9)

    def root_distance(self, now_ns: int) -> float:
        """Upper bound of this source's error, seconds (RFC 5905 s11.2.2 lambda).

        root_delay/2 + root_dispersion of the newest sample, plus our own path:
        half the filter's lowest round trip, the sample dispersion and the
        spread of the samples (the regression's residuals, or the jitter
        before there is one), grown since the newest sample at the rate the
        frequency estimate may be wrong (its skew, at most PHI) plus
        :data:`MAX_CLOCK_ERROR`.  Growing with the estimate's own skew, not a
        fixed PHI, keeps a source measured a poll ago from looking a
        millisecond worse than one measured just now.
        """
        best = self.best_sample()
        last = self.last_sample
        if best is None or last is None:
            return math.inf
        age = max(0.0, (now_ns - last.time) * _NS)
        growth = min(self.skew_ppm * 1e-6, PHI) + MAX_CLOCK_ERROR
        return (last.root_delay / 2 + last.root_dispersion + best.delay / 2
                + last.dispersion + growth * age + self.std_dev)
