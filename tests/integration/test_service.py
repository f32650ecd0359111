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
                    f"bindcmdaddress {tmp_path / 'client.sock'}\n")
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
