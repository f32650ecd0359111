"""bench/compare's measuring helpers: the CPU time it reads off other
processes, and the NTS-KE and worker comparisons it prints."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import bench_scripts

compare = bench_scripts.load("compare")

BURN = """
import sys, time
end = time.process_time() + float(sys.argv[1])
while time.process_time() < end:
    pass
print("burnt", flush=True)
time.sleep(30)
"""


@pytest.fixture
def burner() -> Iterator[subprocess.Popen[str]]:
    """A child that burns 0.35 s of CPU, says so, then sleeps."""
    proc = subprocess.Popen([sys.executable, "-c", BURN, "0.35"], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "burnt"
        yield proc
    finally:
        proc.kill()
        proc.wait(5)


def _stat_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / compare.CLK_TCK


def test_cpu_seconds_of_another_process_agrees_with_proc_stat(
    burner: subprocess.Popen[str],
) -> None:
    measured = compare.cpu_seconds(burner.pid)
    # the child burnt 0.35 s after starting an interpreter (tens of ms more)
    assert 0.35 <= measured < 1.5
    # the same total /proc/PID/stat has, there in 10 ms ticks
    assert abs(measured - _stat_seconds(burner.pid)) < 0.05
    # but finer than a tick (a multiple of 10 ms to the microsecond: odds 1 in 5000)
    assert abs(measured * 100 - round(measured * 100)) > 1e-4
    # and an idle process's figure does not move
    time.sleep(0.05)
    assert compare.cpu_seconds(burner.pid) - measured < 0.005


def test_cpu_seconds_counts_the_children_too(burner: subprocess.Popen[str]) -> None:
    child = compare.cpu_seconds(burner.pid)
    own = time.process_time()
    # this test process is the root of a tree holding the burner
    assert compare.cpu_seconds(os.getpid()) >= own + child - 0.01


def test_ke_summary_gives_the_median_of_the_per_round_ratios() -> None:
    results = {
        "chronyd": [{"ke_cpu_ms": 0.30}, {"ke_cpu_ms": 0.25}, {"ke_cpu_ms": 0.40}],
        "ntspy-1w": [{"ke_cpu_ms": 0.27}, {"ke_cpu_ms": 0.25}, {"ke_cpu_ms": 0.48}],
    }
    line = compare.ke_summary(results)
    assert line == "NTS-KE CPU ntspy-1w/chronyd per round: 0.90 1.00 1.20; median 1.00x"


def test_scaling_summary_compares_two_workers_with_one_on_both_cpus() -> None:
    med = {
        "chronyd": {"nts_rate_2cpu": 150_000.0, "ntp_rate_2cpu": 160_000.0},
        "ntspy-1w": {"nts_rate_2cpu": 100_000.0, "ntp_rate_2cpu": 180_000.0},
        "ntspy-2w": {"nts_rate_2cpu": 125_000.0, "ntp_rate_2cpu": 198_000.0},
    }
    line = compare.scaling_summary(med)
    assert line.endswith("2 workers / 1 worker: plain 1.10x, NTS 1.25x")
    # without the runs on both CPUs (--no-scaling) there is nothing to say
    assert compare.scaling_summary({"ntspy-1w": {}, "ntspy-2w": {}}) == ""
