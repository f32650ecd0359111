"""The client daemon in-process: drift and time files, nocerttimecheck, KE back-off, polling.

A fake :class:`~ntspy.clock.ClockControl` records every correction, so nothing
here can touch the system clock; sessions get fake key exchanges and
measurements, so nothing touches the network either.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest

from ntspy.client.daemon import TIME_FILE, ClientDaemon, ClientOptions
from ntspy.client.ke import KeResult
from ntspy.client.machine import IBURST_INTERVAL, KE_BACKOFF_CONNECT_LOG2, KE_BACKOFF_TLS_LOG2
from ntspy.client.session import Measurement, NtsSession
from ntspy.client.source import Source
from ntspy.clock import MeasureOnlyClock
from ntspy.config import Config, SourceConfig, parse_config
from ntspy.errors import KeConnectionError, KissOfDeath, TlsError
from ntspy.sync.discipline import format_drift

NOW = 1_800_000_000 * 10**9


class FakeClock:
    """A controllable clock that records what the daemon asks of it."""

    def __init__(self, now_ns: int = NOW, can_control: bool = True) -> None:
        self.now = now_ns
        self.can_control = can_control
        self.steps: list[float] = []
        self.slews: list[float] = []
        self.frequencies: list[float] = []

    def now_ns(self) -> int:
        return self.now

    def step(self, offset_s: float) -> None:
        self.steps.append(offset_s)
        self.now += round(offset_s * 1e9)

    def slew(self, offset_s: float, duration_s: float = 0.0) -> None:
        self.slews.append(offset_s)

    def set_frequency(self, ppm: float) -> None:
        self.frequencies.append(ppm)

    def pending_slew_s(self) -> float:
        return 0.0

    def set_leap(self, leap: int) -> None:
        self.leap = leap


def config(tmp_path: Path, *lines: str) -> Config:
    return parse_config("\n".join([f"ntsdumpdir {tmp_path}", f"driftfile {tmp_path / 'drift'}",
                                   *lines]) + "\n")


def source_config(line: str) -> SourceConfig:
    return parse_config(line + "\n").sources[0]


def measurement(offset: float = 0.001, t4: int = NOW) -> Measurement:
    # The four times carry the offset: the sync engine works from them alone.
    t1 = t4 - 200_000
    t2 = t1 + 100_000 + round(offset * 1e9)
    return Measurement(
        server="s", address="127.0.0.1", port=123, offset=offset, delay=0.0002, stratum=1,
        leap=0, reference_id="GPS", reference_time_ns=t4, root_delay=0.0,
        root_dispersion=0.0, poll=0, precision=-20, version=4, authenticated=False,
        kernel_rx_timestamp=True, t1=t1, t2=t2, t3=t2, t4=t4,
    )


# -- drift file and time file (-s) ---------------------------------------------


async def test_drift_file_written_at_stop_and_used_at_start(tmp_path: Path) -> None:
    clock = FakeClock()
    daemon = ClientDaemon(config(tmp_path), clock)
    daemon.discipline._frequency = 12.5  # as if it had learnt this much
    daemon.discipline.updates = 3
    await daemon.stop()
    assert float((tmp_path / "drift").read_text().split()[0]) == 12.5

    again = FakeClock()
    restarted = ClientDaemon(config(tmp_path), again)
    assert restarted.discipline.frequency_ppm == 12.5
    assert again.frequencies == [12.5]  # handed to the clock it can control


def test_drift_file_not_applied_to_a_clock_it_must_not_control(tmp_path: Path) -> None:
    (tmp_path / "drift").write_text(format_drift(-7.25, 0.5))
    clock = FakeClock(can_control=False)
    daemon = ClientDaemon(config(tmp_path), clock)
    assert daemon.discipline.frequency_ppm == -7.25
    assert clock.frequencies == []


async def test_no_drift_file_without_a_clock_update(tmp_path: Path) -> None:
    await ClientDaemon(config(tmp_path), FakeClock()).stop()
    assert not (tmp_path / "drift").exists()
    assert int((tmp_path / TIME_FILE).read_text()) == NOW


@pytest.mark.parametrize(("saved_offset_s", "expected_steps"), [(3600, [3600.0]), (-60, [])])
async def test_restore_time_only_steps_forward(
    tmp_path: Path, saved_offset_s: int, expected_steps: list[float]
) -> None:
    (tmp_path / TIME_FILE).write_text(f"{NOW + saved_offset_s * 10**9}\n")
    clock = FakeClock()
    daemon = ClientDaemon(config(tmp_path), clock, ClientOptions(restore_time=True))
    await daemon.start()
    await daemon.stop()
    assert clock.steps == expected_steps


async def test_restore_time_off_without_s(tmp_path: Path) -> None:
    (tmp_path / TIME_FILE).write_text(f"{NOW + 3600 * 10**9}\n")
    clock = FakeClock()
    daemon = ClientDaemon(config(tmp_path), clock)
    await daemon.start()
    await daemon.stop()
    assert clock.steps == []


async def test_damaged_time_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / TIME_FILE).write_text("not a time\n")
    clock = FakeClock()
    daemon = ClientDaemon(config(tmp_path), clock, ClientOptions(restore_time=True))
    await daemon.start()
    await daemon.stop()
    assert clock.steps == []


def test_measure_only_clock_keeps_corrections_virtual() -> None:
    clock = MeasureOnlyClock()
    before = clock.now_ns()
    clock.step(3600.0)
    assert clock.pending_slew_s() == pytest.approx(3600.0)
    assert abs(clock.now_ns() - before) < 10**9  # the system clock did not move


# -- nocerttimecheck -------------------------------------------------------------


async def test_nocerttimecheck_relaxes_only_time_until_n_updates(tmp_path: Path) -> None:
    cfg = config(tmp_path, "server 127.0.0.1 nts minpoll -6 maxpoll -6", "nocerttimecheck 2")
    daemon = ClientDaemon(cfg, FakeClock())
    seen: list[tuple[int, bool]] = []
    done = asyncio.Event()

    async def fake_poll(now: float, pending: Any = None) -> Measurement | None:
        src = daemon.sources[0]
        assert isinstance(src.session, NtsSession) and src.session.trust is not None
        seen.append((daemon.clock_updates, src.session.trust.no_cert_time_check))
        assert src.session.trust.use_system_store  # only the time check is relaxed
        daemon.engine.updates += 1  # as if each poll had updated the clock
        if len(seen) == 4:
            done.set()
        return None

    daemon.sources = [daemon._source(cfg.sources[0], None)]
    daemon.sources[0].poll_once = fake_poll  # type: ignore[method-assign]
    task = asyncio.create_task(daemon._run_source(daemon.sources[0]))
    await asyncio.wait_for(done.wait(), 5)
    task.cancel()
    assert seen == [(0, True), (1, True), (2, False), (3, False)]


def test_certificate_times_checked_by_default(tmp_path: Path) -> None:
    daemon = ClientDaemon(config(tmp_path, "server 127.0.0.1 nts"), FakeClock())
    assert daemon.trust(0).no_cert_time_check is False


# -- NTS-KE back-off ----------------------------------------------------------------


def nts_source(exc: Exception, scale: float = 0.001) -> tuple[Source, list[int]]:
    calls: list[int] = []

    async def failing_ke(*args: Any, **kwargs: Any) -> KeResult:
        calls.append(1)
        raise exc

    src = Source(source_config("server 127.0.0.1 nts"), FakeClock(), backoff_scale=scale)
    assert isinstance(src.session, NtsSession)
    src.session._key_exchange = failing_ke
    return src, calls


@pytest.mark.parametrize(("exc", "first_log2"), [
    (KeConnectionError("connection refused"), KE_BACKOFF_CONNECT_LOG2),
    (TlsError("handshake failed"), KE_BACKOFF_TLS_LOG2),
])
async def test_ke_backoff_doubles_from_chrony_intervals(exc: Exception, first_log2: int) -> None:
    scale = 0.001
    src, calls = nts_source(exc, scale)
    now = 100.0
    delays = []
    for _ in range(3):
        assert await src.poll_once(now) is None
        delays.append((src.ke.retry_at - now) / scale)
        # Polls before the retry time do not try again.
        assert await src.poll_once(now + 0.5 * (src.ke.retry_at - now)) is None
        now = src.ke.retry_at
    assert delays == [pytest.approx(2.0 ** (first_log2 + i)) for i in range(3)]
    assert len(calls) == 3 and src.ke.attempts == 3
    assert src.reach.value == 0 and src.last_error
    row = src.authdata(now)
    assert row["attempts"] == 3 and row["key_id"] == 0


# -- polling ---------------------------------------------------------------------------


class VirtualClock(FakeClock):
    """Corrections are never applied but stay pending, as with ``-x``: a measured
    offset then reads as corrected, the way the sync engine expects."""

    def pending_slew_s(self) -> float:
        return sum(self.slews) + sum(self.steps)


async def test_poll_interval_follows_how_well_the_samples_fit(tmp_path: Path) -> None:
    clock = VirtualClock()
    daemon = ClientDaemon(config(tmp_path, "server 127.0.0.1 minpoll 2 maxpoll 4"), clock)
    daemon.sources = await daemon._make_sources(daemon.configured_sources())
    (src,) = daemon.sources
    offset = 0.001

    async def steady() -> Measurement:
        return measurement(offset=offset, t4=clock.now)

    src.session.measure = steady  # type: ignore[method-assign]
    polls = []
    for _ in range(60):
        clock.now += round(src.interval() * 1e9)
        await daemon._poll_round(src)
        polls.append(src.poll)
    # Samples that keep fitting one line: the interval grows to maxpoll, never shrinking.
    assert polls[0] == 2 and polls[-1] == 4
    assert polls == sorted(polls)
    # A sample far from the prediction: the source is not tracked well, poll faster.
    offset += 0.05
    clock.now += round(src.interval() * 1e9)
    await daemon._poll_round(src)
    assert src.poll < 4


async def test_burst_samples_do_not_change_the_interval() -> None:
    src = Source(source_config("server 127.0.0.1 iburst minpoll 6 maxpoll 10"), FakeClock())

    async def good() -> Measurement:
        return measurement(t4=NOW + src.polls * 10**9)

    src.session.measure = good  # type: ignore[method-assign]
    intervals = []
    for _ in range(6):
        await src.poll_once(0.0)
        src.adjust_poll(5.0)  # whatever the advice, a burst sample does not count
        intervals.append(src.interval())
    # The first poll goes out at once; the burst's next three follow 2 s apart.
    assert intervals[:3] == [IBURST_INTERVAL] * 3
    assert intervals[3] == 64.0
    assert src.poll > 6  # after the burst, advice counts again


async def test_failed_polls_do_not_raise_the_interval() -> None:
    src = Source(source_config("server 127.0.0.1 minpoll 2 maxpoll 4"), FakeClock())

    async def silent() -> Measurement:
        from ntspy.errors import NtsError
        raise NtsError("no response")

    src.session.measure = silent  # type: ignore[method-assign]
    for _ in range(10):
        assert await src.poll_once(0.0) is None
    assert src.poll == 2 and src.reach.value == 0


async def test_leap_second_announced_by_the_source_is_armed_in_the_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    daemon = ClientDaemon(config(tmp_path, "server 127.0.0.1 minpoll 0 maxpoll 0"), clock)
    daemon.sources = await daemon._make_sources(daemon.configured_sources())
    (src,) = daemon.sources
    t4 = NOW

    async def leap_pending() -> Measurement:
        m = measurement(offset=0.0001, t4=t4)
        m.leap = 1  # the server announces an inserted second tonight
        return m

    src.session.measure = leap_pending  # type: ignore[method-assign]
    for _ in range(6):
        clock.now = t4
        await daemon._poll_round(src)
        t4 += 10**9
    assert daemon.clock_updates >= 1
    assert clock.leap == 1


async def test_ntsrefresh_redoes_ke_even_with_cookies_left() -> None:
    src = Source(source_config("server 127.0.0.1 nts"), FakeClock(), ntsrefresh=3600)
    assert isinstance(src.session, NtsSession)
    session = src.session
    kes: list[float] = []

    async def fake_ke(*args: Any, **kwargs: Any) -> KeResult:
        kes.append(1)
        return KeResult(aead_id=15, c2s=bytes(32), s2c=bytes(32), cookies=[b"c" * 104] * 8,
                        ntp_server="127.0.0.1", ntp_port=123, ke_host="127.0.0.1",
                        ke_port=4460, ke_address="127.0.0.1", tls_version="TLSv1.3",
                        cert_subject="CN=x", cert_not_after=None)

    async def fake_measure() -> Measurement:
        if session.ke is None:
            await session.key_exchange()
        session.cookies.pop()
        return measurement()

    session._key_exchange = fake_ke
    session.measure = fake_measure  # type: ignore[method-assign]
    assert await src.poll_once(0.0) is not None
    assert await src.poll_once(3599.0) is not None
    assert len(kes) == 1 and src.ke.successes == 1  # cookies left, not due yet
    assert await src.poll_once(3600.0) is not None
    assert len(kes) == 2 and src.ke.successes == 2  # due: fresh keys and cookies


async def test_rate_kiss_doubles_the_poll_interval_even_past_maxpoll() -> None:
    src = Source(source_config("server 127.0.0.1 minpoll 2 maxpoll 3"), FakeClock())

    async def rate() -> Measurement:
        raise KissOfDeath("RATE")

    async def deny() -> Measurement:
        raise KissOfDeath("DENY")

    src.session.measure = rate  # type: ignore[method-assign]
    for expected in (3, 4, 5):
        assert await src.poll_once(0.0) is None
        assert src.poll == expected and "RATE" in src.last_error
    src.session.measure = deny  # type: ignore[method-assign]
    assert await src.poll_once(0.0) is None
    assert src.poll == 5 and src.reach.value == 0


class KernelClock(VirtualClock):
    """Records what the daemon tells the kernel about synchronisation."""

    def __init__(self) -> None:
        super().__init__()
        self.sync_calls: list[tuple[bool, float, float]] = []

    def next_maintenance_s(self) -> float | None:
        return None

    def maintain(self) -> None:
        pass

    def finish(self) -> float:
        return 0.0

    def set_sync_status(self, synchronised: bool, max_error_s: float,
                        est_error_s: float) -> None:
        self.sync_calls.append((synchronised, max_error_s, est_error_s))


@pytest.mark.parametrize("rtcsync", [False, True])
async def test_kernel_told_its_error_and_unsync_cleared_only_with_rtcsync(
        tmp_path: Path, rtcsync: bool) -> None:
    clock = KernelClock()
    lines = ["server 127.0.0.1 minpoll 0 maxpoll 0", *(["rtcsync"] if rtcsync else [])]
    daemon = ClientDaemon(config(tmp_path, *lines), clock)
    daemon.sources = await daemon._make_sources(daemon.configured_sources())
    (src,) = daemon.sources

    async def good() -> Measurement:
        return measurement(offset=0.0001, t4=clock.now)

    src.session.measure = good  # type: ignore[method-assign]
    for _ in range(4):
        clock.now += 10**9
        await daemon._poll_round(src)
    assert daemon.clock_updates >= 1 and len(clock.sync_calls) == daemon.clock_updates
    synchronised, max_error, est_error = clock.sync_calls[-1]
    assert synchronised is rtcsync  # chronyd leaves STA_UNSYNC set without rtcsync
    assert 0 < max_error < 1.0 and 0 <= est_error < 1.0


async def test_a_source_going_unreachable_and_back_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from ntspy.errors import NtsError
    caplog.set_level(logging.INFO)
    clock = VirtualClock()
    daemon = ClientDaemon(config(tmp_path, "server 127.0.0.1 minpoll 0 maxpoll 0"), clock)
    daemon.sources = await daemon._make_sources(daemon.configured_sources())
    (src,) = daemon.sources
    answering = True

    async def flaky() -> Measurement:
        if not answering:
            raise NtsError("no response")
        return measurement(offset=0.0001, t4=clock.now)

    src.session.measure = flaky  # type: ignore[method-assign]
    for phase in (True, False, True):
        answering = phase
        for _ in range(8):
            clock.now += 10**9
            await daemon._poll_round(src)
    assert caplog.text.count("Source 127.0.0.1 unreachable") == 1
    assert caplog.text.count("Source 127.0.0.1 reachable again") == 1


async def test_forged_nak_storm_costs_a_bounded_number_of_key_exchanges() -> None:
    # Every request answered by a forged NAK (an off-path attacker who sees our
    # packets): the KE server must not see a connection per poll (RFC 8915 s5.7).
    from ntspy.errors import NakBackoff
    src = Source(source_config("server 127.0.0.1 nts minpoll -2 maxpoll -2"), FakeClock())
    session = src.session
    assert isinstance(session, NtsSession)
    kes: list[float] = []
    now = 0.0

    async def ke_ok(*args: Any, **kwargs: Any) -> KeResult:
        kes.append(now)
        return KeResult(
            aead_id=15, c2s=bytes(32), s2c=bytes(32), cookies=[b"c" * 100] * 8,
            ntp_server="127.0.0.1", ntp_port=123, ke_host="127.0.0.1", ke_port=4460,
            ke_address="127.0.0.1", tls_version="TLSv1.3", cert_subject="CN=x",
            cert_not_after=None)

    async def nak_storm() -> Measurement:
        session.cookies.clear()
        raise NakBackoff("NTS NAK before any authenticated response since the last NTS-KE")

    session._key_exchange = ke_ok
    session.measure = nak_storm  # type: ignore[method-assign]
    while now < 600.0:  # ten minutes of polls every 0.25 s: 2400 polls
        await src.poll_once(now)
        now += src.interval()
    assert len(kes) <= 6, kes  # 16 s, 32 s, 64 s, ... apart, not 2400
    assert all(b - a >= 16.0 for a, b in itertools.pairwise(kes))
