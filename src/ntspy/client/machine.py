"""The polling and NTS-KE decisions of one source, as a state machine without I/O.

:class:`SourceMachine` is told what happened (a poll starts, a key exchange
failed or worked, an answer came, a kiss-o'-death, the sync engine's advice on
the interval) together with the current monotonic time, and answers with what
to do: a :class:`Step` for this poll and, through :meth:`SourceMachine.interval`,
when the next poll is due.  The adapter (:class:`ntspy.client.source.Source`)
carries the steps out over the network; tests drive the machine directly.

Times are monotonic seconds (float), handed in; nothing here reads a clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ntspy.sync.engine import PollScore

# chrony's NTS-KE retry intervals: 2^4 s after a failure to connect, 2^10 s
# after a failure in TLS or NTS-KE itself (the server is there but refuses
# us: hammering it will not help), doubling per failure up to the cap.
KE_BACKOFF_CONNECT_LOG2 = 4
KE_BACKOFF_TLS_LOG2 = 10
KE_BACKOFF_MAX_LOG2 = 17
IBURST_COUNT = 4
IBURST_INTERVAL = 2.0
MAX_POLL_LOG2 = 17  # RFC 5905's largest poll exponent (36 h)


class Step(enum.Enum):
    """What the adapter should do for the poll that starts now."""

    SEND = "send"
    """Send a request (keys and cookies are in hand, or the source is plain NTP)."""
    KEY_EXCHANGE = "key exchange"
    """Run NTS-KE first, report it, then send."""
    SKIP = "skip"
    """Nothing: NTS-KE is backing off and there are no keys to send with."""


@dataclass(slots=True)
class KeStatus:
    """What ``authdata`` shows for an NTS source."""

    successes: int = 0  # chrony's KeyID column for NTS
    attempts: int = 0  # attempts since the last success
    last_success: float | None = None  # monotonic seconds
    last_success_wall: float | None = None  # Unix seconds, for the dump file
    last_error: str = ""
    retry_at: float = 0.0  # monotonic seconds


class SourceMachine:
    """Poll interval, burst, NTS-KE back-off and refresh of one source."""

    __slots__ = ("_burst_good", "_burst_total", "_in_burst", "_nak_streak", "_score",
                 "backoff_scale", "iburst_left", "ke", "maxpoll", "minpoll", "nts", "ntsrefresh",
                 "poll", "polls")

    def __init__(self, minpoll: int, maxpoll: int, *, iburst: bool = False, nts: bool = False,
                 ntsrefresh: float = 2419200.0, backoff_scale: float = 1.0) -> None:
        self.minpoll = minpoll
        self.maxpoll = max(minpoll, maxpoll)
        self.poll = minpoll
        self.polls = 0
        self.iburst_left = IBURST_COUNT if iburst else 0
        self.nts = nts
        self.ntsrefresh = ntsrefresh
        self.backoff_scale = backoff_scale
        self.ke = KeStatus()
        self._score = PollScore()
        self._in_burst = False
        self._burst_good = 0
        self._burst_total = 0
        self._nak_streak = 0

    # -- a poll ----------------------------------------------------------------

    def begin_poll(self, now: float, have_keys: bool) -> Step:
        """A poll starts at ``now``; ``have_keys`` = NTS keys and a cookie in hand."""
        self.polls += 1
        self._in_burst = self.iburst_left > 0 or self.bursting
        if self.iburst_left > 0:
            self.iburst_left -= 1
        elif self.bursting:
            self._burst_total -= 1
        if not self.nts:
            return Step.SEND
        refresh_due = (self.ke.last_success is not None
                       and now - self.ke.last_success >= self.ntsrefresh)
        if have_keys and not refresh_due:
            return Step.SEND
        if now < self.ke.retry_at:
            return Step.SKIP
        self.ke.attempts += 1
        return Step.KEY_EXCHANGE

    def ke_failed(self, now: float, error: str, *, connect: bool) -> float:
        """NTS-KE failed (``connect``: could not even connect); returns the back-off, s."""
        base = KE_BACKOFF_CONNECT_LOG2 if connect else KE_BACKOFF_TLS_LOG2
        delay = 2.0 ** min(KE_BACKOFF_MAX_LOG2, base + self.ke.attempts - 1) * self.backoff_scale
        self.ke.retry_at = now + delay
        self.ke.last_error = error
        return delay

    def ke_succeeded(self, now: float, wall_s: float) -> None:
        """NTS-KE worked at monotonic ``now`` (Unix ``wall_s``, for the dump file)."""
        self.ke.successes += 1
        self.ke.attempts = 0
        self.ke.last_success = now
        self.ke.last_success_wall = wall_s
        self.ke.last_error = ""

    def renewal_failed(self, now: float, error: str) -> None:
        """A NAK left the session without cookies and no new NTS-KE came of it (it
        failed, or NAKs keep coming with no authenticated response in between).
        The wait doubles per failure; only an authenticated answer resets it, so
        forged NAKs cannot make us hammer the KE server (RFC 8915 s5.7)."""
        self.ke.attempts += 1
        self.ke.last_error = error
        self._nak_streak += 1
        delay = 2.0 ** min(KE_BACKOFF_MAX_LOG2, KE_BACKOFF_CONNECT_LOG2 + self._nak_streak - 1)
        self.ke.retry_at = now + delay * self.backoff_scale

    def answered(self) -> None:
        """The poll got an answer the session accepted."""
        if self._in_burst and self._burst_good > 0:
            self._burst_good -= 1
        if self.nts:
            self.ke.attempts = 0
            self._nak_streak = 0  # only an authenticated answer ends a NAK run

    def kissed(self, code: str) -> None:
        """A kiss-o'-death costs only this poll; RATE asks us to poll less often:
        the interval doubles, past maxpoll if need be (RFC 5905 s7.4)."""
        if code == "RATE":
            self.poll = min(self.poll + 1, MAX_POLL_LOG2)

    def advise(self, advice: float) -> None:
        """The sync engine's advice on the interval (poll exponents, see
        :class:`~ntspy.sync.engine.PollScore`).  Burst samples come 2 s apart and
        say nothing about the source over the poll interval: they do not count."""
        if self._in_burst:
            return
        self.poll = self._score.step(advice, self.poll, self.minpoll, self.maxpoll)

    def burst(self, good: int, total: int) -> None:
        """chronyc's ``burst good/max``: polls 2 s apart until ``good`` answers came
        or ``total`` polls were sent, then back to the poll interval."""
        self._burst_good = max(0, good)
        self._burst_total = max(0, total)

    @property
    def bursting(self) -> bool:
        """Whether a ``burst`` is under way."""
        return self._burst_good > 0 and self._burst_total > 0

    def rekey(self) -> None:
        """``rekey``: the next poll does NTS-KE without waiting for a back-off."""
        self.ke.retry_at = 0.0

    @property
    def poll_score(self) -> float:
        """How far the interval is on its way to the next step (chrony's Score)."""
        return self._score.score

    # -- when ------------------------------------------------------------------

    def interval(self) -> float:
        """Seconds from the poll just done to the next one."""
        if (self.iburst_left > 0 and self.polls > 0) or self.bursting:
            return min(IBURST_INTERVAL, 2.0 ** self.poll)
        return 2.0 ** self.poll
