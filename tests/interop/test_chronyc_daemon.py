"""Debian's chronyc 4.3 against a running ``ntspy run`` and ``ntspy serve``.

``ntspy run`` syncs (clock control off) to an ``ntspy serve`` on loopback; both
daemons' command sockets (the Unix socket ``bindcmdaddress`` names, and UDP
``cmdport`` on 127.0.0.1/::1 for the client) are asked with the real chronyc,
and what chronyc prints is compared with what ``ntspy ctl --json`` says.  The
source is put offline first (itself a command under test) so that the values
hold still between the two askings.  Then who may do what: root over the Unix
socket may change things, ``nobody`` may monitor (chronyc over UDP, ``ntspy
ctl`` over the socket) but is refused every change, with a reason.  Nothing
leaves loopback; every chronyc run is bounded by ``timeout``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemon_helpers import ClientProc, server_line, wait_until
from tests.peers import LOOPBACK, ServerProc, free_port, start_ntspy_server

CHRONYC = shutil.which("chronyc") or "/usr/bin/chronyc"
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@dataclass
class Setup:
    server: ServerProc
    client: ClientProc
    cmdport: int
    root: Path


def _open_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)  # every user may reach the command socket in it
    return path


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    # Not under pytest's tmp dirs: those are root's alone, and `nobody` must reach
    # the socket (as any local user reaches /run/ntspy/ntspy.sock).
    root = _open_dir(Path(tempfile.mkdtemp(prefix="ntspy-chronyc-", dir="/tmp")))
    server = client = None
    try:
        server = start_ntspy_server(root / "server")
        cmdport = free_port("udp")
        client = ClientProc(_open_dir(root / "client"), [
            server_line(LOOPBACK, server.ntp_port, server.ke_port),
            f"ntstrustedcerts {server.certs.ca_cert}",
        ], [f"cmdport {cmdport}"])
        client.start()
        wait_until(lambda: client.states()[0][1] == "*", 20.0, "the source selected")
        yield Setup(server, client, cmdport, root)
    finally:
        if client is not None:
            client.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def chronyc(*args: str, user: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(NOBODY if user else []), "timeout", "10", CHRONYC, "-n", *args],
                          capture_output=True, text=True, timeout=20, check=False)


def unix(setup: Setup, *command: str) -> str:
    out = chronyc("-h", str(setup.client.socket_path), *command)
    assert out.returncode == 0, (command, out.stdout, out.stderr)
    return out.stdout


def ctl_json(setup: Setup, *command: str, user: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(NOBODY if user else []), sys.executable, "-m", "ntspy", "ctl", "-s",
         str(setup.client.socket_path), "--json", *command],
        capture_output=True, text=True, timeout=30, check=False)


def csv(text: str) -> list[str]:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0].split(",")


def close(a: str, b: float, tolerance: float = 1e-6) -> bool:
    """A chronyc figure (printed with 9 decimals, sent as chrony's 24-bit float)."""
    return abs(float(a) - b) <= tolerance + abs(b) * 1e-6


@pytest.fixture(scope="module")
def quiet(setup: Setup) -> Setup:
    """The source offline: nothing moves while chronyc and ntspy ctl are compared."""
    assert unix(setup, "offline").strip() == "200 OK"
    wait_until(lambda: setup.client.query("activity")["offline"] == 1, 5.0, "offline")
    time.sleep(1.0)  # a poll in flight when the command came has landed
    return setup


def test_tracking_matches(quiet: Setup) -> None:
    t = quiet.client.query("tracking")
    row = csv(unix(quiet, "-c", "tracking"))
    assert row[0] == "7F000001" and row[1] == LOOPBACK and row[2] == str(t["stratum"])
    assert close(row[4], t["system_time_offset"])  # both: positive = clock behind
    assert close(row[5], -t["last_offset"])
    assert close(row[6], t["rms_offset"])
    assert close(row[7], -t["frequency_ppm"], 1e-3)
    assert close(row[9], t["skew_ppm"], 1e-3)
    assert close(row[10], t["root_delay"]) and close(row[11], t["root_dispersion"])
    assert row[13] == "Normal"
    human = unix(quiet, "tracking")
    assert "Reference ID    : 7F000001 (127.0.0.1)" in human
    ours = quiet.client.ctl("tracking")
    for label in ("Reference ID", "Stratum", "Ref time (UTC)", "Frequency", "Leap status"):
        theirs = next(line for line in human.splitlines() if line.startswith(label))
        mine = next(line for line in ours.splitlines() if line.startswith(label))
        assert theirs == mine


def test_sources_sourcestats_selectdata_match(quiet: Setup) -> None:
    s = quiet.client.query("sources")[0]
    row = csv(unix(quiet, "-c", "sources"))
    assert row[:6] == ["^", s["state"], s["address"], str(s["stratum"]), str(s["poll"]),
                       f"{s['reach']:o}"]
    assert close(row[8], s["measured_offset"]) and close(row[9], s["error"])
    st = quiet.client.query("sourcestats")[0]
    row = csv(unix(quiet, "-c", "sourcestats"))
    assert row[:4] == [st["address"], str(st["np"]), str(st["nr"]), str(int(st["span"]))]
    assert close(row[4], st["frequency_ppm"], 1e-3) and close(row[7], st["std_dev"])
    sel = quiet.client.query("selectdata")[0]
    row = csv(unix(quiet, "-c", "selectdata"))
    assert row[:3] == [sel["state"], sel["address"], "Y"]
    assert close(row[-3], sel["low"]) and close(row[-2], sel["high"]) and row[-1] == "Normal"
    # -N asks the daemon for the configured name (NTP_SOURCE_NAME)
    assert LOOPBACK in unix(quiet, "-N", "sources")
    verbose = unix(quiet, "sources", "-v")
    assert "Source mode" in verbose and f"^{s['state']} {LOOPBACK}" in verbose


def test_authdata_ntpdata_activity_match(quiet: Setup) -> None:
    a = quiet.client.query("authdata")[0]
    row = csv(unix(quiet, "-c", "authdata"))
    assert row == [a["address"], "NTS", str(a["key_id"]), str(a["type"]), str(a["key_bits"]),
                   row[5], str(a["attempts"]), "0" if not a["naks"] else "1",
                   str(a["cookies"]), str(a["cookie_length"])]
    n = quiet.client.query("ntpdata")[0]
    row = csv(unix(quiet, "-c", "ntpdata"))
    assert row[0] == n["remote_address"] and row[2] == str(n["remote_port"])
    assert row[6] == "4" and row[7] == "Server" and row[8] == str(n["stratum"])
    assert row[-8:-6] == ["No", "Yes"]  # interleaved, authenticated
    assert row[-4:] == [str(n["requests"]), str(n["accepted"] + sum(n["rejected"].values())),
                        str(n["accepted"]), str(n["accepted"] - sum(n["bad_samples"].values()))]
    assert close(row[18], n["offset"]) and close(row[19], n["peer_delay"])
    act = quiet.client.query("activity")
    assert csv(unix(quiet, "-c", "activity")) == [
        str(act[k]) for k in ("online", "offline", "burst_online", "burst_offline",
                              "unresolved")]
    assert act["offline"] == 1


def test_serverstats_of_ntspy_serve(setup: Setup) -> None:
    out = chronyc("-h", str(setup.server.control), "-c", "serverstats")
    assert out.returncode == 0, out.stderr
    row = csv(out.stdout)
    stats = setup.server.stats()
    assert int(row[5]) == stats["ke_accepted"] >= 1  # NTS-KE connections accepted
    assert int(row[0]) <= stats["ntp_received"] and int(row[7]) <= stats["nts_authenticated"]
    assert int(row[7]) >= 1
    # clients: the one client of this server (its source is offline now: counts hold still)
    time.sleep(1.1)  # the server's client log is flushed once a second
    mine = [r for r in json.loads(subprocess.run(
        [sys.executable, "-m", "ntspy", "ctl", "-s", str(setup.server.control), "--json",
         "clients"], capture_output=True, text=True, timeout=30, check=True).stdout)
        if r["address"] == LOOPBACK]
    out = chronyc("-h", str(setup.server.control), "-c", "clients")
    assert out.returncode == 0, out
    rows = [line.split(",") for line in out.stdout.splitlines() if line.startswith(LOOPBACK)]
    assert len(mine) == 1 and len(rows) == 1, (mine, out.stdout)
    assert rows[0][1] == str(mine[0]["ntp_hits"]) and int(rows[0][1]) > 0
    out = chronyc("-h", str(setup.server.control), "-c", "clients", "-k")
    ke_row = next(line.split(",") for line in out.stdout.splitlines()
                  if line.startswith(LOOPBACK))
    assert ke_row[6] == str(mine[0]["nke_hits"]) == "1", (ke_row, mine)  # NTS-KE column


def test_ntspy_serve_over_both_transports(setup: Setup) -> None:
    """chronyc against `ntspy serve`: its own clock in tracking (as a chronyd with
    `local stratum 1` and no sources), serverstats and clients over the Unix socket,
    the same values as ntspy ctl --json; over UDP the open commands only."""
    port = free_port("udp")
    server = start_ntspy_server(_open_dir(setup.root / "serve-udp"), [f"cmdport {port}"])
    try:
        # some traffic to count: the client of the module polls the first server only
        out = ctl_json(setup, "tracking")
        assert out.returncode == 0
        for where in (["-h", str(server.control)], ["-h", LOOPBACK, "-p", str(port)]):
            out = chronyc(*where, "-c", "tracking", user=where[1] == LOOPBACK)
            assert out.returncode == 0, out
            row = csv(out.stdout)
            assert row[0] == "7F7F0101" and row[2] == "1" and row[-1] == "Normal", row
        stats = json.loads(subprocess.run(
            [sys.executable, "-m", "ntspy", "ctl", "-s", str(server.control), "--json",
             "serverstats"], capture_output=True, text=True, timeout=30, check=True).stdout)
        row = csv(chronyc("-h", str(server.control), "-c", "serverstats").stdout)
        assert int(row[0]) == stats["ntp_received"] and int(row[5]) == stats["ke_accepted"]
        assert int(row[2]) >= 1  # command packets: chronyc's own requests count
        out = chronyc("-h", str(server.control), "-c", "clients")
        assert out.returncode == 0, out  # nobody asked this one for time yet: no rows
        out = chronyc("-h", LOOPBACK, "-p", str(port), "serverstats", user=True)
        assert "501 Not authorised" in out.stdout + out.stderr, out
    finally:
        server.stop()


def test_udp_monitoring_for_everyone_and_unix_only_reports_refused(setup: Setup) -> None:
    for host in (LOOPBACK, "::1"):
        out = chronyc("-h", host, "-p", str(setup.cmdport), "-c", "tracking", user=True)
        assert out.returncode == 0 and out.stdout.startswith("7F000001,"), out
        out = chronyc("-h", host, "-p", str(setup.cmdport), "-c", "sources", user=True)
        assert out.returncode == 0 and f",{LOOPBACK}," in out.stdout, out
    # As chronyd: over UDP only the open commands, the rest needs the Unix socket.
    for command in (["ntpdata"], ["authdata"], ["burst", "2/4"], ["shutdown"]):
        out = chronyc("-h", LOOPBACK, "-p", str(setup.cmdport), *command, user=True)
        assert out.returncode != 0 and "501 Not authorised" in out.stdout + out.stderr, out


def test_nobody_monitors_with_ntspy_ctl_but_changes_nothing(setup: Setup) -> None:
    out = ctl_json(setup, "tracking", user=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["stratum"] == setup.client.query("tracking")["stratum"]
    before = setup.client.query("sources")
    for command in (["burst", "2/4"], ["offline"], ["delete", LOOPBACK], ["shutdown"],
                    ["add", "server", "127.0.0.9"], ["makestep", "0.1", "3"]):
        out = ctl_json(setup, *command, user=True)
        assert out.returncode == 1, (command, out.stdout)
        assert "not authorised" in out.stderr and "root and the daemon's user" in out.stderr
    assert [r["address"] for r in setup.client.query("sources")] == \
        [r["address"] for r in before]
    assert setup.client.proc is not None and setup.client.proc.poll() is None


def test_ntspy_ctl_and_chronyc_share_one_socket_path(setup: Setup) -> None:
    """Both name the same path: the one bindcmdaddress gives, open to every user."""
    assert setup.client.socket_path.is_socket()
    assert os.stat(setup.client.socket_path).st_mode & 0o777 == 0o666


def test_changing_commands_take_effect(setup: Setup) -> None:
    """Run last in this module: it adds, deletes and finally shuts the daemon down."""
    c = setup.client
    assert unix(setup, "online").strip() == "200 OK"
    wait_until(lambda: c.query("activity")["online"] == 1, 5.0, "online again")
    assert unix(setup, "burst", "2/4").strip() == "200 OK"
    assert unix(setup, "makestep", "0.5", "3").strip() == "200 OK"
    for command in ("dump", "cyclelogs", "refresh", "rekey"):
        assert unix(setup, command).strip() == "200 OK", command
    # add: a second, real NTS source (chronyc's ADD_SOURCE), which syncs
    line = (f"add server localhost port {setup.server.ntp_port} ntsport "
            f"{setup.server.ke_port} nts iburst minpoll -2 maxpoll -1").split()
    assert unix(setup, *line).strip() == "200 OK"
    wait_until(lambda: len(c.query("sources")) == 2 and c.query("sources")[1]["reach"] > 0,
               20.0, "the added source answering")
    added = c.query("authdata")[1]
    assert added["mode"] == "NTS" and added["cookies"] > 0
    out = chronyc("-h", str(c.socket_path), *line)
    assert "511 Source already present" in out.stdout + out.stderr
    # it survives reload sources
    assert unix(setup, "reload", "sources").strip() == "200 OK"
    assert len(c.query("sources")) == 2
    # delete by address
    address = c.query("sources")[1]["address"]
    assert address == LOOPBACK  # localhost resolved
    names = [r["configured"] for r in c.query("sources")]
    assert names == [LOOPBACK, "localhost"]
    out = ctl_json(setup, "delete", "192.0.2.77")
    assert out.returncode == 1 and "no such source" in out.stderr
    # shutdown: the daemon stops, cleanly
    assert unix(setup, "shutdown").strip() == "200 OK"
    assert c.proc is not None
    assert c.proc.wait(timeout=15) == 0
    assert "shutdown requested" in c.log()
