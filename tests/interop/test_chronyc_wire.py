"""Debian's chronyc 4.3 against a stand-in server built on ntspy.control.candm.

The server here is a thread answering from fixed values, over UDP on
127.0.0.1 (and ::1 when there is one) on ports the kernel picks, and over a
Unix datagram socket in a fresh directory under /tmp.  Each chronyc run is
one command under ``timeout``; the test checks that chronyc prints exactly
the values encoded (its -c CSV output, and human-readable output for
``tracking`` and ``sources -v``), that it gets chrony's refusal over UDP for
the commands chrony keeps to the Unix socket, and what its changing commands
put on the wire.  Nothing leaves loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import math
import os
import selectors
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ntspy.control import candm
from ntspy.control.candm import (
    Activity,
    AddressArg,
    AddSource,
    AddSourceFlag,
    AuthData,
    AuthMode,
    BurstArgs,
    ClientAccess,
    ClientAccesses,
    ClientAccessesQuery,
    Command,
    MakestepArgs,
    MaskAddress,
    NoArgs,
    NSources,
    NtpData,
    NtpSourceName,
    ReplyBody,
    Request,
    RequestError,
    SelectData,
    SelectOption,
    ServerStats,
    SourceData,
    SourceId,
    SourceIndex,
    SourceMode,
    SourceState,
    SourceStats,
    Status,
    Tracking,
    wire_round,
)

CHRONYC = shutil.which("chronyc") or "/usr/bin/chronyc"

IP4 = ipaddress.IPv4Address("192.0.2.1")
IP6 = ipaddress.IPv6Address("2001:db8::5")
LOCAL4 = ipaddress.IPv4Address("127.0.0.1")
UNRESOLVED = SourceId(1)

SOURCES = (
    SourceData(IP4, poll=6, stratum=2, state=SourceState.SELECTED, mode=SourceMode.CLIENT,
               reachability=0o377, since_sample=12, orig_latest_meas=0.000123,
               latest_meas=-0.0000456, latest_meas_err=0.0000789),
    SourceData(IP6, poll=10, stratum=3, state=SourceState.SELECTABLE, mode=SourceMode.CLIENT,
               reachability=0o17, since_sample=3000, orig_latest_meas=0.25,
               latest_meas=0.0312, latest_meas_err=1.5),
    SourceData(UNRESOLVED, poll=6, stratum=0, state=SourceState.NONSELECTABLE,
               mode=SourceMode.CLIENT, since_sample=0xFFFFFFFF),
)  # fmt: skip
STATS = (
    SourceStats(0xC0000201, IP4, n_samples=12, n_runs=7, span_seconds=700, sd=0.0000123,
                resid_freq_ppm=-0.012, skew_ppm=0.5, est_offset=0.0000021,
                est_offset_err=0.0000034),
    SourceStats(0x12345678, IP6, n_samples=4, n_runs=3, span_seconds=90000, sd=0.002,
                resid_freq_ppm=123.456, skew_ppm=2000.5, est_offset=-0.0312,
                est_offset_err=0.01),
    SourceStats(0, UNRESOLVED),
)  # fmt: skip
SELECT = (
    SelectData(0xC0000201, IP4, state_char="*", authentication=True, leap=0,
               conf_options=SelectOption.PREFER | SelectOption.TRUST,
               eff_options=SelectOption.PREFER, last_sample_ago=12, score=1.25,
               lo_limit=-0.0001, hi_limit=0.0002),
    SelectData(0x12345678, IP6, state_char="+", authentication=False, leap=3,
               conf_options=SelectOption.NOSELECT | SelectOption.REQUIRE,
               eff_options=SelectOption.NOSELECT, last_sample_ago=3000, score=7.5,
               lo_limit=-0.5, hi_limit=0.25),
    SelectData(0, UNRESOLVED, state_char="N"),
)  # fmt: skip
TRACKING = Tracking(
    ref_id=0xC0000201, address=IP4, stratum=3, leap_status=0, ref_time=1_700_000_000.5,
    current_correction=0.0000123, last_offset=-0.00000123, rms_offset=0.000002,
    freq_ppm=-12.345, resid_freq_ppm=0.001, skew_ppm=0.05, root_delay=0.001234,
    root_dispersion=0.000567, last_update_interval=64.0,
)  # fmt: skip
NTPDATA = {
    IP4: NtpData(IP4, LOCAL4, remote_port=123, leap=0, version=4, mode=4, stratum=1, poll=6,
                 precision=-25, root_delay=0.000015, root_dispersion=0.000031,
                 ref_id=0x47505300, ref_time=1_700_000_100.25, offset=-0.000012,
                 peer_delay=0.000234, peer_dispersion=0.0000012, response_time=0.0000456,
                 jitter_asymmetry=0.12, tests=0b1111111111, interleaved=False,
                 authenticated=True, tx_tss_char="K", rx_tss_char="H", total_tx_count=100,
                 total_rx_count=99, total_valid_count=98, total_good_count=97),
    IP6: NtpData(IP6, ipaddress.IPv6Address("::1"), remote_port=1123, leap=3, version=3,
                 mode=4, stratum=4, poll=10, precision=-20, root_delay=0.5,
                 root_dispersion=0.25, ref_id=0xC0000264, ref_time=1_600_000_000.0,
                 offset=0.0312, peer_delay=0.04, peer_dispersion=0.001, response_time=0.002,
                 jitter_asymmetry=-0.5, tests=0b1010011001, interleaved=True,
                 authenticated=False, total_tx_count=5, total_rx_count=4,
                 total_valid_count=3, total_good_count=2),
}  # fmt: skip
AUTHDATA = {
    IP4: AuthData(mode=AuthMode.NTS, key_type=15, key_id=0, key_length=256, ke_attempts=1,
                  last_ke_ago=1234, cookies=8, cookie_length=104, nak=False),
    IP6: AuthData(mode=AuthMode.SYMMETRIC, key_type=2, key_id=42, key_length=160,
                  ke_attempts=0, last_ke_ago=0xFFFFFFFF, cookies=0, cookie_length=0, nak=True),
}  # fmt: skip
NAMES = {IP4: "ntp1.example.net", IP6: "ntp2.example.net"}
ACTIVITY = Activity(online=2, offline=1, burst_online=0, burst_offline=3, unresolved=1)
SERVERSTATS = ServerStats(ntp_hits=1000, nke_hits=20, cmd_hits=30, ntp_drops=4, nke_drops=5,
                          cmd_drops=6, log_drops=7, ntp_auth_hits=800, ntp_interleaved_hits=9,
                          ntp_timestamps=300, ntp_span_seconds=3600)  # fmt: skip
CLIENTS = tuple(
    ClientAccess(ipaddress.IPv4Address(f"198.51.100.{i + 1}"), ntp_hits=100 + i, nke_hits=i,
                 cmd_hits=2 * i, ntp_drops=i % 3, nke_drops=0, cmd_drops=1, ntp_interval=6,
                 nke_interval=127, cmd_interval=-2, ntp_timeout_interval=5,
                 last_ntp_hit_ago=10 + i, last_nke_hit_ago=0xFFFFFFFF, last_cmd_hit_ago=i)
    for i in range(10)
)  # fmt: skip


@dataclass
class FakeChronyd:
    """Answers chronyc with candm; records what it got."""

    directory: Path
    udp: list[socket.socket] = field(default_factory=list)
    unix: socket.socket | None = None
    received: list[tuple[str, Request]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    errors: list[RequestError] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return str(self.directory / "chronyd.sock")

    def port(self, family: int = socket.AF_INET) -> int:
        for sock in self.udp:
            if sock.family == family:
                return int(sock.getsockname()[1])
        raise LookupError("no such socket")

    def start(self) -> None:
        s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s4.bind(("127.0.0.1", 0))
        self.udp.append(s4)
        with contextlib.suppress(OSError):
            s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            try:
                s6.bind(("::1", 0))
            except OSError:
                s6.close()
                raise
            self.udp.append(s6)
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.unix.bind(self.path)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for sock in [*self.udp, self.unix]:
            if sock is not None:
                sock.close()

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            for sock in [*self.udp, self.unix]:
                assert sock is not None
                sel.register(sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    ready = key.fileobj
                    assert isinstance(ready, socket.socket)
                    data, peer = ready.recvfrom(4096)
                    reply = self.answer(data, unix=ready is self.unix)
                    if reply is not None:
                        ready.sendto(reply, peer)

    def answer(self, data: bytes, *, unix: bool) -> bytes | None:
        request = candm.parse_request(data)
        if isinstance(request, RequestError):
            self.errors.append(request)
            return request.reply
        self.received.append(("unix" if unix else "udp", request))
        self.raw.append(data)
        if not candm.is_allowed(request.command, unix_socket=unix):
            return candm.build_reply(request, Status.UNAUTH)
        status, body = self.handle(request)
        return candm.build_reply(request, status, body)

    def handle(self, request: Request) -> tuple[int, ReplyBody | None]:
        body = request.body
        cmd = request.command
        if cmd == Command.N_SOURCES:
            return Status.SUCCESS, NSources(len(SOURCES))
        if cmd in (Command.SOURCE_DATA, Command.SOURCESTATS, Command.SELECT_DATA):
            assert isinstance(body, SourceIndex)
            table: tuple[ReplyBody, ...] = (
                SOURCES if cmd == Command.SOURCE_DATA
                else STATS if cmd == Command.SOURCESTATS
                else SELECT
            )  # fmt: skip
            if body.index >= len(table):
                return Status.NOSUCHSOURCE, None
            return Status.SUCCESS, table[body.index]
        if cmd in (Command.NTP_DATA, Command.AUTH_DATA, Command.NTP_SOURCE_NAME):
            assert isinstance(body, AddressArg)
            if body.address not in NAMES:
                return Status.NOSUCHSOURCE, None
            assert isinstance(body.address, ipaddress.IPv4Address | ipaddress.IPv6Address)
            if cmd == Command.NTP_DATA:
                return Status.SUCCESS, NTPDATA[body.address]
            if cmd == Command.AUTH_DATA:
                return Status.SUCCESS, AUTHDATA[body.address]
            return Status.SUCCESS, NtpSourceName(NAMES[body.address])
        if cmd == Command.TRACKING:
            return Status.SUCCESS, TRACKING
        if cmd == Command.ACTIVITY:
            return Status.SUCCESS, ACTIVITY
        if cmd == Command.SERVER_STATS:
            return Status.SUCCESS, SERVERSTATS
        if cmd == Command.CLIENT_ACCESSES_BY_INDEX3:
            assert isinstance(body, ClientAccessesQuery)
            picked = CLIENTS[body.first_index : body.first_index + min(body.n_clients, 8)]
            return Status.SUCCESS, ClientAccesses(
                len(CLIENTS), body.first_index + len(picked), picked
            )
        if cmd == Command.DEL_SOURCE:
            assert isinstance(body, AddressArg)
            if body.address not in NAMES and body.address != UNRESOLVED:
                return Status.NOSUCHSOURCE, None
            return Status.SUCCESS, None
        if cmd == Command.ADD_SOURCE:
            assert isinstance(body, AddSource)
            return body.check(), None
        return Status.SUCCESS, None

    def last(self, transport: str | None = None) -> Request:
        for where, request in reversed(self.received):
            if transport is None or where == transport:
                return request
        raise LookupError("nothing received")


@pytest.fixture
def server() -> Iterator[FakeChronyd]:
    # A short directory: Unix socket paths are limited to 108 bytes.  chronyc
    # binds its own socket next to ours, as chronyc.<pid>.sock.
    directory = Path(tempfile.mkdtemp(prefix="candm-", dir="/tmp"))
    fake = FakeChronyd(directory)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
        shutil.rmtree(directory, ignore_errors=True)


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


def chronyc(server: FakeChronyd, where: str, *command: str, csv: bool = True) -> Run:
    if where == "unix":
        target = ["-h", server.path]
    elif where == "udp6":
        target = ["-h", "::1", "-p", str(server.port(socket.AF_INET6))]
    else:
        target = ["-h", "127.0.0.1", "-p", str(server.port())]
    argv = ["timeout", "10", CHRONYC, *target, "-n", *(["-c"] if csv else []), *command]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=15, env=env, check=False)
    return Run(proc.returncode, proc.stdout, proc.stderr)


# ---------------------------------------------------------------------------
# chronyc's printing, redone for the expected values


def f(x: float, digits: int = 9) -> str:
    return f"{wire_round(x):.{digits}f}"


def ts(t: float) -> str:
    raw = candm.pack_timespec(t)
    high, low, nanos = int.from_bytes(raw[:4]), int.from_bytes(raw[4:8]), int.from_bytes(raw[8:])
    return f"{(high << 32) | low}.{nanos:09d}"


def leap(value: int) -> str:
    return {0: "Normal", 1: "Insert second", 2: "Delete second", 3: "Not synchronised"}.get(
        value, "Invalid"
    )


def refid_of(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv4Address):
        return f"{int(address):08X}"
    return hashlib.md5(address.packed, usedforsecurity=False).digest()[:4].hex().upper()


def seconds_col(s: int) -> str:
    if s == 0xFFFFFFFF:
        return "   -"
    if s < 1200:
        return f"{s:4d}"
    if s < 36000:
        return f"{s // 60:3d}m"
    if s < 345600:
        return f"{s // 3600:3d}h"
    days = s // 86400
    return f"{days // 365:3d}y" if days > 999 else f"{days:3d}d"


SMALL_UNITS = ((9999.5e-9, 1e9, "ns"), (9999.5e-6, 1e6, "us"), (9999.5e-3, 1e3, "ms"))


def signed_ns(s: float) -> str:
    x = abs(s)
    for limit, scale, unit in SMALL_UNITS:
        if x < limit:
            return f"{s * scale:+5.0f}{unit}"
    if x < 999.5:
        return f"{s:+6.1f}s"
    return f"{s:+6.0f}s"


def unsigned_ns(s: float) -> str:
    x = abs(s)
    for limit, scale, unit in SMALL_UNITS:
        if x < limit:
            return f"{x * scale:4.0f}{unit}"
    if x < 999.5:
        return f"{x:5.1f}s"
    return f"{x:5.0f}s"


def csv_lines(*rows: Sequence[object]) -> str:
    return "".join(",".join(str(v) for v in row) + "\n" for row in rows)


def real_sources() -> list[SourceData]:
    return [s for s in SOURCES if not isinstance(s.address, SourceId)]


# ---------------------------------------------------------------------------
# Monitoring commands


def expected_tracking_csv() -> str:
    t = TRACKING
    return csv_lines([
        f"{t.ref_id:08X}", str(t.address), t.stratum, ts(t.ref_time), f(t.current_correction),
        f(t.last_offset), f(t.rms_offset), f(t.freq_ppm, 3), f(t.resid_freq_ppm, 3),
        f(t.skew_ppm, 3), f(t.root_delay), f(t.root_dispersion), f(t.last_update_interval, 1),
        leap(t.leap_status),
    ])  # fmt: skip


def expected_sources_csv() -> str:
    mode = {0: "^", 1: "=", 2: "#"}
    state = {0: "*", 1: "?", 2: "x", 3: "~", 4: "+", 5: "-"}
    return csv_lines(*[
        [mode[s.mode], state[s.state], str(s.address), s.stratum, s.poll,
         f"{s.reachability:o}", s.since_sample, f(s.latest_meas), f(s.orig_latest_meas),
         f(s.latest_meas_err)]
        for s in real_sources()
    ])  # fmt: skip


def expected_sourcestats_csv() -> str:
    return csv_lines(*[
        [str(s.address), s.n_samples, s.n_runs, s.span_seconds, f(s.resid_freq_ppm, 3),
         f(s.skew_ppm, 3), f(s.est_offset), f(s.sd)]
        for s in STATS if not isinstance(s.address, SourceId)
    ])  # fmt: skip


def expected_authdata_csv() -> str:
    rows = []
    for s in real_sources():
        assert isinstance(s.address, ipaddress.IPv4Address | ipaddress.IPv6Address)
        a = AUTHDATA[s.address]
        mode = {0: "-", 1: "SK", 2: "NTS"}[a.mode]
        rows.append([str(s.address), mode, a.key_id, a.key_type, a.key_length, a.last_ke_ago,
                     a.ke_attempts, int(a.nak), a.cookies, a.cookie_length])  # fmt: skip
    return csv_lines(*rows)


def expected_ntpdata_csv(d: NtpData) -> str:
    assert isinstance(d.remote_address, ipaddress.IPv4Address | ipaddress.IPv6Address)
    assert isinstance(d.local_address, ipaddress.IPv4Address | ipaddress.IPv6Address)
    flags = d.tests | (0x4000 if d.interleaved else 0) | (0x8000 if d.authenticated else 0)
    mode = {1: "Symmetric active", 2: "Symmetric passive", 4: "Server"}.get(d.mode, "Invalid")
    tss = {"D": "Daemon", "K": "Kernel", "H": "Hardware"}

    def bits(value: int, n: int) -> str:
        return format(value & ((1 << n) - 1), f"0{n}b")

    return csv_lines([
        str(d.remote_address), refid_of(d.remote_address), d.remote_port,
        str(d.local_address), refid_of(d.local_address), leap(d.leap), d.version, mode,
        d.stratum, d.poll, f"{2.0 ** d.poll:.0f}", d.precision, f"{2.0 ** d.precision:.9f}",
        f(d.root_delay, 6), f(d.root_dispersion, 6), f"{d.ref_id:08X}",
        candm.refid_to_string(d.ref_id) if d.stratum <= 1 else "", ts(d.ref_time),
        f(d.offset), f(d.peer_delay), f(d.peer_dispersion), f(d.response_time),
        f(d.jitter_asymmetry, 2), bits(flags >> 7, 3), bits(flags >> 4, 3), bits(flags, 4),
        "Yes" if d.interleaved else "No", "Yes" if d.authenticated else "No",
        tss.get(d.tx_tss_char, "Invalid"), tss.get(d.rx_tss_char, "Invalid"),
        d.total_tx_count, d.total_rx_count, d.total_valid_count, d.total_good_count,
    ])  # fmt: skip


def expected_selectdata_csv() -> str:
    def opts(o: int) -> list[str]:
        return ["N" if o & 1 else "-", "P" if o & 2 else "-", "T" if o & 4 else "-",
                "R" if o & 8 else "-", "-"]  # fmt: skip

    return csv_lines(*[
        [s.state_char, str(s.address), "Y" if s.authentication else "N", *opts(s.conf_options),
         *opts(s.eff_options), s.last_sample_ago, f(s.score, 1), f(s.lo_limit), f(s.hi_limit),
         leap(s.leap)]
        for s in SELECT if not isinstance(s.address, SourceId)
    ])  # fmt: skip


def expected_serverstats_csv() -> str:
    s = SERVERSTATS
    return csv_lines([s.ntp_hits, s.ntp_drops, s.cmd_hits, s.cmd_drops, s.log_drops, s.nke_hits,
                      s.nke_drops, s.ntp_auth_hits, s.ntp_interleaved_hits, s.ntp_timestamps,
                      s.ntp_span_seconds])  # fmt: skip


def expected_clients_csv(nke: bool = False) -> str:
    return csv_lines(*[
        [str(c.address), c.ntp_hits, c.ntp_drops, c.ntp_interval, c.ntp_timeout_interval,
         c.last_ntp_hit_ago, c.nke_hits if nke else c.cmd_hits,
         c.nke_drops if nke else c.cmd_drops, c.nke_interval if nke else c.cmd_interval,
         c.last_nke_hit_ago if nke else c.last_cmd_hit_ago]
        for c in CLIENTS
    ])  # fmt: skip


OPEN_OVER_UDP: dict[str, Callable[[], str]] = {
    "tracking": expected_tracking_csv,
    "sources": expected_sources_csv,
    "sourcestats": expected_sourcestats_csv,
    "activity": lambda: csv_lines([ACTIVITY.online, ACTIVITY.offline, ACTIVITY.burst_online,
                                   ACTIVITY.burst_offline, ACTIVITY.unresolved]),
}  # fmt: skip
UNIX_ONLY: dict[str, Callable[[], str]] = {
    "authdata": expected_authdata_csv,
    "ntpdata": lambda: "".join(expected_ntpdata_csv(NTPDATA[s.address]) for s in real_sources()
                               if isinstance(s.address, ipaddress.IPv4Address
                                             | ipaddress.IPv6Address)),
    "serverstats": expected_serverstats_csv,
    "clients": expected_clients_csv,
    "selectdata": expected_selectdata_csv,
}  # fmt: skip


@pytest.mark.parametrize("command", sorted({**OPEN_OVER_UDP, **UNIX_ONLY}))
def test_monitoring_over_unix_socket_prints_our_values(server: FakeChronyd, command: str) -> None:
    run = chronyc(server, "unix", command)
    assert (run.code, run.err) == (0, ""), run
    expected = {**OPEN_OVER_UDP, **UNIX_ONLY}[command]()
    assert run.out == expected
    assert not server.errors  # every request chronyc sent parsed, padding and all


@pytest.mark.parametrize("command", sorted(OPEN_OVER_UDP))
def test_open_commands_over_udp(server: FakeChronyd, command: str) -> None:
    run = chronyc(server, "udp", command)
    assert (run.code, run.err) == (0, ""), run
    assert run.out == OPEN_OVER_UDP[command]()
    assert {where for where, _ in server.received} == {"udp"}


def test_tracking_over_udp6(server: FakeChronyd) -> None:
    # CI machines have ::1 (the daemon tests use it too): no IPv6 socket is a failure.
    assert len(server.udp) == 2, "the stand-in server could not listen on ::1"
    run = chronyc(server, "udp6", "tracking")
    assert (run.code, run.out) == (0, expected_tracking_csv()), run


@pytest.mark.parametrize("command", sorted(UNIX_ONLY))
def test_unix_only_reports_are_refused_over_udp(server: FakeChronyd, command: str) -> None:
    run = chronyc(server, "udp", command)
    assert run.code == 1
    assert run.out.splitlines()[-1] == "501 Not authorised"


def test_requests_have_chronyc_lengths(server: FakeChronyd) -> None:
    for line in ("tracking", "sources", "sourcestats", "ntpdata", "authdata", "clients",
                 "selectdata", "serverstats", "activity"):  # fmt: skip
        assert chronyc(server, "unix", line).code == 0
    seen = {request.command: request.length for _, request in server.received}
    for command, length in seen.items():
        assert length == candm.request_length(command), Command(command).name
    assert seen[Command.CLIENT_ACCESSES_BY_INDEX3] == 520  # the longest padding
    assert seen[Command.TRACKING] == 104
    for (_, request), raw in zip(server.received, server.raw, strict=True):
        assert raw == candm.build_request(
            request.command, request.body, sequence=request.sequence, attempt=request.attempt
        )


def test_tracking_human_readable(server: FakeChronyd) -> None:
    run = chronyc(server, "unix", "tracking", csv=False)
    assert run.code == 0, run
    t = TRACKING
    ref_time = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(math.floor(t.ref_time)))
    corr = wire_round(t.current_correction)
    freq = wire_round(t.freq_ppm)
    expected = (
        f"Reference ID    : {t.ref_id:08X} ({t.address})\n"
        f"Stratum         : {t.stratum}\n"
        f"Ref time (UTC)  : {ref_time}\n"
        f"System time     : {abs(corr):.9f} seconds {'slow' if corr > 0 else 'fast'} of NTP time\n"
        f"Last offset     : {wire_round(t.last_offset):+.9f} seconds\n"
        f"RMS offset      : {f(t.rms_offset)} seconds\n"
        f"Frequency       : {abs(freq):.3f} ppm {'fast' if freq > 0 else 'slow'}\n"
        f"Residual freq   : {wire_round(t.resid_freq_ppm):+.3f} ppm\n"
        f"Skew            : {f(t.skew_ppm, 3)} ppm\n"
        f"Root delay      : {f(t.root_delay)} seconds\n"
        f"Root dispersion : {f(t.root_dispersion)} seconds\n"
        f"Update interval : {f(t.last_update_interval, 1)} seconds\n"
        f"Leap status     : {leap(t.leap_status)}\n"
    )
    assert run.out == expected


def test_sources_verbose_human_readable(server: FakeChronyd) -> None:
    run = chronyc(server, "unix", "sources", "-v", csv=False)
    assert run.code == 0, run
    lines = run.out.splitlines()
    assert lines[0] == ""
    assert "Source mode" in lines[1]
    header = lines.index(next(line for line in lines if line.startswith("MS Name/IP address")))
    assert set(lines[header + 1]) == {"="}
    rows = lines[header + 2 :]
    state = {0: "*", 1: "?", 2: "x", 3: "~", 4: "+", 5: "-"}
    expected = [
        f"^{state[s.state]} {s.address!s:<27}  {s.stratum:2d}  {s.poll:2d}   "
        f"{s.reachability:3o}  {seconds_col(s.since_sample)}  "
        f"{signed_ns(wire_round(s.latest_meas))}[{signed_ns(wire_round(s.orig_latest_meas))}]"
        f" +/- {unsigned_ns(wire_round(s.latest_meas_err))}"
        for s in real_sources()
    ]
    assert rows == expected


def test_sources_all_and_names(server: FakeChronyd) -> None:
    run = chronyc(server, "udp", "sources", "-a")
    assert run.code == 0, run
    assert run.out.splitlines()[-1].split(",")[:3] == ["^", "?", str(UNRESOLVED)]
    # -N asks NTP_SOURCE_NAME (open over UDP) for each source.
    argv = ["timeout", "10", CHRONYC, "-h", "127.0.0.1", "-p", str(server.port()), "-N", "-c",
            "sources"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    assert proc.returncode == 0, proc
    assert [line.split(",")[2] for line in proc.stdout.splitlines()] == [
        NAMES[IP4],
        NAMES[IP6],
    ]


def test_ntpdata_for_one_address_and_unknown_one(server: FakeChronyd) -> None:
    run = chronyc(server, "unix", "ntpdata", str(IP6))
    assert (run.code, run.out) == (0, expected_ntpdata_csv(NTPDATA[IP6])), run
    run = chronyc(server, "unix", "ntpdata", "192.0.2.99")
    assert (run.code, run.out) == (1, "503 No such source\n")


def test_clients_pages_and_nke_columns(server: FakeChronyd) -> None:
    run = chronyc(server, "unix", "clients", "-k", "-p", "3", "-r")
    assert (run.code, run.out) == (0, expected_clients_csv(nke=True)), run
    queries = [r.body for _, r in server.received if r.command == Command.CLIENT_ACCESSES_BY_INDEX3]
    assert queries == [
        ClientAccessesQuery(first_index=0, n_clients=8, min_hits=3, reset=True),
        ClientAccessesQuery(first_index=8, n_clients=8, min_hits=3, reset=True),
    ]


def test_waitsync_polls_tracking(server: FakeChronyd) -> None:
    run = chronyc(server, "udp", "waitsync", "1", "0.01")
    assert run.code == 0, run
    assert run.out == csv_lines([1, f"{TRACKING.ref_id:08X}", f(abs(TRACKING.current_correction)),
                                 f(TRACKING.skew_ppm, 3)])  # fmt: skip


# ---------------------------------------------------------------------------
# Changing commands

MASK32 = ipaddress.IPv4Address("255.255.255.255")

CHANGING: list[tuple[str, int, object]] = [
    ("burst 2/4", Command.BURST, BurstArgs(None, None, 2, 4)),
    ("burst 1/3 192.0.2.1", Command.BURST, BurstArgs(MASK32, IP4, 1, 3)),
    ("delete 192.0.2.1", Command.DEL_SOURCE, AddressArg(IP4)),
    ("delete ID#0000000001", Command.DEL_SOURCE, AddressArg(UNRESOLVED)),
    ("offline", Command.OFFLINE, MaskAddress(None, None)),
    ("offline 192.0.2.1", Command.OFFLINE, MaskAddress(MASK32, IP4)),
    ("online 192.0.2.0/24", Command.ONLINE,
     MaskAddress(ipaddress.IPv4Address("255.255.255.0"), ipaddress.IPv4Address("192.0.2.0"))),
    ("onoffline", Command.ONOFFLINE, NoArgs()),
    ("makestep", Command.MAKESTEP, NoArgs()),
    ("makestep 0.1 3", Command.MODIFY_MAKESTEP, MakestepArgs(3, wire_round(0.1))),
    ("shutdown", Command.SHUTDOWN, NoArgs()),
    ("dump", Command.DUMP, NoArgs()),
    ("cyclelogs", Command.CYCLELOGS, NoArgs()),
    ("refresh", Command.REFRESH, NoArgs()),
    ("rekey", Command.REKEY, NoArgs()),
    ("reload sources", Command.RELOAD_SOURCES, NoArgs()),
    ("add server 192.0.2.7", Command.ADD_SOURCE, AddSource(name="192.0.2.7")),
    ("add server 192.0.2.7 iburst nts prefer trust require noselect minpoll 4 maxpoll 8 "
     "port 1123 ntsport 4461 maxdelay 0.5 maxdelayratio 2 maxdelaydevratio 3 mindelay 0.001 "
     "asymmetry 0.5 offset 0.25 minstratum 2 polltarget 12 version 3 minsamples 4 "
     "maxsamples 16 filter 3 key 7 certset 1 maxdelayquant 0.9 xleave copy extfield F323 "
     "burst auto_offline offline presend 9",
     Command.ADD_SOURCE,
     AddSource(
         name="192.0.2.7", port=1123, minpoll=4, maxpoll=8, presend_minpoll=9, min_stratum=2,
         poll_target=12, version=3, min_samples=4, max_samples=16, authkey=7, nts_port=4461,
         max_delay=wire_round(0.5), max_delay_ratio=2.0, max_delay_dev_ratio=3.0,
         min_delay=wire_round(0.001), asymmetry=0.5, offset=0.25, filter_length=3, cert_set=1,
         max_delay_quant=wire_round(0.9),
         flags=AddSourceFlag.IBURST | AddSourceFlag.NTS | AddSourceFlag.PREFER
         | AddSourceFlag.TRUST | AddSourceFlag.REQUIRE | AddSourceFlag.NOSELECT
         | AddSourceFlag.INTERLEAVED | AddSourceFlag.COPY | AddSourceFlag.EF_EXP1
         | AddSourceFlag.BURST | AddSourceFlag.AUTOOFFLINE,
     )),
    ("add pool 192.0.2.8 maxsources 2", Command.ADD_SOURCE,
     AddSource(source_type=candm.SourceType.POOL, name="192.0.2.8", max_sources=2)),
]  # fmt: skip


@pytest.mark.parametrize(("line", "command", "body"), CHANGING, ids=[c[0][:30] for c in CHANGING])
def test_changing_commands_over_unix_socket(
    server: FakeChronyd, line: str, command: int, body: object
) -> None:
    run = chronyc(server, "unix", *line.split())
    assert (run.code, run.out, run.err) == (0, "200 OK\n", ""), run
    request = server.last("unix")
    assert request.command == command
    assert request.body == body
    assert request.length == candm.request_length(command)
    assert not server.errors
    # Byte for byte what ntspy's client side would send for the same command.
    assert server.raw[-1] == candm.build_request(
        command, request.body, sequence=request.sequence, attempt=request.attempt
    )


@pytest.mark.parametrize("line", ["burst 2/4", "delete 192.0.2.1", "makestep 0.1 3", "shutdown"])
def test_changing_commands_refused_over_udp(server: FakeChronyd, line: str) -> None:
    run = chronyc(server, "udp", *line.split())
    assert (run.code, run.out) == (1, "501 Not authorised\n"), run
    assert server.last("udp").command == CHANGING[[c[0] for c in CHANGING].index(line)][1]


def test_status_from_the_server_reaches_chronyc(server: FakeChronyd) -> None:
    run = chronyc(server, "unix", "delete", "192.0.2.99")
    assert (run.code, run.out) == (1, "503 No such source\n")


def test_chronyc_socket_lives_next_to_ours_and_goes_away(server: FakeChronyd) -> None:
    assert chronyc(server, "unix", "tracking").code == 0
    # chronyc bound <dir>/chronyc.<pid>.sock for the exchange and removed it.
    assert sorted(p.name for p in server.directory.iterdir()) == ["chronyd.sock"]
