"""`ntspy demo`, the README's first command, end to end."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_offline_and_every_sample_is_authenticated() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ntspy", "demo", "--samples", "4", "--interval", "0.1"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "all 4 samples authenticated" in text
    assert "System clock wrong by" in text
    # authdata row: NTS mode, non-zero KeyID/Type/KLen, 8 cookies.
    auth = next(line for line in text.splitlines()
                if line.startswith("127.0.0.1") and "NTS" in line)
    fields = auth.split()
    assert fields[1] == "NTS" and int(fields[2]) >= 1 and int(fields[3]) in (15, 30)
    assert int(fields[4]) in (128, 256) and fields[8] == "8"
    # sources row: selected, reach 17 (4 samples), positive stratum.
    src = next(line for line in text.splitlines() if line.startswith("^*"))
    assert src.split()[4] == "17"
    assert "Authenticated NTP packets  : 4" in text
