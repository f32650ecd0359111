"""A fleet of `ntspy serve` sharing one key ring through a real redis-server (issue 15).

Three servers on three loopback addresses share the NTP port number: A does NTS-KE
and sends clients (ntspy run and chronyd) to B for NTP (``ntsntpserver``); C is a
spare KE+NTP host.  Keys rotate every 3 s during the run.  Then A is killed, Redis
is paused and resumed, Redis is restarted empty, B is restarted.  Through all of it:
no NAK from any server, no second NTS-KE by either client, every answer they take
authenticated.  A server with two worker processes is in the fleet too.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ntspy.certs import make_test_pki
from ntspy.control.protocol import request
from tests.daemon_helpers import ClientProc, wait_until
from tests.peers import (
    CHRONYD,
    NO_SYS_TIME,
    RedisServer,
    ServerProc,
    end_process,
    free_port,
    prepare_ntspy_server,
    scrape_metrics,
)

CHRONYC = shutil.which("chronyc") or "/usr/bin/chronyc"
A, B, C = "127.0.0.2", "127.0.0.3", "127.0.0.4"
ROTATE = 3


def common_port() -> int:
    """A UDP port free on all three addresses."""
    for _ in range(50):
        port = free_port("udp")
        try:
            for host in (A, B, C):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no common free port")


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def chronyd_client(directory: Path, port: int, ke_port: int, ca: Path) -> subprocess.Popen[bytes]:
    directory.mkdir()
    directory.chmod(0o700)  # chronyd opens its command socket only in a private directory
    (directory / "nts").mkdir()
    conf = directory / "chrony.conf"
    conf.write_text("\n".join([
        f"server {A} port {port} ntsport {ke_port} nts iburst minpoll -2 maxpoll -1",
        f"ntstrustedcerts {ca}", f"ntsdumpdir {directory / 'nts'}", "cmdport 0",
        f"bindcmdaddress {directory / 'chronyd.sock'}", f"pidfile {directory / 'chronyd.pid'}",
        "",
    ]))
    log = (directory / "chronyd.log").open("ab")
    return subprocess.Popen([*NO_SYS_TIME, CHRONYD, "-x", "-u", "root", "-d", "-f", str(conf)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def chronyc(sock: Path, *command: str) -> list[str]:
    out = subprocess.run(["timeout", "10", CHRONYC, "-h", str(sock), "-n", "-c", *command],
                         capture_output=True, text=True, timeout=20, check=False)
    assert out.returncode == 0, out
    return out.stdout.strip().splitlines()


def keystore_connected(port: int) -> float:
    return scrape_metrics(port)[("ntspy_server_keystore_connected", ())]


def test_a_fleet_shares_one_ring_through_rotation_and_failures(
        tmp_path: Path, redis: RedisServer) -> None:
    pki = make_test_pki(tmp_path / "pki", hostnames=("localhost",), ips=(A, B, C, "127.0.0.1"))
    kek = tmp_path / "kek"
    kek.write_bytes(os.urandom(32))
    kek.chmod(0o600)
    port = common_port()
    metrics_port = free_port("tcp")
    store = [f"ntskeystore redis://127.0.0.1:{redis.port}/0 poll 0.2", f"ntskeystorekey {kek}",
             f"ntsrotate {ROTATE}", f"port {port}", "allow 127.0.0.0/8"]
    servers: dict[str, ServerProc] = {}
    for name, host, extra, workers in (
            ("a", A, [f"ntsntpserver {B}"], 1), ("b", B, [], 2),
            ("c", C, [f"metricsaddress 127.0.0.1 {metrics_port}"], 1)):
        srv = prepare_ntspy_server(tmp_path / name, [*store, f"bindaddress {host}", *extra],
                                   ntsprocesses=workers, certs=pki)
        srv.ntp_port = port
        srv.start()
        servers[name] = srv
    chrony = client = None
    naks: dict[str, int] = {}

    def count_naks(name: str) -> None:
        naks[name] = naks.get(name, 0) + servers[name].stats()["nts_naks"]

    try:
        client = ClientProc(tmp_path / "ntspy-client", [
            f"server {A} port {port} ntsport {servers['a'].ke_port} nts iburst "
            "minpoll -2 maxpoll -1", f"ntstrustedcerts {pki.ca_cert}"])
        client.start()
        chrony = chronyd_client(tmp_path / "chronyd-client", port, servers["a"].ke_port,
                                pki.ca_cert)
        wait_until(lambda: client.query("sources")[0]["reach"] >= 7, 20, "ntspy client polls")
        # NTP goes to B: the KE host sent it there
        assert client.query("ntpdata")[0]["remote_address"] == B
        time.sleep(2 * ROTATE + 1)  # rotations while everybody serves
        count_naks("a")
        # A, started first, holds the lease: losing it also loses the rotator.
        rows = asyncio.run(request(servers["a"].control, "serverkeys"))
        assert rows[-1]["keystore"]["leader"] and rows[-1]["keystore"]["connected"], rows
        os.kill(servers["a"].pid, signal.SIGKILL)  # the KE host is lost
        servers["a"].proc.wait(timeout=10)  # type: ignore[union-attr]
        time.sleep(ROTATE)
        redis.signal(signal.SIGSTOP)  # Redis paused...
        time.sleep(2.0)
        assert keystore_connected(metrics_port) == 0  # the gauge says so
        redis.signal(signal.SIGCONT)  # ...and back
        time.sleep(ROTATE)
        assert keystore_connected(metrics_port) == 1
        redis.stop()  # Redis restarted empty: the servers give it the ring back
        redis.start()
        time.sleep(ROTATE)
        count_naks("b")
        servers["b"].restart()  # the NTP host restarts with its saved ring + the store
        time.sleep(2 * ROTATE)
        count_naks("b")
        count_naks("c")
        # The clients: one NTS-KE each, every answer authenticated, still answered.
        auth = client.query("authdata")[0]
        assert auth["key_id"] == 1 and auth["naks"] == 0, auth
        data = client.query("ntpdata")[0]
        assert data["authenticated"] and not data["rejected"], data
        assert data["accepted"] >= 40
        assert client.query("sources")[0]["reach"] == 255
        row = chronyc(tmp_path / "chronyd-client" / "chronyd.sock", "authdata")[0].split(",")
        assert row[1] == "NTS" and row[2] == "1", row  # KeyID 1: one NTS-KE
        assert row[7] == "0", row  # no NAK
        ntp = chronyc(tmp_path / "chronyd-client" / "chronyd.sock", "ntpdata")[0].split(",")
        assert ntp[0] == B and ntp[-7] == "Yes", ntp  # from B, authenticated
        assert naks == {"a": 0, "b": 0, "c": 0}, naks
        # The ring rotated, and the restarted B came back with the fleet's keys.
        logs = "".join(s.log() for s in servers.values())
        assert logs.count("now current") >= 3
        assert "ntskeystore" in servers["b"].log() and "unreachable" in logs
    finally:
        if chrony is not None:
            end_process(chrony)
        if client is not None:
            client.stop()
        for srv in servers.values():
            srv.stop()
