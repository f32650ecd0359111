"""The daemon's poll loop survives its own bugs: a raising round, a dying task.

Sources run their real ``_run_source`` tasks (spawned by the daemon itself) with
``poll_once`` replaced, so a test decides what each poll does: raise, end the
task, or bring a good measurement. A :class:`FakeClock` records the corrections,
so what the user would notice -- the clock still being disciplined -- is what is
checked, next to the log and the counters.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from ntspy.client.daemon import ClientDaemon
from ntspy.client.session import Measurement
from ntspy.client.source import Source
from tests.unit.test_client_daemon import FakeClock, config, measurement

FAST = "minpoll -6 maxpoll -6"  # 1/64 s between polls
NS = 1_000_000_000


class Escape(BaseException):
    """Not an Exception: nothing in a poll round catches it, so the task ends."""


class ScriptedPolls:
    """A poll_once that plays ``script`` (exceptions to raise, in order), then
    returns good measurements 1 s of clock time apart."""

    def __init__(self, clock: FakeClock, script: list[BaseException]) -> None:
        self.clock = clock
        self.script = list(script)
        self.calls = 0
        self.good = 0
        self.enough = asyncio.Event()
        self.wanted = 0

    async def __call__(self, now: float) -> Measurement | None:
        self.calls += 1
        if self.script:
            raise self.script.pop(0)
        self.good += 1
        if self.good >= self.wanted:
            self.enough.set()
        self.clock.now += NS
        return measurement(offset=0.002, t4=self.clock.now)

    async def until_good(self, count: int, timeout: float = 10.0) -> None:
        self.wanted = count
        if self.good < count:
            self.enough.clear()
            await asyncio.wait_for(self.enough.wait(), timeout)


async def started(tmp_path: Path, clock: FakeClock, *lines: str) -> ClientDaemon:
    daemon = ClientDaemon(config(tmp_path, *lines), clock)
    daemon.sources = await daemon._make_sources(daemon.configured_sources())
    return daemon


def script(daemon: ClientDaemon, clock: FakeClock, src: Source,
           exceptions: list[BaseException]) -> ScriptedPolls:
    polls = ScriptedPolls(clock, exceptions)
    src.poll_once = polls  # type: ignore[method-assign]
    return polls


def source_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("source ")
            and not t.done()]


def records(caplog: pytest.LogCaptureFixture, level: int,
            match: Callable[[str], bool]) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "ntspy.client" and r.levelno == level and match(r.getMessage())]


async def test_raising_poll_rounds_are_logged_once_counted_and_polling_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ntspy.client")
    clock = FakeClock()
    daemon = await started(tmp_path, clock, f"server 127.0.0.1 {FAST}")
    (src,) = daemon.sources
    polls = script(daemon, clock, src, [RuntimeError("boom")] * 3)
    daemon._spawn(src)
    try:
        await polls.until_good(6)
        failed = records(caplog, logging.ERROR, lambda m: "poll round failed" in m)
        # Three failures of one kind: one log line, with the traceback.
        assert len(failed) == 1
        assert failed[0].exc_info is not None
        exc = failed[0].exc_info[1]
        assert isinstance(exc, RuntimeError) and str(exc) == "boom"
        assert "RuntimeError: boom" in caplog.text and "Traceback" in caplog.text
        assert daemon.loop_errors == 3 and src.errors == 3
        # The source kept being polled and its samples steer the clock.
        assert polls.calls >= 3 + 6
        assert daemon.clock_updates >= 1
        assert clock.slews and clock.frequencies
        assert sum(clock.slews) > 0  # the source is 2 ms ahead: the clock is sped up
        assert src.reach.value & 0b111111 == 0b111111
        assert len(source_tasks()) == 1
    finally:
        await daemon.stop()


async def test_each_kind_of_failure_is_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ntspy.client")
    clock = FakeClock()
    daemon = await started(tmp_path, clock, f"server 127.0.0.1 {FAST}")
    (src,) = daemon.sources
    polls = script(daemon, clock, src, [
        RuntimeError("boom"), KeyError("x"), RuntimeError("boom"), KeyError("x"),
        RuntimeError("other"),
    ])
    daemon._spawn(src)
    try:
        await polls.until_good(1)
        failed = records(caplog, logging.ERROR, lambda m: "poll round failed" in m)
        kinds = sorted(f"{type(r.exc_info[1]).__name__}: {r.exc_info[1]}"
                       for r in failed if r.exc_info)
        assert kinds == ["KeyError: 'x'", "RuntimeError: boom", "RuntimeError: other"]
        assert daemon.loop_errors == 5 and src.errors == 5
    finally:
        await daemon.stop()


async def test_a_failing_source_does_not_stop_the_others(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ntspy.client")
    clock = FakeClock()
    daemon = await started(tmp_path, clock, f"server 127.0.0.1 {FAST}",
                           f"server 127.0.0.2 {FAST}")
    bad, good = daemon.sources
    bad_polls = script(daemon, clock, bad, [RuntimeError("always")] * 10_000)
    good_polls = script(daemon, clock, good, [])
    for src in daemon.sources:
        daemon._spawn(src)
    try:
        await good_polls.until_good(8)
        assert bad_polls.calls >= 5  # still polled, failing every time
        assert bad.errors == bad_polls.calls
        assert good.errors == 0
        assert daemon.clock_updates >= 1
        assert len(records(caplog, logging.ERROR, lambda m: "poll round failed" in m)) == 1
    finally:
        await daemon.stop()


async def test_a_task_that_dies_is_reported_and_restarted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ntspy.client")
    clock = FakeClock()
    daemon = await started(tmp_path, clock, f"server 127.0.0.1 {FAST}")
    (src,) = daemon.sources
    polls = script(daemon, clock, src, [Escape()])
    daemon._spawn(src)
    first = daemon._tasks[src]
    try:
        await polls.until_good(6)
        assert first.done() and isinstance(first.exception(), Escape)
        crit = records(caplog, logging.CRITICAL, lambda m: "ended unexpectedly" in m)
        assert len(crit) == 1 and "restarting" in crit[0].getMessage()
        assert crit[0].exc_info is not None and isinstance(crit[0].exc_info[1], Escape)
        assert daemon.loop_errors == 1
        # A new task polls the source, and only one.
        second = daemon._tasks[src]
        assert second is not first and not second.done()
        assert source_tasks() == [second]
        assert daemon.clock_updates >= 1 and clock.slews
    finally:
        await daemon.stop()


async def test_an_exception_outside_the_round_ends_the_task_and_it_is_restarted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # interval() runs between rounds, outside the round's try: a bug there ends
    # the task with an ordinary exception.
    caplog.set_level(logging.INFO, logger="ntspy.client")
    clock = FakeClock()
    daemon = await started(tmp_path, clock, f"server 127.0.0.1 {FAST}")
    (src,) = daemon.sources
    polls = script(daemon, clock, src, [])
    real_interval = src.interval
    broken = [ZeroDivisionError("interval"), ZeroDivisionError("interval")]

    def interval() -> float:
        if broken:
            raise broken.pop(0)
        return real_interval()

    src.interval = interval  # type: ignore[method-assign]
    daemon._spawn(src)
    try:
        await polls.until_good(6)
        crit = records(caplog, logging.CRITICAL, lambda m: "ended unexpectedly" in m)
        assert len(crit) == 2
        assert all(r.exc_info and isinstance(r.exc_info[1], ZeroDivisionError) for r in crit)
        assert daemon.loop_errors == 2
        assert len(source_tasks()) == 1
        assert daemon.clock_updates >= 1
    finally:
        await daemon.stop()


async def test_stopping_cancels_tasks_without_restarting_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ntspy.client")
    clock = FakeClock()
    daemon = await started(tmp_path, clock, f"server 127.0.0.1 {FAST}",
                           f"server 127.0.0.2 {FAST}")
    scripted = [script(daemon, clock, src, []) for src in daemon.sources]
    for src in daemon.sources:
        daemon._spawn(src)
    await scripted[0].until_good(2)
    tasks = list(daemon._tasks.values())
    await daemon.stop()
    await asyncio.sleep(0.1)  # a restart would have been spawned by now
    assert all(t.cancelled() for t in tasks)
    assert source_tasks() == []
    assert not records(caplog, logging.CRITICAL, lambda m: True)
    assert daemon.loop_errors == 0
    calls = [p.calls for p in scripted]
    await asyncio.sleep(0.1)
    assert [p.calls for p in scripted] == calls  # nothing polls any more

