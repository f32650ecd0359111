"""A real chronyd serving NTS on loopback, for interop tests.

chronyd runs with -x (never touches the clock) and without CAP_SYS_TIME in its
bounding set, as root (-u root) so it can read the key in our temp dir.  Every
path it writes (pid file, command socket, NTS dump dir) is inside that temp dir
and its ports are picked at run time, so a system chronyd is never disturbed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ntspy.certs import make_test_pki
from tests.peers import free_port

CHRONYD = shutil.which("chronyd") or "/usr/sbin/chronyd"
NO_SYS_TIME = ["setpriv", "--bounding-set", "-sys_time", "--inh-caps", "-sys_time"]
START_TIMEOUT = 10.0


@dataclass(slots=True)
class Chronyd:
    ntp_port: int
    ke_port: int
    ca_cert: Path
    directory: Path
    pid: int


def _wait_for_tcp(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chronyd exited early:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"chronyd did not open NTS-KE port {port}:\n{log.read_text()}")


@pytest.fixture(scope="session")
def chronyd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chronyd]:
    directory = tmp_path_factory.mktemp("chronyd")
    paths = make_test_pki(directory)
    (directory / "nts").mkdir()
    ntp_port, ke_port = free_port("udp"), free_port("tcp")
    conf = directory / "chrony.conf"
    conf.write_text(
        "\n".join(
            [
                f"port {ntp_port}",
                f"ntsport {ke_port}",
                f"ntsserverkey {paths.server_key}",
                f"ntsservercert {paths.server_cert}",
                f"ntsdumpdir {directory / 'nts'}",
                "allow 127.0.0.1",
                # No sources: serve our own clock as stratum 1, or chronyd
                # would answer "unsynchronised".
                "local stratum 1",
                "bindaddress 127.0.0.1",
                f"pidfile {directory / 'chronyd.pid'}",
                "cmdport 0",
                f"bindcmdaddress {directory / 'chronyd.sock'}",
                "",
            ]
        )
    )
    log = directory / "chronyd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*NO_SYS_TIME, CHRONYD, "-x", "-u", "root", "-d", "-f", str(conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_tcp(ke_port, proc, log)
        yield Chronyd(ntp_port, ke_port, paths.ca_cert, directory, proc.pid)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
