"""Helpers for tests that run real daemons: ``ntspy serve``, chronyd, NTPsec's ntpd.

Every daemon runs under ``setpriv`` without CAP_SYS_TIME (it could not step
the clock even if it tried), listens on loopback ports picked at run time,
keeps every file it writes in the test's temp dir, and is ended by PID.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ntspy.certs import CertPaths, make_test_pki
from ntspy.control.protocol import request
from ntspy.errors import NtsError

NO_SYS_TIME = ["setpriv", "--bounding-set", "-sys_time", "--inh-caps", "-sys_time"]
CHRONYD = shutil.which("chronyd") or "/usr/sbin/chronyd"
NTPSEC_DIR = Path(os.environ.get("NTSPY_NTPSEC_DIR", "/opt/ntspy-peers/ntpsec"))
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
LOOPBACK = "127.0.0.1"


def free_port(kind: Literal["udp", "tcp"] = "udp", host: str = LOOPBACK) -> int:
    """A loopback port the kernel just picked as free for ``kind``."""
    stype = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, stype) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_tcp(host: str, port: int, timeout: float = START_TIMEOUT) -> None:
    """Block until ``host``:``port`` accepts a TCP connection."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing accepts on {host}:{port}") from None
            time.sleep(0.05)


def ntp_client_packet() -> bytes:
    """A minimal NTPv4 client request (mode 3) with a random transmit timestamp."""
    return bytes([0x23]) + bytes(39) + os.urandom(8)


def wait_for_udp_ntp(host: str, port: int, timeout: float = START_TIMEOUT) -> bytes:
    """Block until an NTP server on ``host``:``port`` answers; return the answer."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while True:
            s.sendto(ntp_client_packet(), (host, port))
            try:
                return s.recv(2048)
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no NTP answer from {host}:{port}") from None
                time.sleep(0.05)


def end_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM by PID, wait, SIGKILL if it does not go; return the exit status."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    return int(proc.returncode)


@dataclass
class ServerProc:
    """A running ``ntspy serve`` subprocess and everything needed to talk to it."""

    directory: Path
    config_path: Path
    certs: CertPaths
    ntp_port: int
    ke_port: int
    control: Path
    dumpdir: Path
    log_path: Path
    netns: bool = False
    proc: subprocess.Popen[bytes] | None = None
    runs: int = field(default=0)
    pure_python: bool = False  # NTSPY_NO_ACCEL=1: no compiled engine or accelerator

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        serve = [sys.executable, "-m", "ntspy", "serve", "-f", str(self.config_path)]
        if self.netns:
            # A private network namespace, for peers (NTPsec) that insist on
            # port 123: nothing outside this test can see or clash with it.
            script = 'ip link set lo up && exec "$@"'
            return [*NO_SYS_TIME, "unshare", "--net", "sh", "-c", script, "sh", *serve]
        return [*NO_SYS_TIME, *serve]

    def start(self, wait: bool = True) -> None:
        """Start the daemon; with ``wait``, return once NTS-KE and control answer."""
        self.runs += 1
        with self.log_path.open("ab") as log:
            env = {**os.environ, "NTSPY_NO_ACCEL": "1"} if self.pure_python else None
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env,
            )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"ntspy serve exited early:\n{self.log()}")
            # The control socket opens after the KE and NTP sockets listen; a
            # probe on the KE port instead would show up in the counters.
            try:
                self.stats()
                return
            except (OSError, NtsError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ntspy serve did not come up:\n{self.log()}") from None
                time.sleep(0.05)

    def stats(self) -> dict[str, int]:
        """``serverstats`` over the control socket."""
        # In a thread of its own, so async tests can call it too.
        with ThreadPoolExecutor(1) as pool:
            result = pool.submit(
                asyncio.run, request(self.control, "serverstats", timeout=3.0)
            ).result()
        assert isinstance(result, dict)
        return {str(k): int(v) for k, v in result.items()}

    async def astats(self) -> dict[str, int]:
        """:meth:`stats` for async tests."""
        result = await request(self.control, "serverstats", timeout=3.0)
        assert isinstance(result, dict)
        return {str(k): int(v) for k, v in result.items()}

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self) -> int:
        """SIGTERM by PID and wait; returns the exit status."""
        if self.proc is None:
            return 0
        return end_process(self.proc)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def write_server_config(
    directory: Path,
    certs: CertPaths,
    ntp_port: int,
    ke_port: int,
    extra_lines: Iterable[str] = (),
    ntsprocesses: int = 1,
    allow: str = "allow 127.0.0.1",
) -> Path:
    dumpdir = directory / "ntsdump"
    dumpdir.mkdir(exist_ok=True)
    lines = [
        f"port {ntp_port}",
        f"ntsport {ke_port}",
        f"bindaddress {LOOPBACK}",
        allow,
        "local stratum 1",
        f"ntsservercert {certs.server_cert}",
        f"ntsserverkey {certs.server_key}",
        f"ntsdumpdir {dumpdir}",
        f"ntsprocesses {ntsprocesses}",
        f"bindcmdaddress {directory / 'ntspy.sock'}",
        "cmdport 0",
        f"pidfile {directory / 'ntspy.pid'}",
        *extra_lines,
    ]
    path = directory / "ntspy.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare_ntspy_server(
    tmp_path: Path,
    extra_lines: Sequence[str] = (),
    ntsprocesses: int = 1,
    allow: str = "allow 127.0.0.1",
    netns: bool = False,
    certs: CertPaths | None = None,
) -> ServerProc:
    """Write the PKI and config for a server in ``tmp_path / 'server'``; do not start it."""
    directory = tmp_path / "server"
    directory.mkdir(parents=True, exist_ok=True)
    certs = certs or make_test_pki(directory / "pki")
    ntp_port, ke_port = free_port("udp"), free_port("tcp")
    config = write_server_config(
        directory, certs, ntp_port, ke_port, extra_lines, ntsprocesses, allow
    )
    return ServerProc(
        directory=directory,
        config_path=config,
        certs=certs,
        ntp_port=ntp_port,
        ke_port=ke_port,
        control=directory / "ntspy.sock",
        dumpdir=directory / "ntsdump",
        log_path=directory / "ntspy.log",
        netns=netns,
    )


def start_ntspy_server(
    tmp_path: Path,
    extra_lines: Sequence[str] = (),
    ntsprocesses: int = 1,
    allow: str = "allow 127.0.0.1",
    netns: bool = False,
    pure_python: bool = False,
) -> ServerProc:
    """Start ``ntspy serve`` on loopback and wait until it serves NTS-KE."""
    server = prepare_ntspy_server(tmp_path, extra_lines, ntsprocesses, allow, netns)
    server.pure_python = pure_python
    server.start()
    return server


def run_ntspy_serve_once(config: Path, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """Run ``ntspy serve`` expecting it to fail at start-up; return its exit and output."""
    return subprocess.run(
        [*NO_SYS_TIME, sys.executable, "-m", "ntspy", "serve", "-f", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def run_chronyd_query(
    tmp_path: Path,
    ke_port: int,
    ca_cert: Path,
    host: str = LOOPBACK,
    timeout: int = 10,
    samples: int = 2,
) -> str:
    """``chronyd -Q`` as an NTS client of ``host``:``ke_port``; returns its output.

    chronyd never touches the clock with -Q, and runs without CAP_SYS_TIME
    anyway; its pid file, command socket and NTS dump dir live in ``tmp_path``.
    """
    directory = tmp_path / "chronyd-q"
    directory.mkdir(exist_ok=True)
    conf = directory / "chrony.conf"
    conf.write_text(
        "\n".join(
            [
                f"server {host} port {free_port('udp')} ntsport {ke_port} iburst nts"
                f" maxsamples {samples}",
                f"ntstrustedcerts {ca_cert}",
                f"pidfile {directory / 'chronyd.pid'}",
                "cmdport 0",
                f"bindcmdaddress {directory / 'chronyd.sock'}",
                f"ntsdumpdir {directory}",
                "",
            ]
        )
    )
    proc = subprocess.run(
        [*NO_SYS_TIME, CHRONYD, "-Q", "-u", "root", "-t", str(timeout), "-f", str(conf)],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        stdin=subprocess.DEVNULL,
    )
    return proc.stdout + proc.stderr


def ntpsec_ntpd() -> Path:
    """The NTPsec ntpd fetched by tools/fetch-ntpsec.sh."""
    return NTPSEC_DIR / "usr" / "sbin" / "ntpd"


@dataclass
class NtpsecClient:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        return end_process(self.proc)


def start_ntpsec_client(
    tmp_path: Path,
    server: ServerProc,
    host: str = "localhost",
) -> NtpsecClient:
    """NTPsec's ntpd as an NTS client of ``server``, in the server's network namespace.

    ntpd always binds port 123, so ``server`` must run with ``netns=True``: ntpd
    joins that private namespace and never meets the host's port 123. It runs
    in the foreground (-n) as root without CAP_SYS_TIME, with ``disable ntp``
    so it does not even try to discipline the clock, and with its drift file,
    log, statistics and pid file in ``tmp_path``.
    """
    assert server.netns, "NTPsec needs the server in a private network namespace"
    directory = tmp_path / "ntpsec"
    directory.mkdir(exist_ok=True)
    conf = directory / "ntp.conf"
    log = directory / "ntpd.log"
    conf.write_text(
        "\n".join(
            [
                f"server {host}:{server.ke_port} nts ca {server.certs.ca_cert}"
                " iburst minpoll 1 maxpoll 2",
                "disable ntp",
                f"driftfile {directory / 'ntp.drift'}",
                f"statsdir {directory}/",
                f"logfile {log}",
                "interface ignore wildcard",
                "interface listen 127.0.0.1",
                "",
            ]
        )
    )
    ntpd = ntpsec_ntpd()
    proc = subprocess.Popen(
        [
            "nsenter", f"--net=/proc/{server.pid}/ns/net",
            *NO_SYS_TIME, str(ntpd), "-n", "-d",
            "-c", str(conf), "-p", str(directory / "ntpd.pid"), "-l", str(log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    return NtpsecClient(proc, log)


REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """Debian's redis-server on a loopback port picked at run time, nothing saved to
    disk (so a restart comes back empty), ended by its PID; for ``ntskeystore`` tests."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port("tcp")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        """Resume it if paused, then SIGTERM and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(timeout=STOP_TIMEOUT)


MetricSamples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""A scrape: (sample name, sorted labels) -> value."""


def scrape_metrics(port: int, host: str = LOOPBACK) -> MetricSamples:
    """GET /metrics of a ``metricsaddress`` endpoint, parsed with prometheus_client's parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
