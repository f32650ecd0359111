"""Clock discipline: from a selection's combined offset to a step, a slew and a frequency.

Modelled on chrony rather than on the RFC 5905 PLL/FLL:

* **phase**: the combined offset is slewed away over ``corrtimeratio`` times the
  update interval (chrony's default ratio 3), never stepped unless ``makestep``
  allows it: ``|offset| > threshold`` while fewer than ``limit`` updates have
  been made (``limit`` -1 = always);
* **frequency**: the combined regression slope is a *residual* frequency on the
  already corrected clock; it is folded into the total correction weighted by
  the skews of the old and the new estimate, and ignored when its skew exceeds
  ``maxupdateskew``.

Times are local-clock Unix ns (``int``); offsets float seconds; frequencies
ppm, positive = make the clock run faster.  Offsets are positive when the
reference is ahead of us, so a positive offset is corrected by moving the clock
forward.  Nothing here touches a clock: the adapter applies the returned
:class:`ClockAction` through a :class:`DisciplinedClock`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from ntspy.errors import NtsError, StateFileError
from ntspy.proto.ntp import Leap
from ntspy.sync.filter import UNKNOWN_SKEW_PPM
from ntspy.sync.select import Selection

DEFAULT_CORR_TIME_RATIO = 3.0
DEFAULT_MAX_UPDATE_SKEW = 1000.0
MAX_DRIFT_PPM = 500000.0
"""chrony's default ``maxdrift``; a drift file beyond it is not a clock we know."""
MIN_OFFSET_SD = 1e-9
"""Floor of the offset error used for the correction rate, seconds."""
RMS_AVERAGING = 0.125
"""Weight of a new offset in the long-term RMS offset (an exponential average)."""
_NS = 1e-9


@dataclass(slots=True)
class ClockAction:
    """What to do to the clock after one update."""

    step_s: float | None
    """Step the clock forward by this many seconds (negative: back), or None."""
    slew_offset_s: float
    """Seconds to add to the pending slew (positive: gain time)."""
    frequency_ppm: float
    """Total frequency correction to set, ppm (positive: run faster)."""
    correction_rate: float = 0.0
    """chrony's correction rate, s^2: the pending offset ``x`` is slewed away
    over ``correction_rate / |x|`` seconds, so large errors go fast and small
    ones (mostly noise) slowly; 0 = as fast as the clock allows."""
    frequency_change_ppm: float = 0.0
    """How much :attr:`frequency_ppm` differs from the previous correction."""

    @property
    def offset_correction_s(self) -> float:
        """Total phase correction of the disciplined timescale, seconds."""
        return (self.step_s or 0.0) + self.slew_offset_s


class MaxChangeExceeded(NtsError):
    """An offset beyond ``maxchange`` came more often than it may be ignored."""


class DisciplinedClock(Protocol):
    """A clock the discipline can steer (kernel: ``clock_adjtime``; tests: ``SimClock``).

    Extends the reading-only ``ntspy.clock.Clock``.
    """

    def now_ns(self) -> int:
        """Current local time, Unix ns."""
        ...

    def step(self, offset_s: float) -> None:
        """Jump the clock by ``offset_s`` seconds."""
        ...

    def slew(self, offset_s: float, duration_s: float) -> None:
        """Add ``offset_s`` to the pending correction, spread over ``duration_s``."""
        ...

    def set_frequency(self, ppm: float) -> None:
        """Set the total frequency correction."""
        ...

    def pending_slew_s(self) -> float:
        """Part of the requested slews not applied yet, seconds."""
        ...


def slew_duration(correction_rate: float, pending_s: float) -> float:
    """How long to take over correcting ``pending_s`` (0: as fast as allowed)."""
    if correction_rate <= 0 or not pending_s or not math.isfinite(pending_s):
        return 0.0
    return correction_rate / abs(pending_s)


def apply_action(clock: DisciplinedClock, action: ClockAction) -> None:
    """Carry out ``action`` on ``clock``.

    The new offset joins what is still pending, and all of it is slewed over
    the duration the correction rate gives for the total.
    """
    clock.set_frequency(action.frequency_ppm)
    if action.step_s is not None:
        clock.step(action.step_s)
    if action.slew_offset_s:
        total = clock.pending_slew_s() + action.slew_offset_s
        clock.slew(action.slew_offset_s, slew_duration(action.correction_rate, total))


@dataclass(slots=True)
class Tracking:
    """What ``chronyc tracking`` shows (ntspy signs; display code converts)."""

    reference: str | None
    stratum: int
    ref_time_ns: int | None
    system_time_offset: float
    """Pending slew, seconds: positive = system clock still behind the NTP time."""
    last_offset: float
    rms_offset: float
    frequency_ppm: float
    """Total frequency correction in use (positive = clock sped up, i.e. it runs slow
    on its own)."""
    residual_freq_ppm: float
    skew_ppm: float
    root_delay: float
    root_dispersion: float
    update_interval: float
    leap: Leap


class Discipline:
    """Turns each selection into a :class:`ClockAction` and keeps tracking state."""

    def __init__(
        self,
        makestep: tuple[float, int] | None = None,
        frequency_ppm: float = 0.0,
        skew_ppm: float = UNKNOWN_SKEW_PPM,
        corr_time_ratio: float = DEFAULT_CORR_TIME_RATIO,
        max_update_skew: float = DEFAULT_MAX_UPDATE_SKEW,
        max_drift_ppm: float = MAX_DRIFT_PPM,
        maxchange: tuple[float, int, int] | None = None,
    ) -> None:
        """``frequency_ppm``/``skew_ppm`` usually come from the drift file."""
        self.makestep = makestep
        self.maxchange = maxchange
        self._changes_refused = 0
        self.refused: str | None = None
        """Why the last update was refused by ``maxchange`` (None if it was not)."""
        self.max_drift_ppm = max_drift_ppm
        self.corr_time_ratio = corr_time_ratio
        self.max_update_skew = max_update_skew
        self.updates = 0
        self._frequency = frequency_ppm
        self._skew = skew_ppm
        self._last_update_ns: int | None = None
        self._interval = 0.0
        self._last_offset = 0.0
        self._mean_square = 0.0
        self._residual = 0.0
        self._reference: str | None = None
        self._stratum = 0
        self._root_delay = 0.0
        self._root_dispersion = 0.0
        self._leap = Leap.UNSYNCHRONIZED

    @property
    def frequency_ppm(self) -> float:
        """Total frequency correction, ppm."""
        return self._frequency

    @property
    def skew_ppm(self) -> float:
        """Error bound of :attr:`frequency_ppm`, ppm."""
        return self._skew

    def _should_step(self, offset: float) -> bool:
        if self.makestep is None:
            return False
        threshold, limit = self.makestep
        return abs(offset) > threshold and (limit < 0 or self.updates < limit)

    def update(self, now_ns: int, selection: Selection) -> ClockAction | None:
        """One clock update from ``selection`` at local time ``now_ns``.

        Returns None, leaving the clock alone, when the selection is not
        synchronised.
        """
        self.refused = None
        if not selection.synchronised or not math.isfinite(selection.offset):
            return None
        offset = selection.offset
        if self._beyond_maxchange(offset):
            return None
        if self._last_update_ns is not None:
            self._interval = max(0.0, (now_ns - self._last_update_ns) * _NS)
        self._last_update_ns = now_ns

        dfreq = 0.0
        if (math.isfinite(selection.frequency_ppm) and selection.skew_ppm > 0
                and selection.skew_ppm < self.max_update_skew):
            # The regression ran on samples already expressed on the corrected
            # clock: its slope is what is left of the frequency error after
            # every correction so far, not a second opinion on the old value.
            # It is applied whole; its skew becomes ours.
            dfreq = selection.frequency_ppm
            self._frequency += dfreq
            self._skew = selection.skew_ppm
            # chrony's maxdrift: never ask for a frequency no clock has.
            self._frequency = max(-self.max_drift_ppm, min(self.max_drift_ppm, self._frequency))
        self._residual = (selection.frequency_ppm - dfreq
                          if math.isfinite(selection.frequency_ppm) else 0.0)

        step: float | None = None
        slew = offset
        if self._should_step(offset):
            step, slew = offset, 0.0
        self.updates += 1

        self._last_offset = offset
        if self.updates == 1:
            self._mean_square = offset * offset
        else:
            self._mean_square += RMS_AVERAGING * (offset * offset - self._mean_square)
        self._reference = selection.selected
        self._stratum = selection.stratum + 1
        self._root_delay = selection.root_delay
        self._root_dispersion = selection.root_dispersion + abs(offset)
        self._leap = selection.leap
        return ClockAction(
            step_s=step,
            slew_offset_s=slew,
            frequency_ppm=self._frequency,
            # chrony's corrtimeratio: an offset of the size the estimate's
            # error predicts takes corr_time_ratio update intervals to slew.
            correction_rate=self._correction_rate(selection.offset_sd),
            frequency_change_ppm=dfreq,
        )

    def _beyond_maxchange(self, offset: float) -> bool:
        """chrony's ``maxchange offset start ignore``: after ``start`` updates, an
        offset over ``offset`` is refused ``ignore`` times (-1: always), then the
        daemon must give up (:class:`MaxChangeExceeded`)."""
        if self.maxchange is None:
            return False
        limit, start, ignore = self.maxchange
        if self.updates < start or abs(offset) <= limit:
            return False
        if 0 <= ignore <= self._changes_refused:
            raise MaxChangeExceeded(
                f"adjustment of {-offset:.3f} seconds exceeds the allowed maximum of "
                f"{limit:.3f} seconds (maxchange): giving up")
        self._changes_refused += 1
        self.refused = (f"adjustment of {-offset:.3f} seconds exceeds the allowed maximum "
                        f"of {limit:.3f} seconds (ignored)")
        return True

    def _correction_rate(self, offset_sd: float) -> float:
        """chrony's correction rate for this update (0 when it cannot be known)."""
        sd = offset_sd if math.isfinite(offset_sd) else 0.0
        rate = self.corr_time_ratio * self._interval * max(sd, MIN_OFFSET_SD)
        return rate if math.isfinite(rate) and rate >= 0 else 0.0

    def tracking(self, pending_slew_s: float = 0.0) -> Tracking:
        """Snapshot for ``tracking``; ``pending_slew_s`` comes from the clock."""
        return Tracking(
            reference=self._reference,
            stratum=self._stratum,
            ref_time_ns=self._last_update_ns,
            system_time_offset=pending_slew_s,
            last_offset=self._last_offset,
            rms_offset=math.sqrt(self._mean_square),
            frequency_ppm=self._frequency,
            residual_freq_ppm=self._residual,
            skew_ppm=self._skew,
            root_delay=self._root_delay,
            root_dispersion=self._root_dispersion,
            update_interval=self._interval,
            leap=self._leap,
        )


def format_drift(freq_ppm: float, skew_ppm: float) -> str:
    """chrony's drift file: frequency correction and its skew, ppm, on one line."""
    for value in (freq_ppm, skew_ppm):
        if not math.isfinite(value):
            raise ValueError(f"drift value must be finite, not {value}")
    return f"{freq_ppm:20.6f} {skew_ppm:20.6f}\n"


def parse_drift(text: str) -> tuple[float, float]:
    """(frequency ppm, skew ppm) from a drift file; garbage raises StateFileError."""
    fields = text.split()
    if len(fields) != 2:
        raise StateFileError(f"drift file must hold two numbers, found {len(fields)} fields")
    try:
        freq, skew = float(fields[0]), float(fields[1])
    except ValueError as exc:
        raise StateFileError(f"drift file holds a non-number: {exc}") from None
    if not (math.isfinite(freq) and math.isfinite(skew)):
        raise StateFileError("drift file holds a non-finite number")
    if abs(freq) > MAX_DRIFT_PPM:
        raise StateFileError(f"drift file frequency {freq} ppm is beyond {MAX_DRIFT_PPM} ppm")
    if skew < 0:
        raise StateFileError(f"drift file skew {skew} ppm is negative")
    return freq, skew
