"""A simulated clock and network to run the sync math end to end in virtual time.

Nothing here sleeps or reads a real clock: true time is an integer of
nanoseconds that :meth:`SimClock.advance` moves, and every random draw comes
from a seeded :class:`random.Random`, so a run is reproducible bit for bit.

Model:

* the local clock reads ``true + error``; the error grows with the clock's own
  frequency error (ppm, plus a random-walk wander) plus the frequency
  correction set by the discipline, and moves with steps and slews;
* slews run at most at chrony's default ``maxslewrate``, 83333 ppm (1/12 s/s);
* one-way network delays are a base plus an exponential queueing term (mean =
  the path's jitter), drawn independently each way, so the offset noise has a
  standard deviation of ``jitter / sqrt(2)``;
* a server answers with true time plus its own error, which can jump
  later (a source that starts lying).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from ntspy.clock import MIN_SLEW_S
from ntspy.proto.ntp import Leap
from ntspy.sync.discipline import ClockAction, Discipline, Tracking, apply_action
from ntspy.sync.engine import Exchange, SourceOptions, SyncEngine
from ntspy.sync.filter import SourceStats
from ntspy.sync.select import SelectConfig, Selection, SourceState

DEFAULT_MAX_SLEW_PPM = 1e6 / 12
"""chrony's default ``maxslewrate`` (83333.333 ppm)."""
CLOCK_PRECISION_LOG2 = -20
"""Reading precision assumed for the servers, log2 seconds (about 1 us)."""
_NS = 1_000_000_000


class SimClock:
    """A local clock with an offset, a frequency error and wander; satisfies
    ``ntspy.clock.Clock`` and :class:`ntspy.sync.discipline.DisciplinedClock`."""

    def __init__(
        self,
        rng: random.Random,
        start_ns: int = 1_700_000_000 * _NS,
        offset_s: float = 0.0,
        frequency_error_ppm: float = 0.0,
        wander_ppm_per_sqrt_s: float = 0.0,
        max_slew_ppm: float = DEFAULT_MAX_SLEW_PPM,
    ) -> None:
        """``offset_s`` is how far the clock starts ahead of true time."""
        self._rng = rng
        self.true_ns = start_ns
        self.error_s = offset_s
        self.frequency_error_ppm = frequency_error_ppm
        self.wander = wander_ppm_per_sqrt_s
        self.max_slew = max_slew_ppm * 1e-6
        self.frequency_correction_ppm = 0.0
        self._pending = 0.0
        self._slew_rate = 0.0

    def _rate(self) -> float:
        """Current s/s drift of the error, slew included."""
        rate = (self.frequency_error_ppm + self.frequency_correction_ppm) * 1e-6
        if self._pending:
            rate += math.copysign(self._slew_rate, self._pending)
        return rate

    def advance(self, delta_ns: int) -> None:
        """Let ``delta_ns`` of true time pass."""
        if delta_ns < 0:
            raise ValueError("true time does not go backwards")
        dt = delta_ns / _NS
        self.error_s += dt * (self.frequency_error_ppm + self.frequency_correction_ppm) * 1e-6
        if self._pending:
            done = min(abs(self._pending), self._slew_rate * dt)
            done = math.copysign(done, self._pending)
            self.error_s += done
            self._pending -= done
        if self.wander and dt > 0:
            self.frequency_error_ppm += self._rng.gauss(0.0, self.wander * math.sqrt(dt))
        self.true_ns += delta_ns

    def now_ns(self) -> int:
        """Local reading, Unix ns."""
        return self.true_ns + round(self.error_s * _NS)

    def local_at(self, true_ns: int) -> int:
        """Local reading at a nearby true time, extrapolating the current rate."""
        dt = (true_ns - self.true_ns) / _NS
        return true_ns + round((self.error_s + dt * self._rate()) * _NS)

    def step(self, offset_s: float) -> None:
        """Jump the clock forward by ``offset_s``."""
        self.error_s += offset_s

    def slew(self, offset_s: float, duration_s: float) -> None:
        """Add to the pending correction, spread over ``duration_s`` (0 = fastest)."""
        self._pending += offset_s
        wanted = abs(self._pending) / max(duration_s, MIN_SLEW_S)
        self._slew_rate = min(self.max_slew, wanted)

    def set_frequency(self, ppm: float) -> None:
        """Set the frequency correction, ppm."""
        self.frequency_correction_ppm = ppm

    def pending_slew_s(self) -> float:
        """Seconds of slew still to apply."""
        return self._pending


@dataclass(slots=True)
class SimServer:
    """A simulated NTP server and the path to it."""

    name: str
    error_s: float = 0.0
    """How far the server's clock is ahead of true time."""
    one_way_delay_s: float = 0.010
    jitter_s: float = 0.001
    """Mean of the exponential queueing delay added each way."""
    stratum: int = 2
    root_delay: float = 0.002
    root_dispersion: float = 0.001
    authenticated: bool = False
    reachable: bool = True
    prefer: bool = False
    noselect: bool = False
    trust: bool = False
    require: bool = False
    lie_after_s: float | None = None
    """Seconds into the run after which the server adds :attr:`lie_offset_s`."""
    lie_offset_s: float = 0.0

    def error_at(self, elapsed_s: float) -> float:
        """The server's clock error ``elapsed_s`` into the run."""
        if self.lie_after_s is not None and elapsed_s >= self.lie_after_s:
            return self.error_s + self.lie_offset_s
        return self.error_s


def measure(clock: SimClock, server: SimServer, rng: random.Random,
            elapsed_s: float) -> Exchange:
    """One client/server exchange starting now, as the four timestamps see it."""
    d1 = server.one_way_delay_s + rng.expovariate(1.0 / server.jitter_s)
    d2 = server.one_way_delay_s + rng.expovariate(1.0 / server.jitter_s)
    true_t1 = clock.true_ns
    true_t2 = true_t1 + round(d1 * _NS)
    true_t4 = true_t2 + round(d2 * _NS)
    server_err_ns = round(server.error_at(elapsed_s) * _NS)
    t2 = true_t2 + server_err_ns
    return Exchange(
        t1=clock.local_at(true_t1),
        t2=t2,
        t3=t2,
        t4=clock.local_at(true_t4),
        root_delay=server.root_delay,
        root_dispersion=server.root_dispersion,
        precision=CLOCK_PRECISION_LOG2,
        stratum=server.stratum,
        leap=Leap.NONE,
        authenticated=server.authenticated,
    )


@dataclass(slots=True)
class TraceRow:
    """State after one poll round."""

    elapsed_s: float
    clock_error_s: float
    """Local minus true time, what a user of the clock suffers."""
    synchronised: bool
    selected: str | None
    states: dict[str, SourceState]
    action: ClockAction | None


@dataclass(slots=True)
class Trace:
    """Everything a simulation run produced."""

    rows: list[TraceRow]
    tracking: Tracking
    stats: dict[str, SourceStats]
    selections: list[Selection] = field(default_factory=list)

    def errors_after(self, elapsed_s: float) -> list[float]:
        """Clock errors of the rows at or after ``elapsed_s``."""
        return [r.clock_error_s for r in self.rows if r.elapsed_s >= elapsed_s]

    def rms_error_after(self, elapsed_s: float) -> float:
        """RMS clock error from ``elapsed_s`` on."""
        errors = self.errors_after(elapsed_s)
        return math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else math.nan

    def first_below(self, bound_s: float) -> float | None:
        """Earliest elapsed time after which |error| stays below ``bound_s``."""
        first: float | None = None
        for r in self.rows:
            if abs(r.clock_error_s) < bound_s:
                if first is None:
                    first = r.elapsed_s
            else:
                first = None
        return first


def simulate(
    sources: Sequence[SimServer],
    seconds: float,
    poll: float = 16.0,
    seed: int = 1,
    *,
    initial_offset_s: float = 0.0,
    frequency_error_ppm: float = 0.0,
    wander_ppm_per_sqrt_s: float = 0.0,
    makestep: tuple[float, int] | None = None,
    select_config: SelectConfig | None = None,
    maxsamples: int = 64,
) -> Trace:
    """Run the daemon's sync engine over ``seconds`` of virtual time.

    Every ``poll`` seconds each source is measured once and handed to
    :class:`~ntspy.sync.engine.SyncEngine`, as the daemon does with each
    answered poll; its corrections are applied to the simulated clock.
    ``initial_offset_s`` is how far the local clock starts ahead of true time.
    """
    rng = random.Random(seed)
    clock = SimClock(rng, offset_s=initial_offset_s, frequency_error_ppm=frequency_error_ppm,
                     wander_ppm_per_sqrt_s=wander_ppm_per_sqrt_s)
    engine = SyncEngine(Discipline(makestep=makestep), select_config)
    for s in sources:
        engine.add_source(s.name, SourceOptions(
            authenticated=s.authenticated, prefer=s.prefer, noselect=s.noselect,
            trust=s.trust, require=s.require), maxsamples)
    start_ns = clock.true_ns
    poll_ns = round(poll * _NS)
    rows: list[TraceRow] = []
    selections: list[Selection] = []
    for _ in range(int(seconds / poll)):
        clock.advance(poll_ns)
        elapsed = (clock.true_ns - start_ns) / _NS
        actions: list[ClockAction] = []
        selection: Selection | None = None
        # The daemon's sequence: each answered poll goes through the engine,
        # which selects and decides whether this sample may move the clock.
        for server in sources:
            pending = clock.pending_slew_s()
            now = clock.now_ns() + round(pending * _NS)
            if not server.reachable:
                decision = engine.poll_failed(server.name, now)
            else:
                decision = engine.sample(server.name, now, measure(clock, server, rng, elapsed),
                                         pending)
            selection = decision.selection or selection
            if decision.action is not None:
                apply_action(clock, decision.action)
                engine.applied(now, decision)
                actions.append(decision.action)
        final = engine.selection or selection or Selection({}, False, "no poll yet")
        selections.append(final)
        rows.append(TraceRow(elapsed, clock.error_s, final.synchronised, final.selected,
                             dict(final.states), actions[-1] if actions else None))
    return Trace(rows, engine.tracking(clock.pending_slew_s()),
                 {k: v.stats for k, v in engine.sources.items()}, selections)
