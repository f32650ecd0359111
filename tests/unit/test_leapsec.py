"""leapsectz: the tz database's leap seconds, and the daemon arming them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ntspy.client.daemon import ClientDaemon
from ntspy.client.session import Measurement
from ntspy.leapsec import leap_at_end_of_day, zone_knows_leap_seconds
from tests.unit.test_client_daemon import KernelClock, config, measurement

DEC_31_2016 = 1483185600  # noon UTC; that day ended with 23:59:60
DEC_30_2016 = DEC_31_2016 - 86400
JUN_30_2017 = 1498824000  # no leap second that day


def test_right_utc_knows_the_leap_seconds() -> None:
    assert leap_at_end_of_day("right/UTC", DEC_31_2016) == 1
    assert leap_at_end_of_day("right/UTC", DEC_30_2016) == 0
    assert leap_at_end_of_day("right/UTC", JUN_30_2017) == 0
    assert leap_at_end_of_day("right/UTC", 1341057600) == 1  # 2012-06-30
    assert zone_knows_leap_seconds("right/UTC")
    assert not zone_knows_leap_seconds("UTC")  # the plain zone has no 23:59:60


def test_the_process_timezone_is_put_back() -> None:
    before = os.environ.get("TZ")
    local = time.localtime(0)
    leap_at_end_of_day("right/UTC", DEC_31_2016)
    assert os.environ.get("TZ") == before and time.localtime(0) == local


@pytest.mark.parametrize(("day", "source_leap", "armed"), [
    (DEC_31_2016, 0, 1),  # the tz database says so, whatever the source says
    (DEC_30_2016, 1, 0),  # a source announcing a leap the database does not know: no
])
async def test_daemon_arms_the_leap_second_from_leapsectz(
        tmp_path: Path, day: int, source_leap: int, armed: int) -> None:
    clock = KernelClock()
    clock.now = day * 10**9
    daemon = ClientDaemon(config(tmp_path, "server 127.0.0.1 minpoll 0 maxpoll 0",
                                 "leapsectz right/UTC"), clock)
    daemon.sources = await daemon._make_sources(daemon.configured_sources())
    (src,) = daemon.sources

    async def answer() -> Measurement:
        m = measurement(offset=0.0001, t4=clock.now)
        m.leap = source_leap
        return m

    src.session.measure = answer  # type: ignore[method-assign]
    clock.leap = 0
    for _ in range(4):
        clock.now += 10**9
        await daemon._poll_round(src)
    assert daemon.clock_updates >= 1
    assert clock.leap == armed


def test_a_zone_without_leap_seconds_is_refused_with_chronyds_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    daemon = ClientDaemon(config(tmp_path, "leapsectz UTC"), KernelClock())
    assert daemon._leap_zone is None
    assert "Timezone UTC failed leap second check, ignoring" in caplog.text
