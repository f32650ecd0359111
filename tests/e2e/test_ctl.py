"""`ntspy ctl` against a running `ntspy serve`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from ntspy.client.session import NtsSession
from ntspy.net.tls.trust import TrustConfig
from tests.peers import ServerProc


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ntspy", "ctl", *args],
                          capture_output=True, text=True, timeout=30, check=False)


def test_serverstats_in_chronyc_layout(ntspy_server: ServerProc) -> None:
    out = ctl("-s", str(ntspy_server.control), "serverstats")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("NTP packets received       : ")
    assert "NTS-KE connections accepted: 0" in lines


def test_serverkeys_and_json(ntspy_server: ServerProc) -> None:
    keys = json.loads(ctl("-s", str(ntspy_server.control), "--json", "serverkeys").stdout)
    assert len(keys) == 1 and keys[0]["age"] >= 0
    text = ctl("-s", str(ntspy_server.control), "serverkeys").stdout
    assert f"{keys[0]['id']:08x}" in text


def test_unreachable_daemon_is_one_clear_line(tmp_path: Path) -> None:
    out = ctl("-s", str(tmp_path / "none.sock"), "serverstats")
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f"ntspy ctl: cannot reach the ntspy daemon: no control socket at "
        f"{tmp_path / 'none.sock'} (is it running?)"
    )


def test_clients_in_chronyc_layout(ntspy_server: ServerProc) -> None:
    trust = TrustConfig(use_system_store=False, extra=[ntspy_server.certs.ca_cert])

    async def talk() -> None:
        with NtsSession("localhost", ntspy_server.ke_port, trust=trust, timeout=3.0) as s:
            for _ in range(3):
                assert (await s.measure()).authenticated

    asyncio.run(talk())
    time.sleep(1.1)  # the client log reaches the control socket within a second
    rows = json.loads(ctl("-s", str(ntspy_server.control), "--json", "clients").stdout)
    (row,) = [r for r in rows if r["address"] == "127.0.0.1"]
    assert (row["ntp_hits"], row["nke_hits"], row["ntp_drops"]) == (3, 1, 0)
    text = ctl("-s", str(ntspy_server.control), "clients").stdout.splitlines()
    assert text[0].startswith("Hostname") and "NTS-KE" in text[0]
    line = next(t for t in text if t.startswith("127.0.0.1"))
    assert line.split()[1:3] == ["3", "0"] and line.split()[6:8] == ["1", "0"]
