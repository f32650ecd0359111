"""`ntspy ctl`'s everyday chronyc commands against a running `ntspy run`, each with
its effect: a source added shows up and syncs, offline stops its polls and shows in
activity, delete removes it, shutdown stops the daemon."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.daemon_helpers import ClientProc, server_line, wait_until
from tests.peers import LOOPBACK, ServerProc


def ctl(client: ClientProc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ntspy", "ctl", "-s", str(client.socket_path),
                           *args], capture_output=True, text=True, timeout=30, check=False)


def test_add_offline_activity_delete_shutdown(tmp_path: Path, ntspy_server: ServerProc) -> None:
    srv = ntspy_server
    client = ClientProc(tmp_path / "client", [
        server_line(LOOPBACK, srv.ntp_port, srv.ke_port),
        f"ntstrustedcerts {srv.certs.ca_cert}",
    ])
    client.start()
    try:
        out = ctl(client, "add", "server", "localhost", "port", str(srv.ntp_port), "ntsport",
                  str(srv.ke_port), "nts", "iburst", "minpoll", "-2", "maxpoll", "-1")
        assert out.returncode == 0 and out.stdout == "200 OK\n", out.stderr
        wait_until(lambda: [r["state"] for r in client.query("sources")] in
                   (["*", "+"], ["+", "*"]), 20.0, "both sources combined")
        assert client.query("authdata")[1]["cookies"] > 0  # a real NTS source
        # offline: no more polls of it, and activity says so
        assert ctl(client, "offline", "localhost").stdout == "200 OK\n"
        time.sleep(0.6)
        sent = client.query("ntpdata")[1]["requests"]
        time.sleep(1.5)
        assert client.query("ntpdata")[1]["requests"] == sent
        text = ctl(client, "activity").stdout
        assert "1 sources online\n1 sources offline\n" in text
        act = json.loads(ctl(client, "--json", "activity").stdout)
        assert (act["online"], act["offline"]) == (1, 1)
        assert ctl(client, "online").stdout == "200 OK\n"
        wait_until(lambda: client.query("ntpdata")[1]["requests"] > sent, 5.0, "polls again")
        rows = json.loads(ctl(client, "--json", "selectdata").stdout)
        assert {r["configured"] for r in rows} == {LOOPBACK, "localhost"}
        assert "S Name/IP Address" in ctl(client, "selectdata").stdout
        # delete: gone, and a reload does not bring it back
        assert ctl(client, "delete", "localhost").stdout == "200 OK\n"
        assert [r["configured"] for r in client.query("sources")] == [LOOPBACK]
        assert client.query("reload", "sources")["added"] == 0
        out = ctl(client, "delete", "localhost")
        assert out.returncode == 1 and "no such source localhost" in out.stderr
        assert ctl(client, "dump").stdout == "200 OK\n"
        assert any(client.dumpdir.iterdir())
        # shutdown: a clean exit, state saved
        assert ctl(client, "shutdown").stdout == "200 OK\n"
        assert client.proc is not None and client.proc.wait(timeout=15) == 0
    finally:
        client.stop()
