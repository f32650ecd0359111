#!/usr/bin/env python3
"""ntspy's NTS server side by side with chronyd on this machine.

Usage: ``bench/compare`` (about 8 minutes) or ``bench/compare --quick``
(about 1 minute).  See docs/performance.md for what each figure means.

Everything runs on loopback with ports picked at run time, in a temp dir:
one throwaway CA and one P-256 server certificate shared by both servers.
Each server runs pinned to CPU 0 (``taskset -c 0``), this script and its load
generator to CPU 1.  The servers take turns (chronyd, ntspy with 1 worker,
ntspy with 2 workers, and again, ``--rounds`` times), each freshly started,
and the table shows the median over the rounds.  For NTS-KE CPU, each round
starts all of them at once and they take turns in eight short batches (see
measure_ke).  Then each server runs once more allowed on both CPUs, which two
load generator processes share with it (see measure_scaling): what a second
worker buys.
Every process started here is ended by its PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # a sibling script, not a package

from ntspy.certs import make_test_pki
from ntspy.errors import NtsError

CHRONYD = shutil.which("chronyd") or "/usr/sbin/chronyd"
NO_SYS_TIME = ["setpriv", "--bounding-set", "-sys_time", "--inh-caps", "-sys_time"]
SERVER_CPU = 0
CLIENT_CPU = 1
START_TIMEOUT = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

CHRONYD_NAME = "chronyd"
NTSPY1 = "ntspy-1w"
NTSPY2 = "ntspy-2w"
NTSPY1_FLEET = "ntspy-1w-fleet"  # --keystore: ntspy-1w with its key ring in a Redis fleet
NTSPY1_PURE = "ntspy-1w-py"  # --pure-python: ntspy-1w without its compiled parts


@dataclass(slots=True)
class Settings:
    rounds: int = 5
    seconds: float = 5.0
    window: int = 64
    processes: int = 1
    handshakes: int = 1000
    queries: int = 3
    chrony_default_q: bool = True  # also time `chronyd -Q` with chrony's default iburst
    chrony_clientlog: bool = False
    scaling: bool = True  # also measure each server spread over both CPUs
    keystore: list[str] = field(default_factory=list)  # --keystore: ntspy in a Redis fleet
    variants: list[str] = field(default_factory=lambda: [CHRONYD_NAME, NTSPY1, NTSPY2])


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port found")


# ---------------------------------------------------------------------------
# /proc


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (chronyd's NTS-KE helper, ntspy's workers)."""
    kids = _children()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _process_cpu_clock(pid: int) -> int:
    """Linux's clock id for the CPU time of process ``pid`` (all its threads):
    what ``clock_getcpuclockid(3)`` returns, which Python does not wrap."""
    return ((~pid) << 3) | 2  # CPUCLOCK_SCHED of a whole process


def cpu_seconds(root: int) -> float:
    """CPU time (user + system) of the whole process tree, in seconds.

    The same total ``/proc/PID/stat`` gives as utime + stime, read through
    each process's CPU clock to the nanosecond instead of in 10 ms ticks
    (``/proc/PID/stat`` where that clock cannot be read).
    """
    total = 0.0
    for pid in process_tree(root):
        try:
            total += time.clock_gettime(_process_cpu_clock(pid))
            continue
        except OSError:
            pass
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    return total


def pss_mib(root: int) -> float:
    """Proportional set size of the tree now: shared pages (fork, libraries) counted once."""
    total = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total / 1024


def peak_rss_mib(root: int) -> list[float]:
    """VmHWM of every process in the tree, in MiB."""
    out = []
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out.append(int(line.split()[1]) / 1024)
    return out


# ---------------------------------------------------------------------------
# Servers


@dataclass(slots=True)
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    ntp_port: int
    ke_port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def start_server(name: str, work: Path, pki: Path, settings: Settings,
                 cpus: str = str(SERVER_CPU)) -> Server:
    """Start one server variant pinned to ``cpus`` and wait until it answers NTS-KE."""
    ntp_port, ke_port = free_port(), free_port()
    d = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    (d / "keys").mkdir()
    common = [
        f"port {ntp_port}",
        f"ntsport {ke_port}",
        "bindaddress 127.0.0.1",
        "allow 127.0.0.1",
        f"ntsservercert {pki / 'server.pem'}",
        f"ntsserverkey {pki / 'server.key'}",
        f"ntsdumpdir {d / 'keys'}",
    ]
    pin = ["taskset", "-c", cpus]
    if name == CHRONYD_NAME:
        extra = [] if settings.chrony_clientlog else ["noclientlog"]
        conf = _write(d / "chrony.conf", [
            *common, "local stratum 1", f"pidfile {d / 'chronyd.pid'}", "cmdport 0", *extra,
        ])
        argv = [*pin, *NO_SYS_TIME, CHRONYD, "-x", "-u", "root", "-d", "-f", str(conf)]
    else:
        workers = 2 if name == NTSPY2 else 1
        conf = _write(d / "ntspy.conf", [
            *common, "local stratum 2", f"ntsprocesses {workers}",
            f"bindcmdaddress {d / 'ntspy.sock'}",
            "cmdport 0",
            f"pidfile {d / 'ntspy.pid'}",  # several run at once (measure_ke)
            # the same client log setting as chronyd's (default: neither keeps one)
            *([] if settings.chrony_clientlog else ["noclientlog"]),
            *(settings.keystore if name == NTSPY1_FLEET else []),
        ])
        argv = [*pin, sys.executable, "-m", "ntspy", "serve", "-f", str(conf),
                "--log-level", "warning"]
    # ntspy-1w-py: the same server on its pure-Python paths (NTSPY_NO_ACCEL=1)
    env = {**os.environ, "NTSPY_NO_ACCEL": "1"} if name == NTSPY1_PURE else None
    log = d / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(name, proc, ntp_port, ke_port, log)
    try:
        _wait_ready(server, pki / "ca.pem")
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def redis_fleet(work: Path) -> Iterator[list[str]]:
    """A redis-server on a loopback port, and the lines that put ntspy in its fleet."""
    redis = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    kek = work / "keystore.key"
    kek.write_bytes(os.urandom(32))
    kek.chmod(0o600)
    proc = subprocess.Popen([redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(work)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield [f"ntskeystore redis://127.0.0.1:{port}/0", f"ntskeystorekey {kek}"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_ready(server: Server, ca: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited early:\n{server.log.read_text()}")
        try:
            loadgen.fetch_credentials("localhost", server.ke_port, ca)
            return
        except NtsError as exc:
            last = str(exc)
            time.sleep(0.1)
    raise RuntimeError(f"{server.name} not ready: {last}\n{server.log.read_text()}")


@contextlib.contextmanager
def running(name: str, work: Path, pki: Path, settings: Settings,
            cpus: str = str(SERVER_CPU)) -> Iterator[Server]:
    server = start_server(name, work, pki, settings, cpus)
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------
# Measurements


def measure_load(server: Server, ca: Path, nts: bool, s: Settings, *,
                 processes: int | None = None, busy: bool = True) -> dict[str, float]:
    creds = loadgen.fetch_credentials("localhost", server.ke_port, ca) if nts else None
    before = cpu_seconds(server.pid)
    counts = loadgen.run_load("127.0.0.1", server.ntp_port, seconds=s.seconds, window=s.window,
                              processes=processes or s.processes, creds=creds, busy=busy)
    cpu = cpu_seconds(server.pid) - before
    if counts.invalid or not counts.valid:
        raise RuntimeError(f"{server.name}: bad responses: {counts.to_json()}")
    return {
        "rate": counts.rate,
        "per_cpu_s": counts.valid / cpu if cpu > 0 else 0.0,
        "server_cpu_busy": cpu / counts.seconds,
        "lost": float(counts.lost),
        "verified": float(counts.verified),
    }


KE_SLICES = 8  # NTS-KE batches per server and round, the servers taking turns
KE_WARMUP = 20  # handshakes per server before measuring (first-use set-up)


def measure_ke(work: Path, pki: Path, s: Settings) -> dict[str, dict[str, float]]:
    """NTS-KE server CPU per handshake of every variant, side by side.

    All the servers run at once (idle ones cost nothing) and take turns in
    KE_SLICES batches of ``handshakes / KE_SLICES``, in alternating order:
    the host's noise here drifts over seconds, and this gives every server
    the same share of it, where one long batch each would not.
    """
    ca = pki / "ca.pem"
    batch = max(1, s.handshakes // KE_SLICES)
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(running(name, work, pki, s)) for name in s.variants]
        cpu = dict.fromkeys(s.variants, 0.0)
        done = dict.fromkeys(s.variants, 0)
        seconds = dict.fromkeys(s.variants, 0.0)
        for server in servers:
            loadgen.ke_handshakes("localhost", server.ke_port, ca, KE_WARMUP)
        for turn in range(KE_SLICES):
            for server in servers if turn % 2 == 0 else servers[::-1]:
                before = cpu_seconds(server.pid)
                run = loadgen.ke_handshakes("localhost", server.ke_port, ca, batch)
                cpu[server.name] += cpu_seconds(server.pid) - before
                if run.failed:
                    raise RuntimeError(f"{server.name}: {run.failed} NTS-KE failed: "
                                       f"{run.first_error}")
                done[server.name] += run.ok
                seconds[server.name] += run.seconds
    return {
        name: {"ke_cpu_ms": 1000 * cpu[name] / done[name], "ke_per_s": done[name] / seconds[name]}
        for name in s.variants
    }


def _timed(argv: list[str], ok: Callable[[str], bool]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    wall = time.perf_counter() - start
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    if proc.returncode != 0 or not ok(text):
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}):\n{text}")
    return wall


def ntspy_query(server: Server, ca: Path) -> float:
    """Wall time of ``ntspy query`` for one authenticated sample (new interpreter each time)."""
    argv = [sys.executable, "-m", "ntspy", "query", "--ca", str(ca), "--ke-port",
            str(server.ke_port), "--samples", "1", "--json", "localhost"]
    return _timed(argv, lambda out: '"authenticated": true' in out)


def chronyd_query(server: Server, ca: Path, work: Path, one_sample: bool) -> float:
    """Wall time of ``chronyd -Q`` with an NTS source, until it prints the offset and exits.

    ``one_sample`` adds ``maxsamples 1`` so chronyd stops after one sample;
    without it chronyd takes its usual iburst of 4 samples (about 6 s).
    """
    d = Path(tempfile.mkdtemp(prefix="chronyq-", dir=work))
    source = f"server localhost port {server.ntp_port} ntsport {server.ke_port} nts iburst"
    if one_sample:
        source += " maxsamples 1"
    argv = [*NO_SYS_TIME, CHRONYD, "-Q", "-u", "root", "-t", "30", source,
            f"ntstrustedcerts {ca}", f"pidfile {d / 'chronyd.pid'}", "cmdport 0"]
    return _timed(argv, lambda out: "System clock wrong by" in out)


def measure_round(server: Server, pki: Path, work: Path, s: Settings,
                  first_round: bool) -> dict[str, float]:
    ca = pki / "ca.pem"
    out: dict[str, float] = {"rss_start": max(peak_rss_mib(server.pid))}
    for key, value in measure_load(server, ca, False, s).items():
        out[f"ntp_{key}"] = value
    for key, value in measure_load(server, ca, True, s).items():
        out[f"nts_{key}"] = value
    rss = peak_rss_mib(server.pid)
    out["rss_max"] = max(rss)
    out["pss_sum"] = pss_mib(server.pid)
    out["q_ntspy"] = statistics.median(ntspy_query(server, ca) for _ in range(s.queries))
    out["q_chronyd1"] = statistics.median(
        chronyd_query(server, ca, work, True) for _ in range(s.queries)
    )
    if s.chrony_default_q and first_round:
        out["q_chronyd_default"] = chronyd_query(server, ca, work, False)
    return out


SCALING_CPUS = "0,1"
SCALING_GENERATORS = 2


@contextlib.contextmanager
def affinity(cpus: set[int]) -> Iterator[None]:
    """Run this process (and what it forks meanwhile) on ``cpus``."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def measure_scaling(name: str, work: Path, pki: Path, s: Settings) -> dict[str, float]:
    """Plain and NTS responses/s with the server allowed on both CPUs.

    More worker processes must mean more answers, but on this machine the
    second CPU is the load generator's: here the server (all its processes)
    and two generator processes share both CPUs.  The generators sleep in
    recv instead of busy-polling, so they take only the CPU their own work
    needs and leave the rest to the server.
    """
    ca = pki / "ca.pem"
    out: dict[str, float] = {}
    with running(name, work, pki, s, SCALING_CPUS) as server, \
            affinity({int(c) for c in SCALING_CPUS.split(",")}):
        for kind, nts in (("ntp", False), ("nts", True)):
            r = measure_load(server, ca, nts, s, processes=SCALING_GENERATORS, busy=False)
            out[f"{kind}_rate_2cpu"] = r["rate"]
            out[f"{kind}_server_cpus_2cpu"] = r["server_cpu_busy"]
    return out


# ---------------------------------------------------------------------------
# Report


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0]


def machine_info() -> dict[str, str]:
    import cryptography
    import OpenSSL.SSL
    from cryptography.hazmat.backends.openssl.backend import backend

    import ntspy

    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cpus": str(os.cpu_count()),
        "kernel": platform.release(),
        "loadavg": Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__(),
        "python": platform.python_version(),
        "ntspy": ntspy.__version__,
        "cryptography": f"{cryptography.__version__} ({backend.openssl_version_text()})",
        "pyOpenSSL": f"{OpenSSL.__version__} "
                     f"({OpenSSL.SSL.OpenSSL_version(OpenSSL.SSL.OPENSSL_VERSION).decode()})",
        "chrony": _version([CHRONYD, "-v"]),
    }


@dataclass(slots=True)
class Row:
    label: str
    key: str
    fmt: str
    target: str = ""
    higher_is_better: bool = True


ROWS = [
    Row("plain NTP responses/s", "ntp_rate", "{:,.0f}", ">= 0.5x"),
    Row("  per server CPU-second", "ntp_per_cpu_s", "{:,.0f}"),
    Row("  server CPU busy", "ntp_server_cpu_busy", "{:.0%}"),
    Row("NTS responses/s (AEAD 15)", "nts_rate", "{:,.0f}", ">= 0.5x"),
    Row("  per server CPU-second", "nts_per_cpu_s", "{:,.0f}"),
    Row("  server CPU busy", "nts_server_cpu_busy", "{:.0%}"),
    Row("NTS-KE server CPU ms/handshake", "ke_cpu_ms", "{:.3f}", "<= 1x", False),
    Row("  handshakes/s (client-bound)", "ke_per_s", "{:,.0f}"),
    Row("plain NTP/s, both CPUs (shared, *)", "ntp_rate_2cpu", "{:,.0f}"),
    Row("  server CPUs busy", "ntp_server_cpus_2cpu", "{:.0%}"),
    Row("NTS/s, both CPUs (shared, *)", "nts_rate_2cpu", "{:,.0f}"),
    Row("  server CPUs busy", "nts_server_cpus_2cpu", "{:.0%}"),
    Row("peak RSS, largest process MiB", "rss_max", "{:.1f}", "<= 40 MiB", False),
    Row("  same, before any load MiB", "rss_start", "{:.1f}", "", False),
    Row("PSS after load, all processes MiB", "pss_sum", "{:.1f}", "", False),
    Row("query wall s: ntspy query", "q_ntspy", "{:.3f}", "", False),
    Row("query wall s: chronyd -Q maxsamples 1", "q_chronyd1", "{:.3f}", "", False),
    Row("query wall s: chronyd -Q (iburst)", "q_chronyd_default", "{:.3f}", "", False),
]


def medians(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, rounds in results.items():
        keys = {k for r in rounds for k in r}
        out[name] = {k: statistics.median(r[k] for r in rounds if k in r) for k in keys}
    return out


def render(med: dict[str, dict[str, float]], variants: list[str]) -> str:
    others = [v for v in variants if v != CHRONYD_NAME]
    head = ["metric (median)", *variants, *(f"{v}/chronyd" for v in others), "target"]
    lines: list[list[str]] = [head]
    for row in ROWS:
        cells = [row.label]
        for v in variants:
            value = med.get(v, {}).get(row.key)
            cells.append(row.fmt.format(value) if value is not None else "-")
        base = med.get(CHRONYD_NAME, {}).get(row.key)
        for v in others:
            value = med.get(v, {}).get(row.key)
            cells.append(f"{value / base:.2f}" if value is not None and base else "-")
        cells.append(row.target)
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = []
    for n, line in enumerate(lines):
        text.append("  ".join(
            c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(line)
        ).rstrip())
        if n == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)


def generator_summary(results: dict[str, list[dict[str, float]]]) -> str:
    """The proof that the load generator is not what limits the rates."""
    lines = []
    for kind in ("ntp", "nts"):
        best = max((r for rounds in results.values() for r in rounds),
                   key=lambda r: r[f"{kind}_rate"])
        lines.append(f"load generator, {kind.upper()}: best {best[f'{kind}_rate']:,.0f} valid "
                     f"responses/s, the server's CPU {best[f'{kind}_server_cpu_busy']:.0%} busy "
                     f"meanwhile (near 100%: the server was the limit, not the generator)")
    return "\n".join(lines)


def ke_summary(results: dict[str, list[dict[str, float]]]) -> str:
    """NTS-KE compared round by round: each round measures all the servers in
    the same minute, interleaved, so the per-round ratio cancels the host's
    drift between rounds; their median is the paired comparison."""
    base = results.get(CHRONYD_NAME, [])
    lines = []
    for name, rounds in results.items():
        if name == CHRONYD_NAME:
            continue
        ratios = [r["ke_cpu_ms"] / b["ke_cpu_ms"] for r, b in zip(rounds, base, strict=True)
                  if "ke_cpu_ms" in r and b.get("ke_cpu_ms")]
        if ratios:
            lines.append(f"NTS-KE CPU {name}/chronyd per round: "
                         + " ".join(f"{x:.2f}" for x in ratios)
                         + f"; median {statistics.median(ratios):.2f}x")
    return "\n".join(lines)


def scaling_summary(med: dict[str, dict[str, float]]) -> str:
    """What the second worker buys when the server may use both CPUs."""
    one, two = med.get(NTSPY1, {}), med.get(NTSPY2, {})
    if "nts_rate_2cpu" not in one or "nts_rate_2cpu" not in two:
        return ""
    return (f"(*) server on CPUs {SCALING_CPUS}, shared with {SCALING_GENERATORS} sleeping "
            f"generator processes; 2 workers / 1 worker: plain "
            f"{two['ntp_rate_2cpu'] / one['ntp_rate_2cpu']:.2f}x, NTS "
            f"{two['nts_rate_2cpu'] / one['nts_rate_2cpu']:.2f}x")


def query_summary(med: dict[str, dict[str, float]]) -> str:
    """``ntspy query`` against ``chronyd -Q``, both timed against the same servers."""
    lines = []
    for server, m in med.items():
        parts = [f"against {server}: ntspy query {m['q_ntspy']:.3f} s"]
        parts.append(f"= {m['q_ntspy'] / m['q_chronyd1']:.2f}x chronyd -Q maxsamples 1")
        if "q_chronyd_default" in m:
            parts.append(f"= {m['q_ntspy'] / m['q_chronyd_default']:.2f}x chronyd -Q iburst")
        lines.append(", ".join(parts))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(description="ntspy vs chronyd, side by side on loopback")
    p.add_argument("--quick", action="store_true", help="about one minute: shorter runs")
    p.add_argument("--rounds", type=int, help="rounds of A/B alternation (default 5)")
    p.add_argument("--seconds", type=float, help="seconds of load per run (default 5)")
    p.add_argument("--window", type=int, help="requests in flight per generator process")
    p.add_argument("--processes", type=int, help="load generator processes (default 1)")
    p.add_argument("--handshakes", type=int, help="NTS-KE sessions per run (default 1000)")
    p.add_argument("--chrony-clientlog", action="store_true",
                   help="leave both servers' client logs on (default: noclientlog, see docs)")
    p.add_argument("--only", choices=[CHRONYD_NAME, NTSPY1, NTSPY2, NTSPY1_FLEET, NTSPY1_PURE],
                   action="append",
                   help="run only these servers")
    p.add_argument("--no-scaling", action="store_true",
                   help="skip the runs with the server on both CPUs")
    p.add_argument("--json", type=Path, help="also write every round's figures here")
    p.add_argument("--keystore", action="store_true",
                   help=f"also {NTSPY1_FLEET}: ntspy-1w with ntskeystore in a redis-server "
                        "started here (the cost of docs/scale.md's design on the packet path)")
    p.add_argument("--pure-python", action="store_true",
                   help=f"also {NTSPY1_PURE}: ntspy-1w with NTSPY_NO_ACCEL=1 (no compiled parts)")
    args = p.parse_args(argv)
    s = Settings()
    if args.quick:
        s.rounds, s.seconds, s.handshakes, s.queries = 3, 1.0, 200, 1
        s.chrony_default_q = False
    for name in ("rounds", "seconds", "window", "processes", "handshakes"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    s.chrony_clientlog = args.chrony_clientlog
    s.scaling = not args.no_scaling
    if args.keystore:
        s.variants.append(NTSPY1_FLEET)
    if args.pure_python:
        s.variants.append(NTSPY1_PURE)
    if args.only:
        s.variants = [v for v in s.variants if v in args.only]
    return s, args


def main(argv: list[str] | None = None) -> int:
    s, args = parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2 or (os.cpu_count() or 1) < 2:
        print("compare: needs two CPUs (server on CPU 0, load on CPU 1)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {CLIENT_CPU})
    started = time.monotonic()
    info = machine_info()
    for key, value in info.items():
        print(f"{key:>13}: {value}")
    print(f"{'settings':>13}: {s.rounds} rounds, {s.seconds:g} s load, window {s.window} x "
          f"{s.processes} process(es), {s.handshakes} NTS-KE, {s.queries} queries; "
          f"client logs {'on' if s.chrony_clientlog else 'off (noclientlog)'}")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in s.variants}
    with tempfile.TemporaryDirectory(prefix="ntspy-bench-") as tmp, \
            contextlib.ExitStack() as stack:
        work = Path(tmp)
        pki = work / "pki"
        make_test_pki(pki)  # P-256 key and certificate, the same for both servers
        if args.keystore:
            s.keystore = stack.enter_context(redis_fleet(work))
            print(f"{'fleet':>13}: {NTSPY1_FLEET} uses {s.keystore[0]}")
        for rnd in range(s.rounds):
            for name in s.variants:
                with running(name, work, pki, s) as server:
                    r = measure_round(server, pki, work, s, rnd == 0)
                results[name].append(r)
                print(f"round {rnd + 1}/{s.rounds} {name:8}: NTP {r['ntp_rate']:>9,.0f}/s "
                      f"(server CPU {r['ntp_server_cpu_busy']:.0%})  NTS {r['nts_rate']:>9,.0f}/s "
                      f"(server CPU {r['nts_server_cpu_busy']:.0%})  "
                      f"RSS {r['rss_max']:.1f} MiB  query {r['q_ntspy']:.3f} s",
                      flush=True)
            ke = measure_ke(work, pki, s)
            for name in s.variants:
                results[name][-1].update(ke[name])
            print(f"round {rnd + 1}/{s.rounds} NTS-KE ms/handshake: " + "  ".join(
                f"{name} {ke[name]['ke_cpu_ms']:.3f}" for name in s.variants), flush=True)
            if s.scaling:
                for name in s.variants:
                    sc = measure_scaling(name, work, pki, s)
                    results[name][-1].update(sc)
                    print(f"round {rnd + 1}/{s.rounds} {name:8} on CPUs {SCALING_CPUS}: "
                          f"NTP {sc['ntp_rate_2cpu']:>9,.0f}/s "
                          f"(server {sc['ntp_server_cpus_2cpu']:.0%})  "
                          f"NTS {sc['nts_rate_2cpu']:>9,.0f}/s "
                          f"(server {sc['nts_server_cpus_2cpu']:.0%})", flush=True)
    med = medians(results)
    print()
    print(render(med, s.variants))
    print()
    print(ke_summary(results))
    if s.scaling:
        print(scaling_summary(med))
    print(query_summary(med))
    print(generator_summary(results))
    print(f"\nloadavg after: {Path('/proc/loadavg').read_text().strip()}; "
          f"total {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rounds": results, "median": med},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
