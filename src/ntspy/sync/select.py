"""Source selection: which sources tell the truth, which one leads, which are combined.

Follows chrony's selection (``chronyc sources`` state letters) built on RFC 5905
s11.2: Marzullo's intersection over ``offset +/- root distance`` intervals
finds the largest group of sources that agree; sources outside it are
falsetickers.  The best truechimer (shortest distance, a little stratum weight,
hysteresis for the current one, ``prefer`` first) becomes the reference and the
ones close enough to it are combined, weighted by 1/distance.

All values are float seconds (offsets positive = source ahead of us) and ppm;
nothing here knows the time of day.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ntspy.proto.ntp import Leap
from ntspy.sync.filter import UNKNOWN_SKEW_PPM, SourceStats

DEFAULT_MAX_DISTANCE = 3.0
DEFAULT_MAX_JITTER = 1.0
DEFAULT_COMBINE_LIMIT = 3.0
DEFAULT_RESELECT_DIST = 100e-6
DEFAULT_STRATUM_WEIGHT = 1e-3


class AuthSelectMode(enum.StrEnum):
    """chrony's ``authselectmode``: how authentication shapes selection options."""

    REQUIRE = "require"
    """Unauthenticated sources get ``noselect``."""
    PREFER = "prefer"
    """If any source is authenticated, unauthenticated ones get ``noselect``."""
    MIX = "mix"
    """If both kinds exist, authenticated ones get ``require`` and ``trust``: the
    unauthenticated can only be used together with, and bounded by, them."""
    IGNORE = "ignore"
    """Only the configured options count."""


class SourceState(enum.StrEnum):
    """The state column of ``chronyc sources``."""

    SELECTED = "*"
    COMBINED = "+"
    NOT_COMBINED = "-"
    FALSETICKER = "x"
    JITTERY = "~"
    UNUSABLE = "?"


@dataclass(slots=True)
class Candidate:
    """What selection needs to know about one source right now."""

    name: str
    offset: float
    """Estimated offset now, seconds, positive = source ahead of us."""
    distance: float
    """Root distance: bound of the source's error, seconds."""
    stratum: int = 1
    reachable: bool = True
    has_samples: bool = True
    authenticated: bool = False
    """Whether the source is configured with authentication (NTS)."""
    prefer: bool = False
    noselect: bool = False
    trust: bool = False
    require: bool = False
    jitter: float = 0.0
    frequency_ppm: float = 0.0
    """Residual frequency of the source's regression (see :class:`SourceStats`)."""
    skew_ppm: float = UNKNOWN_SKEW_PPM
    root_delay: float = 0.0
    root_dispersion: float = 0.0
    leap: Leap = Leap.NONE
    offset_sd: float = 0.0
    """Standard error of :attr:`offset`, seconds."""


@dataclass(slots=True)
class SelectConfig:
    """Selection directives, chrony's defaults."""

    minsources: int = 1
    authselectmode: AuthSelectMode = AuthSelectMode.MIX
    max_distance: float = DEFAULT_MAX_DISTANCE
    max_jitter: float = DEFAULT_MAX_JITTER
    combine_limit: float = DEFAULT_COMBINE_LIMIT
    reselect_dist: float = DEFAULT_RESELECT_DIST
    stratum_weight: float = DEFAULT_STRATUM_WEIGHT


@dataclass(slots=True)
class Selection:
    """Outcome of one selection round."""

    states: dict[str, SourceState]
    synchronised: bool
    reason: str = ""
    """Why not synchronised (empty when synchronised)."""
    selected: str | None = None
    offset: float = 0.0
    """Combined offset, seconds."""
    error: float = 0.0
    """Combined error bound (1/distance-weighted distance), seconds."""
    offset_sd: float = 0.0
    """Standard error of the combined :attr:`offset`, seconds."""
    frequency_ppm: float = 0.0
    """Combined residual frequency (weighted by 1/skew^2), ppm."""
    skew_ppm: float = UNKNOWN_SKEW_PPM
    stratum: int = 0
    """Stratum of the selected source (ours is one more)."""
    root_delay: float = 0.0
    root_dispersion: float = 0.0
    leap: Leap = Leap.UNSYNCHRONIZED
    combined: list[str] = field(default_factory=list)
    """Names whose offsets went into :attr:`offset`, the selected one first."""


@dataclass(slots=True)
class SelectOptions:
    """A source's selection options after ``authselectmode`` is applied."""

    noselect: bool
    trust: bool
    require: bool


def effective_options(candidates: Sequence[Candidate], mode: AuthSelectMode) -> list[SelectOptions]:
    """Selection options after ``authselectmode`` (chrony.conf(5)).

    ``noselect`` sources are not counted as either kind and keep their options.
    """
    counted = [c for c in candidates if not c.noselect]
    any_auth = any(c.authenticated for c in counted)
    any_unauth = any(not c.authenticated for c in counted)
    result = []
    for c in candidates:
        opts = SelectOptions(c.noselect, c.trust, c.require)
        if not c.noselect:
            shut_out = mode is AuthSelectMode.REQUIRE or (mode is AuthSelectMode.PREFER
                                                           and any_auth)
            if shut_out and not c.authenticated:
                opts.noselect = True
            elif mode is AuthSelectMode.MIX and any_auth and any_unauth and c.authenticated:
                opts.require = opts.trust = True
        result.append(opts)
    return result


def _intersection(intervals: list[tuple[float, float, bool]]) -> tuple[float, float, int, int]:
    """Marzullo's algorithm: the interval covered by the most source intervals.

    Each input is (low, high, trusted).  Trusted sources weigh first: the
    winning region holds as many trusted intervals as possible, then as many
    intervals overall.  Returns (low, high, depth, trusted depth).
    """
    # A low end sorts before a high end at the same point: touching intervals agree.
    edges: list[tuple[float, int, bool]] = []
    for low, high, trusted in intervals:
        edges.append((low, -1, trusted))
        edges.append((high, 1, trusted))
    edges.sort(key=lambda e: (e[0], e[1]))
    depth = trusted_depth = 0
    best = (0, 0)
    lo = hi = 0.0
    for i, (point, kind, trusted) in enumerate(edges):
        if kind < 0:
            depth += 1
            trusted_depth += trusted
            if (trusted_depth, depth) > best:
                best = (trusted_depth, depth)
                lo = point
                # The next edge closes the region of this depth; an inverted
                # interval (low > high) can leave none, and then the region is
                # the point itself.
                hi = edges[i + 1][0] if i + 1 < len(edges) else point
        else:
            depth -= 1
            trusted_depth -= trusted
    return lo, hi, best[1], best[0]


def _sound(c: Candidate) -> bool:
    """Whether a candidate's numbers can describe a real source at all.

    A NaN, an infinity or a negative distance cannot come from honest
    statistics; such a candidate is unusable rather than a reason to fail.
    """
    return (math.isfinite(c.offset) and math.isfinite(c.distance) and c.distance >= 0
            and math.isfinite(c.jitter) and c.jitter >= 0)


def _skew(c: Candidate) -> float:
    """The candidate's skew bounded to what weighting can use."""
    s = c.skew_ppm
    return min(max(s, 1e-9), UNKNOWN_SKEW_PPM) if math.isfinite(s) else UNKNOWN_SKEW_PPM


def _normalised(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


def _sd(c: Candidate) -> float:
    return c.offset_sd if math.isfinite(c.offset_sd) and c.offset_sd >= 0 else c.distance


def _freq(c: Candidate) -> float:
    return c.frequency_ppm if math.isfinite(c.frequency_ppm) else 0.0


def select_sources(
    candidates: Sequence[Candidate],
    config: SelectConfig | None = None,
    current: str | None = None,
) -> Selection:
    """Run one selection round over ``candidates``.

    ``current`` is the previously selected source: it keeps the lead while it
    remains a truechimer unless another is better by more than ``reselect_dist``.
    """
    cfg = config or SelectConfig()
    opts = effective_options(candidates, cfg.authselectmode)
    states = {c.name: SourceState.UNUSABLE for c in candidates}

    usable: list[int] = []
    for i, c in enumerate(candidates):
        if (opts[i].noselect or not c.reachable or not c.has_samples or not _sound(c)
                or c.distance > cfg.max_distance):
            continue
        if c.jitter > cfg.max_jitter:
            states[c.name] = SourceState.JITTERY
            continue
        usable.append(i)

    def fail(reason: str, mark: SourceState = SourceState.UNUSABLE) -> Selection:
        for i in usable:
            states[candidates[i].name] = mark
        return Selection(states, False, reason)

    if not usable:
        return fail("no selectable sources")
    if len(usable) < cfg.minsources:
        return fail(f"{len(usable)} selectable sources, minsources {cfg.minsources}")

    intervals = [(candidates[i].offset - candidates[i].distance,
                  candidates[i].offset + candidates[i].distance, opts[i].trust) for i in usable]
    low, high, depth, trusted_depth = _intersection(intervals)
    # A trusted source in the agreeing group lifts the majority rule (chrony's trust).
    if trusted_depth == 0 and depth <= len(usable) / 2:
        return fail("no majority", SourceState.FALSETICKER)

    truechimers: list[int] = []
    for i in usable:
        c = candidates[i]
        if c.offset - c.distance <= high and c.offset + c.distance >= low:
            truechimers.append(i)
        else:
            states[c.name] = SourceState.FALSETICKER

    # chrony's require: an unreachable or rejected required source still blocks.
    required = [i for i, o in enumerate(opts) if o.require and not o.noselect]
    if required and not any(i in truechimers for i in required):
        return fail("no required source agrees", SourceState.NOT_COMBINED)
    if len(truechimers) < cfg.minsources:
        return fail(f"{len(truechimers)} truechimers, minsources {cfg.minsources}",
                    SourceState.NOT_COMBINED)
    for i in truechimers:
        states[candidates[i].name] = SourceState.NOT_COMBINED

    pool = [i for i in truechimers if candidates[i].prefer] or truechimers

    def score(i: int) -> float:
        c = candidates[i]
        s = c.distance + cfg.stratum_weight * c.stratum
        return s if c.name == current else s + cfg.reselect_dist

    best_i = min(pool, key=score)
    best = candidates[best_i]
    states[best.name] = SourceState.SELECTED

    combined = [best_i]
    for i in truechimers:
        c = candidates[i]
        if i == best_i or (best.prefer and not c.prefer):
            continue
        if c.distance >= best.distance * cfg.combine_limit:
            continue
        # Frequencies must agree within their error bounds (chrony combinelimit).
        if abs(_freq(c) - _freq(best)) > cfg.combine_limit * (_skew(c) + _skew(best)):
            continue
        states[c.name] = SourceState.COMBINED
        combined.append(i)

    # Weights normalised first: each average then stays within the range of
    # what it averages, however large the numbers (no overflow to inf).
    w_off = _normalised([1.0 / max(candidates[i].distance, 1e-9) for i in combined])
    w_freq = _normalised([1.0 / _skew(candidates[i]) ** 2 for i in combined])
    offset = sum(w * candidates[i].offset for w, i in zip(w_off, combined, strict=True))
    error = sum(w * candidates[i].distance for w, i in zip(w_off, combined, strict=True))
    freq = sum(w * _freq(candidates[i]) for w, i in zip(w_freq, combined, strict=True))
    sd = math.sqrt(sum((w * min(_sd(candidates[i]), 1e150)) ** 2
                       for w, i in zip(w_off, combined, strict=True)))
    skew = min(_skew(candidates[i]) for i in combined)
    return Selection(
        states=states,
        synchronised=True,
        selected=best.name,
        offset=offset,
        error=error,
        offset_sd=sd,
        frequency_ppm=freq,
        # 1 / sqrt(sum of 1/skew^2): never more than the best source's skew.
        skew_ppm=skew / math.sqrt(sum(1.0 / (_skew(candidates[i]) / skew) ** 2
                                      for i in combined)),
        stratum=best.stratum,
        root_delay=best.root_delay,
        root_dispersion=best.root_dispersion,
        leap=best.leap,
        combined=[candidates[i].name for i in combined],
    )


def candidate_from_stats(
    name: str,
    stats: SourceStats,
    now_ns: int,
    *,
    reachable: bool = True,
    authenticated: bool | None = None,
    prefer: bool = False,
    noselect: bool = False,
    trust: bool = False,
    require: bool = False,
) -> Candidate:
    """A :class:`Candidate` from a source's statistics at local time ``now_ns``.

    ``authenticated`` defaults to whether the newest sample was authenticated.
    The root delay and dispersion are the source's plus our path to it, what
    we would announce as our own were it selected.
    """
    last = stats.last_sample
    if last is None:
        return Candidate(name, 0.0, math.inf, reachable=reachable, has_samples=False,
                         authenticated=bool(authenticated), prefer=prefer,
                         noselect=noselect, trust=trust, require=require)
    return Candidate(
        name=name,
        offset=stats.offset_at(now_ns),
        distance=stats.root_distance(now_ns),
        stratum=last.stratum,
        reachable=reachable,
        authenticated=last.authenticated if authenticated is None else authenticated,
        prefer=prefer,
        noselect=noselect,
        trust=trust,
        require=require,
        jitter=stats.jitter,
        frequency_ppm=stats.frequency_ppm,
        skew_ppm=stats.skew_ppm,
        root_delay=last.root_delay + last.delay,
        root_dispersion=last.root_dispersion + last.dispersion,
        leap=last.leap,
        offset_sd=stats.offset_error_at(now_ns),
    )
