"""The client's decisions in one place: what a poll result does to the clock.

:class:`SyncEngine` is fed poll results (a measured exchange, or a poll that got
no usable answer) together with the current time, and returns a
:class:`Decision`: the selection it made and, when the clock should move, the
:class:`~ntspy.sync.discipline.ClockAction` and leap state for the adapter to
carry out.  It owns every rule between a sample and the clock:

* the sample checks of :mod:`ntspy.sync.sanity` (rejects are counted per source);
* selection over all sources' statistics;
* the start-up hold: the first update waits until the other answering sources
  have caught up (up to :data:`STARTUP_HOLD_POLLS` polls), as chrony does, so
  whichever server answers first, a falseticker too, cannot set the clock alone;
* the clock only moves when the selected source has a sample it has not yet
  acted on (chrony's rule: the update interval is the reference's polling
  interval, and a falseticker's sample can only trigger a re-selection);
* leap-second arming from the selected source's leap indicator.

The daemon (:mod:`ntspy.client.daemon`) and the simulator
(:mod:`ntspy.sync.sim`) both drive this class, so the simulation tests test
the daemon's decisions.  Nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from ntspy.proto.ntp import Leap
from ntspy.sync.discipline import ClockAction, Discipline, MaxChangeExceeded, Tracking
from ntspy.sync.filter import PHI, ReachRegister, Sample, SourceStats
from ntspy.sync.sanity import SampleLimits, SampleReject, check_exchange, precision_seconds
from ntspy.sync.select import SelectConfig, Selection, candidate_from_stats, select_sources

STARTUP_HOLD_POLLS = 8
"""Polls after which a source no longer waits for the others to catch up."""
POLL_TARGET = 8
"""chrony's ``polltarget``: samples the regression should hold.  A source whose
samples keep fitting one line is polled less often, one whose model keeps
breaking (temperature, a changing path) more often, between minpoll and maxpoll."""


class PollScore:
    """Turns per-sample poll advice into whole steps of the poll exponent."""

    __slots__ = ("_score",)

    def __init__(self) -> None:
        self._score = 0.0

    @property
    def score(self) -> float:
        """Advice saved up so far, in poll exponents."""
        return self._score

    def step(self, advice: float, poll: int, minpoll: int, maxpoll: int) -> int:
        """The new poll exponent after ``advice`` (kept within minpoll..maxpoll)."""
        if math.isnan(advice):
            return poll
        self._score += max(-8.0, min(1.0, advice))
        if self._score >= 1.0 and poll < maxpoll:
            self._score = 0.0
            return poll + 1
        if self._score <= -1.0 and poll > minpoll:
            # A large miss can take off several steps at once.
            steps = min(int(-self._score), poll - minpoll)
            self._score = 0.0
            return poll - steps
        if (self._score > 0 and poll >= maxpoll) or (self._score < 0 and poll <= minpoll):
            self._score = 0.0  # nothing to save up for beyond the bounds
        return poll


@dataclass(slots=True, frozen=True)
class SourceOptions:
    """A source's configured selection options."""

    authenticated: bool = False
    prefer: bool = False
    noselect: bool = False
    trust: bool = False
    require: bool = False


@dataclass(slots=True)
class Exchange:
    """One answered poll as measured: the four times and the server's header values.

    ``t1``/``t4`` are local clock readings, ``t2``/``t3`` the server's, all Unix ns.
    """

    t1: int
    t2: int
    t3: int
    t4: int
    root_delay: float = 0.0
    root_dispersion: float = 0.0
    precision: int = -20
    """log2 seconds, the server's announced precision."""
    stratum: int = 1
    leap: Leap = Leap.NONE
    authenticated: bool = False

    @property
    def offset(self) -> float:
        """RFC 5905 theta, seconds (positive: the server is ahead)."""
        return ((self.t2 - self.t1) + (self.t3 - self.t4)) / 2e9

    @property
    def delay(self) -> float:
        """Round trip minus the server's hold time, seconds."""
        return ((self.t4 - self.t1) - (self.t3 - self.t2)) / 1e9

    @property
    def dispersion(self) -> float:
        """The sample's own error: the server's precision plus PHI over the round trip."""
        return precision_seconds(self.precision) + PHI * max(0.0, self.delay)


class EngineSource:
    """What the engine keeps of one source: statistics, reach, counters."""

    __slots__ = ("fresh", "key", "options", "polls", "reach", "rejected", "stats")

    def __init__(self, key: str, options: SourceOptions, maxsamples: int) -> None:
        self.key = key
        self.options = options
        self.stats = SourceStats(maxsamples)
        self.reach = ReachRegister()
        self.polls = 0
        self.rejected: Counter[str] = Counter()
        """Samples dropped by the sanity checks, by :class:`SampleReject` reason."""
        self.fresh = False
        """Whether a sample came in since the clock was last updated."""


@dataclass(slots=True)
class Decision:
    """What one poll result led to."""

    selection: Selection | None = None
    """The selection run for this result (None if none was run)."""
    action: ClockAction | None = None
    """Correction for the adapter to apply, then to confirm with :meth:`SyncEngine.applied`."""
    leap: int | None = None
    """Kernel leap state to arm with the action (1 insert, 2 delete, 0 none); None = as is."""
    rejected: SampleReject | None = None
    """Why the sample was dropped, if it was."""
    refused: str | None = None
    """Why an update was refused (``maxchange``), to be logged."""
    fatal: str | None = None
    """Why the daemon must give up (``maxchange`` exceeded too often)."""
    poll_advice: float = 0.0
    """How the source's polling interval should move, in poll exponents: a
    fraction per sample, positive while its regression holds at least
    :data:`POLL_TARGET` samples, negative while the clock or the path keeps
    breaking the model (see :class:`PollScore`)."""


class SyncEngine:
    """Selection, discipline and their gating rules over a set of sources."""

    def __init__(
        self,
        discipline: Discipline | None = None,
        select_config: SelectConfig | None = None,
        limits: SampleLimits | None = None,
    ) -> None:
        self.discipline = discipline or Discipline()
        self.select_config = select_config or SelectConfig()
        self.limits = limits or SampleLimits(max_distance=self.select_config.max_distance)
        self.sources: dict[str, EngineSource] = {}
        self.selection: Selection | None = None
        self.current: str | None = None
        """The selected source, kept through rounds that select none (hysteresis)."""
        self.updates = 0
        """Clock updates carried out (confirmed through :meth:`applied`)."""
        self.leap_armed = 0
        self.tz_leap: int | None = None
        """Leap state from ``leapsectz`` for today (set by the adapter); None = the
        selected source's leap indicator decides."""

    # -- sources --------------------------------------------------------------

    def add_source(self, key: str, options: SourceOptions | None = None,
                   maxsamples: int = 64) -> EngineSource:
        """Start tracking a source under ``key`` (replacing any of that key)."""
        src = EngineSource(key, options or SourceOptions(), maxsamples)
        self.sources[key] = src
        return src

    def remove_source(self, key: str) -> None:
        """Forget a source; the next selection runs without it."""
        self.sources.pop(key, None)
        if self.current == key:
            self.current = None

    # -- poll results ---------------------------------------------------------

    def poll_failed(self, key: str, now_ns: int) -> Decision:
        """A poll of ``key`` got no usable answer at local time ``now_ns``.

        A source that stops answering must leave the selection even when no
        other source brings a sample to re-run it.
        """
        src = self.sources[key]
        src.polls += 1
        src.reach.update(False)
        if self.selection is None:
            return Decision()
        return Decision(selection=self.select(now_ns))

    def sample(self, key: str, now_ns: int, exchange: Exchange,
               pending_s: float = 0.0) -> Decision:
        """An answered poll of ``key``; ``now_ns`` is the disciplined time now.

        ``pending_s`` is how far the clock is behind the disciplined timescale
        (the correction not yet applied): samples are kept on that timescale.
        """
        src = self.sources[key]
        src.polls += 1
        reason = check_exchange(
            exchange.t1, exchange.t2, exchange.t3, exchange.t4,
            root_delay=exchange.root_delay, root_dispersion=exchange.root_dispersion,
            dispersion=exchange.dispersion, precision=exchange.precision,
            limits=self.limits,
        )
        if reason is None and src.stats.last_sample is not None \
                and exchange.t4 + round(pending_s * 1e9) < src.stats.last_sample.time:
            # The local clock went back (a step by someone else): the history
            # is on another timescale now.
            src.stats.reset()
        if reason is not None:
            # The server answered (reach counts it, as chrony's does) but the
            # sample cannot be right: it goes nowhere near the filter.
            src.reach.update(True)
            src.rejected[str(reason)] += 1
            return Decision(rejected=reason)
        src.reach.update(True)
        prediction_error = self._prediction_error(src, exchange, pending_s)
        src.stats.add(Sample(
            time=exchange.t4 + round(pending_s * 1e9),
            offset=exchange.offset - pending_s,
            # RFC 5905 s8: a round trip is never taken as shorter than the
            # precision allows (a rounding-negative one becomes ~0).
            delay=max(exchange.delay, precision_seconds(exchange.precision)),
            dispersion=exchange.dispersion,
            root_delay=exchange.root_delay,
            root_dispersion=exchange.root_dispersion,
            stratum=exchange.stratum,
            leap=exchange.leap,
            authenticated=exchange.authenticated,
        ))
        src.fresh = True
        decision = self._update(src, now_ns)
        decision.poll_advice = self._poll_advice(src, prediction_error, exchange)
        return decision

    @staticmethod
    def _prediction_error(src: EngineSource, exchange: Exchange,
                          pending_s: float) -> float | None:
        """How far the new sample lands from where the source's regression said
        (None before there is a regression)."""
        stats = src.stats
        if stats.np < 3:
            return None
        at = exchange.t4 + round(pending_s * 1e9)
        return abs(exchange.offset - pending_s - stats.offset_at(at))

    @staticmethod
    def _poll_advice(src: EngineSource, prediction_error: float | None,
                     exchange: Exchange) -> float:
        """Poll advice after a sample (chrony's rules, in poll exponents).

        A sample that misses the prediction by more than its own error bound
        (half the round trip plus its dispersion) says the source is not being
        tracked: back off the interval by log2 of how badly.  Otherwise steer
        the number of samples in the regression towards :data:`POLL_TARGET`,
        shortening twice as fast as lengthening.
        """
        bound = max(exchange.delay, 0.0) / 2 + exchange.dispersion
        if prediction_error is not None and bound > 0 and prediction_error > bound:
            return -math.log2(prediction_error / bound)
        advice = (src.stats.np / POLL_TARGET - 1.0) / POLL_TARGET
        return advice * 2.0 if advice < 0 else advice

    def _update(self, fresh: EngineSource, now_ns: int) -> Decision:
        selection = self.select(now_ns)
        decision = Decision(selection=selection)
        # The clock moves on the reference's own measurements (chrony's rule):
        # only when the selected source has a sample the clock has not seen.
        chosen = self.sources.get(selection.selected) if selection.selected else None
        if chosen is None or not chosen.fresh:
            return decision
        if self._waiting_for_others(fresh):
            return decision
        try:
            action = self.discipline.update(now_ns, selection)
        except MaxChangeExceeded as exc:
            decision.fatal = str(exc)
            return decision
        decision.refused = self.discipline.refused
        if action is None:
            return decision
        decision.action = action
        if self.tz_leap is not None:  # leapsectz: the tz database decides
            leap = self.tz_leap
        else:
            leap = int(selection.leap) if selection.leap in (Leap.INSERT_SECOND,
                                                             Leap.DELETE_SECOND) else 0
        if leap != self.leap_armed:
            decision.leap = leap
        return decision

    def _waiting_for_others(self, fresh: EngineSource) -> bool:
        if self.updates > 0 or fresh.polls >= STARTUP_HOLD_POLLS:
            return False
        # Others still owe an answer to as many polls (they were started with
        # it), or answer but have fewer samples: let them catch up first.
        return any(src.polls < fresh.polls
                   or (src.reach.reachable and src.stats.np < fresh.stats.np)
                   for src in self.sources.values() if src is not fresh)

    def applied(self, now_ns: int, decision: Decision, leap_ok: bool = True) -> None:
        """The adapter carried out ``decision.action`` at ``now_ns``.

        Re-expresses every source's samples on the corrected timescale and
        counts the update; ``leap_ok`` says whether arming ``decision.leap``
        worked (if not, it is tried again with the next update).
        """
        action = decision.action
        if action is None:
            return
        for src in self.sources.values():
            src.stats.apply_correction(now_ns, action.offset_correction_s,
                                       action.frequency_change_ppm)
            src.fresh = False
        if decision.leap is not None and leap_ok:
            self.leap_armed = decision.leap
        self.updates += 1

    # -- selection and status -------------------------------------------------

    def select(self, now_ns: int) -> Selection:
        """One selection round over every source's statistics at ``now_ns``."""
        candidates = [
            candidate_from_stats(
                src.key, src.stats, now_ns, reachable=src.reach.reachable,
                authenticated=src.options.authenticated, prefer=src.options.prefer,
                noselect=src.options.noselect, trust=src.options.trust,
                require=src.options.require,
            )
            for src in self.sources.values()
        ]
        selection = select_sources(candidates, self.select_config, self.current)
        self.selection = selection
        self.current = selection.selected or self.current
        return selection

    def tracking(self, pending_slew_s: float = 0.0) -> Tracking:
        """``tracking`` view; ``pending_slew_s`` comes from the clock."""
        return self.discipline.tracking(pending_slew_s)
