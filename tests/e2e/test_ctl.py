"""`ntspy ctl` against a running `ntspy serve`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
