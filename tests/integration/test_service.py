"""``ntspy run`` as a service: SIGHUP, refusing to start without the clock capability,
and chronyd's log lines.

Every daemon here runs under ``setpriv`` without CAP_SYS_TIME; the one started
without ``-x`` is there to show that it then refuses to start at all.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_helpers import ClientProc, wait_until
from tests.peers import LOOPBACK, NO_SYS_TIME, ServerProc, start_ntspy_server, wait_for_udp_ntp

POLL = "minpoll -2 maxpoll -1"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    proc = start_ntspy_server(tmp_path_factory.mktemp("server"))
    try:
        wait_for_udp_ntp(LOOPBACK, proc.ntp_port)
        yield proc
    finally:
        proc.stop()


def test_a_daemon_that_should_steer_the_clock_refuses_without_cap_sys_time(
        server: ServerProc, tmp_path: Path) -> None:
    conf = tmp_path / "client.conf"
    conf.write_text(f"server {LOOPBACK} port {server.ntp_port} {POLL}\n"
                    f"bindcmdaddress {tmp_path / 'client.sock'}\ncmdport 0\n"
                    f"pidfile {tmp_path / 'client.pid'}\n")
    # Without -x: it must exit at once with a clear message, not poll and fail forever.
    out = subprocess.run([*NO_SYS_TIME, sys.executable, "-m", "ntspy", "run", "-f", str(conf)],
                         capture_output=True, text=True, timeout=30, check=False,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 1, out
    assert "CAP_SYS_TIME" in out.stderr and "-x" in out.stderr, out.stderr
    assert not (tmp_path / "client.sock").exists()  # it never got as far as serving status


def test_sighup_reloads_sourcedir_and_the_daemon_goes_on(
        server: ServerProc, tmp_path: Path) -> None:
    srcdir = tmp_path / "sources.d"
    srcdir.mkdir()
    (srcdir / "a.sources").write_text(f"server {LOOPBACK} port {server.ntp_port} {POLL}\n")
    client = ClientProc(tmp_path / "client", [], [f"sourcedir {srcdir}"])
    try:
        client.start()
        wait_until(lambda: [s for s in client.states() if s[1] == "*"], 20.0,
                   f"a selected source\n{client.log()}")
        before = client.query("tracking")["updates"]
        # A second file appears (a DHCP hook, say); SIGHUP, as after editing chrony's sources.
        (srcdir / "b.sources").write_text(f"server localhost port {server.ntp_port} {POLL}\n")
        assert client.proc is not None
        client.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(client.states()) == 2, 20.0, f"two sources\n{client.log()}")
        assert client.proc.poll() is None, client.log()
        # Still running and still updating the (virtual) clock.
        wait_until(lambda: client.query("tracking")["updates"] > before + 2, 20.0,
                   f"more clock updates\n{client.log()}")
        log = client.log()
        assert "received SIGHUP" in log and "1 added, 0 removed" in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    finally:
        assert client.stop() == 0  # a clean exit after all that


def test_log_lines_in_chronyds_words(server: ServerProc, tmp_path: Path) -> None:
    client = ClientProc(tmp_path / "client",
                        [f"server {LOOPBACK} port {server.ntp_port} {POLL}"])
    try:
        client.start()
        wait_until(lambda: "Selected source 127.0.0.1" in client.log(), 20.0,
                   f"chronyd's 'Selected source' line\n{client.log()}")
    finally:
        client.stop()


def run_ntspy(*args: str, timeout: float = 40.0,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NO_SYS_TIME, sys.executable, "-m", "ntspy", "run", *args],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL, env=env)


def test_measure_once_with_directives_on_the_command_line(server: ServerProc) -> None:
    # The seed article's `chronyd -Q 'server ... iburst'`, as `ntspy run -Q '...'`.
    out = run_ntspy("-Q", f"server {LOOPBACK} port {server.ntp_port} iburst")
    assert out.returncode == 0, out
    line = out.stdout.strip()
    assert line.startswith("System clock wrong by ") and line.endswith(" seconds (ignored)"), out
    assert abs(float(line.split()[4])) < 0.05  # the same machine's clock, give or take


def test_measure_once_without_an_answer_says_so_and_fails(tmp_path: Path) -> None:
    out = run_ntspy("-Q", "-t", "3", f"server {LOOPBACK} port 9 iburst")  # discard: silence
    assert out.returncode == 1, out
    assert "No suitable source for synchronisation" in out.stderr, out


def test_set_once_needs_cap_sys_time(server: ServerProc) -> None:
    out = run_ntspy("-q", f"server {LOOPBACK} port {server.ntp_port} iburst")
    assert out.returncode == 1 and "CAP_SYS_TIME" in out.stderr, out


def test_default_config_file_missing_is_a_clear_error() -> None:
    if Path("/etc/ntspy/ntspy.conf").exists():  # a machine set up for real: -f elsewhere
        out = run_ntspy("-x", "-f", "/nonexistent/ntspy.conf")
        assert out.returncode == 1 and "/nonexistent/ntspy.conf" in out.stderr, out
        return
    out = run_ntspy("-x")
    assert out.returncode == 1, out
    assert "/etc/ntspy/ntspy.conf" in out.stderr and "-f FILE" in out.stderr, out.stderr


def test_log_file_and_chrony_levels(server: ServerProc, tmp_path: Path) -> None:
    logfile = tmp_path / "ntspy.log"
    out = run_ntspy("-Q", "-l", str(logfile), "-L", "0",
                    f"server {LOOPBACK} port {server.ntp_port} iburst")
    assert out.returncode == 0, out
    text = logfile.read_text()
    assert "Selected source 127.0.0.1" in text and out.stderr == "", (text, out.stderr)
    quiet = tmp_path / "quiet.log"
    out = run_ntspy("-Q", "-l", str(quiet), "-L", "2",
                    f"server {LOOPBACK} port {server.ntp_port} iburst")
    assert out.returncode == 0 and "Selected source" not in quiet.read_text(), out


def test_journald_lines_carry_priorities_and_no_timestamps(server: ServerProc) -> None:
    import os
    env = {**os.environ, "JOURNAL_STREAM": "8:12345"}
    out = run_ntspy("-Q", f"server {LOOPBACK} port {server.ntp_port} iburst", env=env)
    assert out.returncode == 0, out
    lines = [line for line in out.stderr.splitlines() if "Selected source" in line]
    assert lines and lines[0].startswith("<6>ntspy.client: Selected source"), out.stderr


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def test_user_drops_root_and_the_daemon_goes_on(server: ServerProc) -> None:
    import os
    import shutil
    import tempfile
    assert os.geteuid() == 0, "CI runs as root; this checks the switch away from it"
    # A directory the unprivileged user can reach (pytest's own are root-only).
    top = Path(tempfile.mkdtemp(prefix="ntspy-user-"))
    try:
        top.chmod(0o755)
        dump = top / "state"
        dump.mkdir()
        client = ClientProc(top / "client", [f"server {LOOPBACK} port {server.ntp_port} {POLL}"],
                            ["user nobody", f"ntsdumpdir {dump}", f"driftfile {dump / 'drift'}"])
        (top / "client").chmod(0o755)
        try:
            client.start()
            wait_until(lambda: "running as user nobody" in client.log(), 10.0, client.log())
            uids = status_field(client.pid, "Uid").split()
            assert uids == ["65534"] * 4, uids
            assert int(status_field(client.pid, "CapEff"), 16) == 0
            assert int(status_field(client.pid, "CapPrm"), 16) == 0
            assert status_field(client.pid, "NoNewPrivs") == "1"
            # Still polling and updating the clock (virtually: -x) as nobody.
            wait_until(lambda: client.query("tracking")["updates"] >= 3, 20.0, client.log())
        finally:
            assert client.stop() == 0
        # State written at the stop, as nobody, where nobody may write.
        drift = dump / "drift"
        assert drift.exists() and drift.stat().st_uid == 65534, list(dump.iterdir())
        assert dump.stat().st_uid == 65534
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_drops_root_and_still_serves_nts(workers: int) -> None:
    import shutil
    import tempfile

    from ntspy import NtsSession
    from ntspy.net.tls.trust import TrustConfig
    top = Path(tempfile.mkdtemp(prefix="ntspy-serve-user-"))
    try:
        top.chmod(0o755)
        srv = start_ntspy_server(top, extra_lines=["user nobody"], ntsprocesses=workers)
        try:
            assert srv.proc is not None
            wait_until(lambda: "running as user nobody" in srv.log(), 10.0, srv.log())
            pids = [srv.proc.pid]
            if workers > 1:
                pids += [int(p) for p in Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}"
                                              "/children").read_text().split()]
            # Each worker switches once its own start-up is done.
            wait_until(lambda: all(status_field(pid, "Uid").split() == ["65534"] * 4
                                   for pid in pids), 10.0, f"all of {pids} as nobody")
            for pid in pids:
                assert int(status_field(pid, "CapEff"), 16) == 0, pid
            # A client gets cookies over NTS-KE and authenticated time from it.
            async def measure() -> bool:
                trust = TrustConfig(use_system_store=False, extra=[srv.certs.ca_cert])
                async with NtsSession("localhost", srv.ke_port, trust=trust) as session:
                    m = await session.measure()
                    return m.authenticated
            import asyncio
            assert asyncio.run(measure())
            assert srv.dumpdir.stat().st_uid == 65534  # key rotations still go to disk
            if workers == 1:
                # A renewal the unprivileged server cannot read: it says so, keeps the
                # certificate it has, and goes on serving with it.
                srv.certs.server_key.chmod(0o600)
                srv.signal(signal.SIGHUP)
                wait_until(lambda: "certificate reload failed, keeping the old ones"
                           in srv.log(), 10.0, srv.log())
                assert asyncio.run(measure())
        finally:
            rc = srv.stop()
            assert rc == 0, srv.log()[-3000:]
        # A restart (as root again) takes the key file its unprivileged self wrote.
        srv.start()
        try:
            assert asyncio.run(measure())
            assert "refusing its keys" not in srv.log()
        finally:
            assert srv.stop() == 0, srv.log()[-3000:]
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_a_second_instance_refuses_to_start_naming_the_first(
        server: ServerProc, tmp_path: Path) -> None:
    client = ClientProc(tmp_path / "client", [f"server {LOOPBACK} port {server.ntp_port} {POLL}"])
    pidfile = client.directory / "client.pid"
    pidfile.write_text("999999\n")  # a stale file from a crash must not block the start
    try:
        client.start()
        assert pidfile.read_text().strip() == str(client.pid)
        out = run_ntspy("-x", "-f", str(client.config_path))
        assert out.returncode == 1, out
        assert f"another instance is running (pid {client.pid}" in out.stderr, out.stderr
        # ... and the first one still owns its control socket and answers.
        assert client.query("tracking") is not None and client.proc is not None
        assert client.proc.poll() is None
    finally:
        assert client.stop() == 0
    assert not pidfile.exists()  # removed at a clean exit


def test_a_second_server_refuses_to_start(server: ServerProc) -> None:
    out = subprocess.run([*NO_SYS_TIME, sys.executable, "-m", "ntspy", "serve", "-f",
                          str(server.config_path)], capture_output=True, text=True, timeout=30,
                         check=False, stdin=subprocess.DEVNULL)
    assert out.returncode == 1, out
    assert server.proc is not None
    assert f"another instance is running (pid {server.proc.pid}" in out.stderr, out.stderr


def test_a_bad_sourcedir_line_rejects_only_that_line(server: ServerProc, tmp_path: Path) -> None:
    srcdir = tmp_path / "sources.d"
    srcdir.mkdir()
    (srcdir / "a.sources").write_text(
        f"server {LOOPBACK} port {server.ntp_port} {POLL}\n"
        "server localhost minpoll banana\n"  # a typo in a DHCP hook's output, say
        f"server localhost port {server.ntp_port} {POLL}\n")
    client = ClientProc(tmp_path / "client", [], [f"sourcedir {srcdir}"])
    try:
        client.start()
        names = [row["configured"] for row in client.query("sources")]
        assert names == [LOOPBACK, "localhost"], names  # the good lines count
        assert f"{srcdir / 'a.sources'}:2: server: invalid minpoll" in client.log(), client.log()
        out = subprocess.run([sys.executable, "-m", "ntspy", "ctl", "-s", str(client.socket_path),
                              "reload", "sources"], capture_output=True, text=True, timeout=30,
                             check=False)
        assert out.returncode == 1, out  # a reload that rejected something is no success
        assert "rejected:" in out.stderr and "a.sources:2" in out.stderr, out.stderr
        assert "0 sources added, 0 removed" in out.stdout, out.stdout
    finally:
        client.stop()


def test_a_port_in_use_is_named_with_its_protocol(server: ServerProc, tmp_path: Path) -> None:
    conf = tmp_path / "second.conf"
    conf.write_text(f"port {server.ntp_port}\nbindaddress {LOOPBACK}\nallow 127.0.0.1\n"
                    f"ntsport 0\npidfile {tmp_path / 'second.pid'}\n"
                    f"bindcmdaddress {tmp_path / 'second.sock'}\ncmdport 0\n")
    out = subprocess.run([*NO_SYS_TIME, sys.executable, "-m", "ntspy", "serve", "-f", str(conf)],
                         capture_output=True, text=True, timeout=30, check=False,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 1, out
    assert f"UDP (NTP) port {server.ntp_port} on {LOOPBACK} is already in use" in out.stderr, out


def test_a_low_port_without_privilege_names_the_capability() -> None:
    import shutil
    import tempfile
    top = Path(tempfile.mkdtemp(prefix="ntspy-lowport-"))  # reachable by the user below
    top.chmod(0o777)
    conf = top / "low.conf"
    # The privileged range ends where the kernel says (1024 unless lowered).
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    assert start > 1, "this kernel lets anyone bind any port: nothing to refuse"
    port = min(123, start - 1)
    conf.write_text(f"port {port}\nbindaddress {LOOPBACK}\nallow 127.0.0.1\nntsport 0\n"
                    f"pidfile {top / 'low.pid'}\nbindcmdaddress {top / 'low.sock'}\ncmdport 0\n")
    conf.chmod(0o644)
    # As an unprivileged user (setpriv), binding port 123 must fail and say why.
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          "--inh-caps=-all", "--bounding-set=-all",
                          sys.executable, "-m", "ntspy", "serve", "-f", str(conf)],
                         capture_output=True, text=True, timeout=30, check=False,
                         stdin=subprocess.DEVNULL)
    shutil.rmtree(top, ignore_errors=True)
    assert out.returncode == 1, out
    assert "ports below 1024 need root or CAP_NET_BIND_SERVICE" in out.stderr, out.stderr


CHRONY_HEADERS = {  # chrony.conf(5), "log": the banner lines scripts key on
    "measurements": "   Date (UTC) Time     IP Address   L St 123 567 ABCD  LP RP Score    Offset"
                    "  Peer del. Peer disp.  Root del. Root disp. Refid     MTxRx",
    "statistics": "   Date (UTC) Time     IP Address    Std dev'n Est offset  Offset sd  Diff freq"
                  "   Est skew  Stress  Ns  Bs  Nr  Asym",
    "tracking": "   Date (UTC) Time     IP Address   St   Freq ppm   Skew ppm     Offset L Co"
                "  Offset sd Rem. corr. Root delay Root disp. Max. error",
}
COLUMNS = {"measurements": 20, "statistics": 13, "tracking": 14}


def test_chrony_log_files_in_logdir(server: ServerProc, tmp_path: Path) -> None:
    logdir = tmp_path / "log"
    logdir.mkdir()
    client = ClientProc(tmp_path / "client", [f"server {LOOPBACK} port {server.ntp_port} {POLL}"],
                        [f"logdir {logdir}", "log measurements statistics tracking",
                         "logbanner 5"])
    try:
        client.start()
        wait_until(lambda: client.query("tracking")["updates"] >= 8, 30.0, client.log())
    finally:
        client.stop()
    for kind, header in CHRONY_HEADERS.items():
        lines = (logdir / f"{kind}.log").read_text().splitlines()
        assert lines[0] == "=" * len(header) and lines[1] == header, (kind, lines[:3])
        rows = [line for line in lines if line and line[0].isdigit()]
        assert len(rows) >= 6, (kind, lines)
        assert lines.count(header) == -(-len(rows) // 5)  # the banner again every 5 lines
        for row in rows:
            fields = row.split()
            assert len(fields) == COLUMNS[kind], (kind, row)
            assert fields[2] == "127.0.0.1" and len(fields[0]) == 10 and len(fields[1]) == 8
        last = rows[-1].split()
        if kind == "measurements":
            assert last[3] == "N" and last[5:8] == ["111", "111", "1111"]
            assert abs(float(last[11])) < 0.01 and 0 < float(last[12]) < 0.1  # offset, delay
            # the server's reference id (local stratum 1: 127.127.1.1); kernel RX timestamp
            assert last[16] == "7F7F0101" and last[19] == "K"
        if kind == "tracking":
            assert abs(float(last[6])) < 0.01 and last[7] == "N"


def test_a_log_file_that_cannot_be_written_is_reported_once(
        caplog: pytest.LogCaptureFixture) -> None:
    from ntspy.client.logfiles import ChronyLogs
    logs = ChronyLogs(Path("/dev"), ["tracking"])
    logs._files["tracking"]._path = Path("/dev/full")  # every write: no space left on device
    for _ in range(3):
        logs.tracking(0.0, "127.0.0.1", stratum=2, freq_ppm=0.0, skew_ppm=0.0, offset=0.0,
                      leap=0, combined=1, offset_sd=0.0, remaining=0.0, root_delay=0.0,
                      root_dispersion=0.0, max_error=0.0)
    errors = [r for r in caplog.records if "cannot write /dev/full" in r.getMessage()]
    assert len(errors) == 1
    logs.close()
