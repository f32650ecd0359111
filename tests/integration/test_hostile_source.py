"""``ntspy run`` next to a hostile NTP server: never selected, never steering, always polled.

The hostile server is this test's own UDP socket on loopback. It answers every
request properly addressed (mode 4, our origin timestamp, stratum 1) but with
times no real exchange can have: a server hold time far longer than the round
trip (negative delay), a transmit time before the receive time, a clock in
1995, or zero timestamps. Next to it runs a real ``ntspy serve``. The daemon
runs with ``-x`` (the clock is only measured) and without CAP_SYS_TIME, polling
every 0.25-0.5 s; everything is read back as a user would, through
``ntspy ctl``.

The bug these guard against: a daemon that polled such a server once (Reach 1)
and never again, because the bad sample broke its poll loop.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ntspy.errors import MalformedPacket
from ntspy.proto.ntp import Mode, NtpHeader, seconds_to_short, unix_ns_to_ntp
from tests.daemon_helpers import ClientProc, wait_until
from tests.peers import LOOPBACK, ServerProc, start_ntspy_server, wait_for_udp_ntp

NS = 1_000_000_000
POLL = "iburst minpoll -2 maxpoll -1"
SYNC_TIMEOUT = 15.0
WATCH_S = 3.0
YEAR_1995_NS = 801_964_800 * NS  # 1995-06-01 00:00 UTC

EXPECTED_ERROR = {
    "negative-delay": "sample rejected: negative delay",
    "t3-before-t2": "sample rejected: server transmit before receive (T3 < T2)",
    "year-1995": "sample rejected: server time out of range",
    "zero-timestamps": "zero receive or transmit timestamp",
}
REJECTED = {"negative-delay", "t3-before-t2", "year-1995"}
"""Modes whose answers reach the sync engine (and are refused there); the zero
timestamps are refused by the session, so those polls count as unanswered."""


class HostileNtpServer:
    """A plain NTP server on 127.0.0.1 that lies about its times in one way (``mode``)."""

    def __init__(self, mode: str) -> None:
        assert mode in EXPECTED_ERROR
        self.mode = mode
        self.requests = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((LOOPBACK, 0))
        self._sock.settimeout(0.05)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"hostile {mode}",
                                        daemon=True)
        self._thread.start()

    def _times(self, now_ns: int) -> tuple[int, int]:
        """(receive, transmit) timestamps to answer with."""
        if self.mode == "negative-delay":
            # Holding the request for a second of a ~100 us round trip.
            return unix_ns_to_ntp(now_ns), unix_ns_to_ntp(now_ns + NS)
        if self.mode == "t3-before-t2":
            return unix_ns_to_ntp(now_ns), unix_ns_to_ntp(now_ns - 10_000_000)
        if self.mode == "year-1995":
            then = YEAR_1995_NS + now_ns % (86400 * NS)
            return unix_ns_to_ntp(then), unix_ns_to_ntp(then + 10_000)
        return 0, 0

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                request = NtpHeader.unpack(data)
            except MalformedPacket:
                continue
            if request.mode != Mode.CLIENT:
                continue
            self.requests += 1
            now = time.time_ns()
            receive, transmit = self._times(now)
            answer = NtpHeader(
                leap=0, version=4, mode=Mode.SERVER, stratum=1, poll=request.poll,
                precision=-20, root_delay=0, root_dispersion=seconds_to_short(1e-4),
                reference_id=b"HSTL", reference_ts=unix_ns_to_ntp(now - NS),
                origin_ts=request.transmit_ts, receive_ts=receive, transmit_ts=transmit,
            )
            with contextlib.suppress(OSError):
                self._sock.sendto(answer.pack(), addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture(scope="module")
def good_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    server = start_ntspy_server(tmp_path_factory.mktemp("good"))
    try:
        wait_for_udp_ntp(LOOPBACK, server.ntp_port)  # it answers plain NTP too
        yield server
    finally:
        server.stop()


@pytest.fixture(params=sorted(EXPECTED_ERROR))
def hostile(request: pytest.FixtureRequest) -> Iterator[HostileNtpServer]:
    server = HostileNtpServer(request.param)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def client_procs() -> Iterator[list[ClientProc]]:
    made: list[ClientProc] = []
    try:
        yield made
    finally:
        for client in made:
            client.stop()


def start_client(procs: list[ClientProc], directory: Path, ports: list[int]) -> ClientProc:
    client = ClientProc(directory, [f"server {LOOPBACK} port {port} {POLL}" for port in ports])
    procs.append(client)
    client.start()
    return client


def table_rows(text: str) -> list[str]:
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("====="))
    return lines[rule + 1:]


def assert_no_loop_failures(client: ClientProc) -> None:
    log = client.log()
    assert "Traceback" not in log, log[-4000:]
    assert "poll round failed" not in log and "ended unexpectedly" not in log, log[-4000:]
    assert client.proc is not None and client.proc.poll() is None, "the daemon exited"


def test_hostile_source_next_to_a_good_one(
        good_server: ServerProc, hostile: HostileNtpServer,
        client_procs: list[ClientProc], tmp_path: Path) -> None:
    # Config order: the good source is row 0, the hostile one row 1.
    client = start_client(client_procs, tmp_path / "client",
                          [good_server.ntp_port, hostile.port])
    hostile_states: list[str] = []

    def good_selected() -> bool:
        good, bad = client.query("sources")
        hostile_states.append(bad["state"])
        return bool(good["state"] == "*")

    wait_until(good_selected, SYNC_TIMEOUT, f"the good source selected\n{client.log()}")
    before = hostile.requests
    assert before >= 1
    deadline = time.monotonic() + WATCH_S
    while time.monotonic() < deadline:
        good, bad = client.query("sources")
        hostile_states.append(bad["state"])
        assert good["state"] == "*", good  # and it stays selected
        time.sleep(0.2)
    assert not {"*", "+"} & set(hostile_states), hostile_states
    assert set(hostile_states) <= {"?"}, hostile_states

    # Polling the hostile server never stopped: ~0.5 s apart at maxpoll -1.
    assert hostile.requests - before >= 4, (before, hostile.requests)
    good, bad = client.query("sources")
    assert EXPECTED_ERROR[hostile.mode] in bad["last_error"], bad
    if hostile.mode in REJECTED:
        assert bad["reach"] == 0o377, bad  # it answered every poll ...
    else:
        assert bad["reach"] == 0, bad  # ... or none of them usably
    good_stats, bad_stats = client.query("sourcestats")
    assert bad_stats["np"] == 0 and good_stats["np"] >= 4  # ... and never gave a sample
    if hostile.mode in REJECTED:
        # Each dropped sample is counted under its reason, for ntpdata to show.
        bad_data = [r for r in client.query("ntpdata") if r["remote_port"] == hostile.port]
        assert bad_data and sum(bad_data[0]["bad_samples"].values()) >= 4, bad_data
        reason = EXPECTED_ERROR[hostile.mode].removeprefix("sample rejected: ")
        assert reason in bad_data[0]["bad_samples"], bad_data
        assert f"Bad samples     : {reason}: " in client.ctl("ntpdata")

    rows = table_rows(client.ctl("sources"))
    assert [row[:2] for row in rows] == ["^*", "^?"], rows
    tracking = client.query("tracking")
    assert tracking["synchronised"], tracking
    # The hostile answers said +0.5 s, -5 ms or 30 years: none got into the clock.
    assert abs(tracking["last_offset"]) < 0.01, tracking
    assert abs(tracking["system_time_offset"]) < 0.01, tracking
    assert_no_loop_failures(client)


@pytest.mark.parametrize("mode", ["negative-delay", "zero-timestamps"])
def test_a_daemon_whose_only_source_is_hostile_keeps_polling_it(
        mode: str, client_procs: list[ClientProc], tmp_path: Path) -> None:
    server = HostileNtpServer(mode)
    try:
        client = start_client(client_procs, tmp_path / "client", [server.port])
        wait_until(lambda: server.requests >= 3, SYNC_TIMEOUT,
                   f"three polls of the hostile server\n{client.log()}")
        before = server.requests
        time.sleep(WATCH_S)
        # Every 0.25-0.5 s: well beyond several more polls, not one and silence.
        assert server.requests - before >= 5, (before, server.requests)
        (row,) = client.query("sources")
        assert row["state"] == "?" and EXPECTED_ERROR[mode] in row["last_error"], row
        assert row["reach"] == (0o377 if mode in REJECTED else 0), row
        (stats,) = client.query("sourcestats")
        assert stats["np"] == 0
        tracking = client.query("tracking")
        assert not tracking["synchronised"], tracking
        assert tracking["system_time_offset"] == 0.0, tracking
        assert [row[:2] for row in table_rows(client.ctl("sources"))] == ["^?"]
        assert_no_loop_failures(client)
    finally:
        server.close()
