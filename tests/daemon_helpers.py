"""Helpers for tests of the client daemon (``ntspy run``) against real servers.

:class:`ClientProc` runs ``python3 -m ntspy run -x`` (the clock is only
measured, never changed) under ``setpriv`` without CAP_SYS_TIME, with every file
in the test's directory and a control socket to query. :class:`ChronydServer`
is a chronyd NTS server on loopback, optionally living an hour in the future
under libfaketime. :class:`TcpProxy` forwards a TCP port and can be shut down,
to take an NTS-KE server away while its NTP server keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ntspy.certs import make_test_pki
from ntspy.control.protocol import ControlError, request
from tests.peers import CHRONYD, LOOPBACK, NO_SYS_TIME, end_process, free_port, wait_for_tcp

T = TypeVar("T")

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
"""Debian's libfaketime (package ``faketime``): shifts the clock of the process it is in."""

FAST_POLL = "iburst nts minpoll -2 maxpoll -1"
"""Sub-second polling (0.25-0.5 s), so a test sees a full reach register in seconds."""


def server_line(host: str, ntp_port: int, ke_port: int, options: str = FAST_POLL) -> str:
    """A chrony ``server`` directive for an NTS server on non-standard ports."""
    return f"server {host} port {ntp_port} ntsport {ke_port} {options}"


def wait_until(check: Callable[[], T | None], timeout: float, what: str,
               interval: float = 0.2) -> T:
    """Call ``check`` until it returns something other than None/False; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@dataclass
class ClientProc:
    """``ntspy run -x -f CONF`` in ``directory``, with ntsdumpdir, driftfile and a socket."""

    directory: Path
    source_lines: Sequence[str]
    extra_lines: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None
    runs: int = field(default=0)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dumpdir.mkdir(exist_ok=True)
        self.write_config()

    @property
    def config_path(self) -> Path:
        return self.directory / "client.conf"

    @property
    def dumpdir(self) -> Path:
        return self.directory / "ntsdump"

    @property
    def driftfile(self) -> Path:
        return self.directory / "drift"

    @property
    def socket_path(self) -> Path:
        return self.directory / "client.sock"

    @property
    def log_path(self) -> Path:
        return self.directory / "client.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def write_config(self) -> None:
        lines = [
            *self.source_lines,
            f"ntsdumpdir {self.dumpdir}",
            f"driftfile {self.driftfile}",
            f"bindcmdaddress {self.socket_path}",
            "cmdport 0",
            f"pidfile {self.directory / 'client.pid'}",
            *self.extra_lines,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, *flags: str) -> None:
        """Start the daemon and wait until its control socket answers."""
        self.runs += 1
        self.socket_path.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*NO_SYS_TIME, sys.executable, "-m", "ntspy", "run", "-x", *flags,
                 "-f", str(self.config_path), "--log-level", "debug"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        wait_until(self._answers, 15.0, f"ntspy run control socket\n{self.log()}", 0.05)

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"ntspy run exited early:\n{self.log()}")
        try:
            self.query("tracking")
        except ControlError:
            return False
        return True

    def stop(self) -> int:
        """SIGTERM by PID, wait for a clean exit (the daemon saves its state then)."""
        return end_process(self.proc) if self.proc is not None else 0

    def query(self, command: str, *args: str) -> Any:
        """One control command, its JSON result (in-process: no interpreter start-up)."""
        return asyncio.run(request(self.socket_path, command, list(args), timeout=3.0))

    def ctl(self, *args: str) -> str:
        """``python3 -m ntspy ctl -s SOCK ARGS...`` as a user runs it; its stdout."""
        out = subprocess.run(
            [sys.executable, "-m", "ntspy", "ctl", "-s", str(self.socket_path), *args],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    def states(self) -> list[tuple[str, str, int]]:
        """(configured name, state character, reach) of every source, in config order."""
        return [(row["configured"], row["state"], row["reach"]) for row in self.query("sources")]

    def threads(self) -> int:
        """``Threads:`` of the daemon process in /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        raise AssertionError("no Threads: line")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class ChronydServer:
    """chronyd -x serving NTS (and NTP) as stratum 1 on loopback ports picked at run time.

    With ``faketime`` (a libfaketime spec such as ``+1h``) chronyd's clock, and
    so the time it serves, is shifted; its certificate is valid either way.
    """

    directory: Path
    faketime: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.certs = make_test_pki(self.directory / "pki")
        (self.directory / "nts").mkdir(exist_ok=True)
        self.ntp_port, self.ke_port = free_port("udp"), free_port("tcp")

    @property
    def ca_cert(self) -> Path:
        return self.certs.ca_cert

    def start(self) -> None:
        d = self.directory
        conf = d / "chrony.conf"
        conf.write_text("\n".join([
            f"port {self.ntp_port}",
            f"ntsport {self.ke_port}",
            f"ntsserverkey {self.certs.server_key}",
            f"ntsservercert {self.certs.server_cert}",
            f"ntsdumpdir {d / 'nts'}",
            "allow 127.0.0.1",
            "local stratum 1",  # no sources: serve our own clock, synchronised
            f"bindaddress {LOOPBACK}",
            f"pidfile {d / 'chronyd.pid'}",
            "cmdport 0",
            f"bindcmdaddress {d / 'chronyd.sock'}",
            "",
        ]))
        env = dict(os.environ)
        if self.faketime:
            # libfaketime preloaded directly rather than through the faketime
            # wrapper, which would stand between us and chronyd's PID.
            env.update(LD_PRELOAD=str(LIBFAKETIME), FAKETIME=self.faketime)
        with (d / "chronyd.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [*NO_SYS_TIME, CHRONYD, "-x", "-u", "root", "-d", "-f", str(conf)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )
        wait_for_tcp(LOOPBACK, self.ke_port)

    def stop(self) -> int:
        return end_process(self.proc) if self.proc is not None else 0


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port`` in a thread, until :meth:`close`.

    After close the port refuses connections, as a stopped NTS-KE server does.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = int(self._listener.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        pairs: dict[socket.socket, socket.socket] = {}
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._listener:
                        client, _addr = sock.accept()
                        self.connections += 1
                        try:
                            upstream = socket.create_connection((LOOPBACK, self.target_port))
                        except OSError:
                            client.close()
                            continue
                        pairs[client], pairs[upstream] = upstream, client
                        sel.register(client, selectors.EVENT_READ, None)
                        sel.register(upstream, selectors.EVENT_READ, None)
                        continue
                    try:
                        data = sock.recv(65536)
                        if data:
                            pairs[sock].sendall(data)
                            continue
                    except OSError:
                        pass
                    other = pairs.pop(sock, None)
                    if other is None:
                        continue  # both ends were ready in this round: already closed
                    pairs.pop(other, None)
                    for s in (sock, other):
                        sel.unregister(s)
                        s.close()
        finally:
            for s in pairs:
                with contextlib.suppress(OSError):
                    s.close()
            sel.close()

    def close(self) -> None:
        """Stop forwarding and stop listening: new connections are refused."""
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

