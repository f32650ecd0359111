"""systemd integration: the unit files, readiness notification, waitsync, workers that
die with their supervisor."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ntspy.cli import build_parser
from tests.daemon_helpers import ClientProc, wait_until
from tests.peers import LOOPBACK, NO_SYS_TIME, start_ntspy_server, wait_for_udp_ntp

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
NTSPY = Path(sys.executable).with_name("ntspy")  # the entry point installed next to python
POLL = "minpoll -2 maxpoll -1"


def exec_start(unit: Path) -> list[str]:
    line = next(x for x in unit.read_text().splitlines() if x.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


@pytest.mark.parametrize("name", ["ntspy.service", "ntspy-server.service", "ntspy-wait.service"])
def test_unit_files_pass_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    for unit in UNITS.glob("*.service"):  # Requires=/After= between them resolve
        text = unit.read_text().replace("/usr/local/bin/ntspy", str(NTSPY))
        (tmp_path / unit.name).write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stderr.strip() == "", out


@pytest.mark.parametrize("name", ["ntspy.service", "ntspy-server.service", "ntspy-wait.service"])
def test_unit_command_lines_are_ones_ntspy_accepts(name: str) -> None:
    argv = exec_start(UNITS / name)
    assert argv[0] == "/usr/local/bin/ntspy"
    args = build_parser(argv[1:]).parse_args(argv[1:])  # exits (fails) on an unknown flag
    assert args.command in {"run", "serve", "ctl"}
    text = (UNITS / name).read_text()
    assert "NoNewPrivileges=yes" in text and "ProtectSystem=strict" in text
    if name != "ntspy-wait.service":
        assert "Type=notify" in text and "ExecReload=/bin/kill -HUP $MAINPID" in text


def notify_listener(tmp_path: Path) -> tuple[socket.socket, Path]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20.0)
    return sock, path


@pytest.mark.parametrize("attempt", range(4))  # SIGTERM meets a poll in flight: it must end
def test_ntspy_run_tells_systemd_it_is_ready(tmp_path: Path, attempt: int) -> None:
    server = start_ntspy_server(tmp_path / "server")
    sock, path = notify_listener(tmp_path)
    conf = tmp_path / "client.conf"
    conf.write_text(f"server {LOOPBACK} port {server.ntp_port} {POLL}\n"
                    f"bindcmdaddress {tmp_path / 'client.sock'}\ncmdport 0\n"
                    f"pidfile {tmp_path / 'client.pid'}\n")
    proc = subprocess.Popen([*NO_SYS_TIME, sys.executable, "-m", "ntspy", "run", "-x", "-n",
                             "-f", str(conf)], env={**os.environ, "NOTIFY_SOCKET": str(path)},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        message = sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in message.splitlines())
        assert fields["READY"] == "1" and int(fields["MAINPID"]) == proc.pid, message
        # Ready means serving: the control socket answers by now.
        assert (tmp_path / "client.sock").exists()
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096).decode() == "STOPPING=1"
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
        server.stop()


def test_ntspy_serve_tells_systemd_it_is_ready(tmp_path: Path) -> None:
    sock, path = notify_listener(tmp_path)
    os.environ["NOTIFY_SOCKET"] = str(path)  # inherited by the server started here
    try:
        server = start_ntspy_server(tmp_path / "server")
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        message = sock.recv(4096).decode()
        assert "READY=1" in message.splitlines(), message
        assert f"MAINPID={server.proc.pid}" in message if server.proc else False
    finally:
        sock.close()
        server.stop()


def waitsync(socket_path: Path, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ntspy", "ctl", "-s", str(socket_path),
                           "waitsync", *words], capture_output=True, text=True, timeout=60,
                          check=False)


def test_waitsync_returns_once_synchronised_and_gives_up_when_asked(tmp_path: Path) -> None:
    # No daemon yet: every try fails, and after max-tries waitsync says no.
    out = waitsync(tmp_path / "none.sock", "3", "0", "0", "0.1")
    assert out.returncode == 1 and out.stdout.count("try: ") == 3, out
    server = start_ntspy_server(tmp_path / "server")
    client = ClientProc(tmp_path / "client", [f"server {LOOPBACK} port {server.ntp_port} {POLL}"])
    try:
        wait_for_udp_ntp(LOOPBACK, server.ntp_port)
        client.start()
        started = time.monotonic()
        out = waitsync(client.socket_path, "60", "0.1", "0", "0.2")
        assert out.returncode == 0, out
        last = out.stdout.strip().splitlines()[-1]
        assert last.startswith("try: ") and "refid: 7F000001" in last, out.stdout
        assert time.monotonic() - started < 30
        assert client.query("tracking")["synchronised"]
    finally:
        client.stop()
        server.stop()
    bad = waitsync(tmp_path / "none.sock", "x")
    assert bad.returncode == 2 and "usage: waitsync" in bad.stderr


@pytest.mark.parametrize("user", [None, "nobody"])  # a user switch clears the death signal
def test_workers_die_with_their_supervisor(tmp_path: Path, user: str | None) -> None:
    server = start_ntspy_server(tmp_path / "server", ntsprocesses=2,
                                extra_lines=[f"user {user}"] if user else [])
    if user:  # let every process make its switch first
        wait_until(lambda: server.proc is not None and all(
            Path(f"/proc/{pid}/status").read_text().count("\t65534") >= 4
            for pid in [server.proc.pid, *map(int, Path(
                f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split())]),
            10.0, "all processes switched to nobody")
    assert server.proc is not None
    try:
        children = [int(p) for p in
                    Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
                    .read_text().split()]
        assert len(children) == 2, children
        server.proc.send_signal(signal.SIGKILL)  # no chance to stop them itself
        server.proc.wait(10)

        def gone() -> bool:
            return all(not Path(f"/proc/{pid}").exists()
                       or "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
                       for pid in children)

        wait_until(gone, 15.0, f"workers {children} to exit")
    finally:
        server.stop()
