"""The command socket of both daemons: chrony's command protocol (candm, version 6).

One protocol, two transports, as chronyd has them:

- a Unix datagram socket at the path ``bindcmdaddress`` names (default
  :data:`DEFAULT_SOCKET`), where the real ``chronyc -h PATH`` and ``ntspy ctl
  -s PATH`` both talk.  The socket is open to every local user (mode 0666 in a
  0755 directory); what a request may do is decided per datagram from the
  sender's kernel-supplied credentials (``SO_PASSCRED``): monitoring for
  everyone, changing commands only for root and the daemon's own user;
- UDP on ``cmdport`` (default 323) at ``bindcmdaddress`` 127.0.0.1 and ::1,
  answering loopback only and, as chronyd, only the monitoring commands chrony
  opens to the network (:func:`candm.is_allowed`).

Standard chrony requests are answered by :mod:`ntspy.control.chrony` from the
daemon's views; ``ntspy ctl`` asks for those same views whole, as JSON, with
ntspy's extension request (``NTSPY_JSON``, Unix socket only), and renders them
itself.  A refused request gets chrony's status ("501 Not authorised") and the
reason is logged once.

Every datagram is parsed by the sans-I/O codec (:mod:`ntspy.control.candm`);
garbage is dropped or answered with chrony's error status, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import NtsError
from . import candm
from .chrony import READ_ONLY_VIEWS, ChronyAdapter

DEFAULT_SOCKET = Path("/run/ntspy/ntspy.sock")
DEFAULT_CMDPORT = 323
MAX_DATAGRAM = 4096
MAX_IN_FLIGHT = 32  # requests being answered at once; more are dropped (counted)
DOCUMENT_KEPT_S = 10.0  # how long the pages of one long answer come from one document
MAX_DOCUMENTS = 64

Handler = Callable[[list[str]], Awaitable[Any]]
log = logging.getLogger("ntspy.control")

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


class ControlError(NtsError):
    """The daemon could not be reached, or refused the command."""


class ControlServer:
    """Answers chrony command requests on a Unix datagram socket at ``path`` and on
    UDP ``udp`` addresses (host, port), from ``handlers`` (the daemon's views and
    commands by name)."""

    def __init__(self, path: Path | None, handlers: dict[str, Handler],
                 udp: Sequence[tuple[str, int]] = ()) -> None:
        self.path = path
        self.handlers = handlers
        self.udp = list(udp)
        self.requests = 0
        self.dropped = 0
        self.adapter = ChronyAdapter(handlers, lambda: (self.requests, self.dropped))
        self._socks: list[tuple[socket.socket, bool]] = []  # (socket, is the Unix one)
        self._tasks: set[asyncio.Task[None]] = set()
        self._refusals_logged: set[tuple[int, str]] = set()
        # A long view goes out in pages: every page of one listing comes from the
        # same document, kept a few seconds per asker and query.
        self._documents: dict[tuple[Any, ...], tuple[float, bytes]] = {}

    @property
    def udp_addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s, unix in self._socks if not unix]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.path is not None:
            sock = _unix_socket(self.path)
            self._socks.append((sock, True))
        for host, port in self.udp:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((host, port))
            except OSError as exc:
                sock.close()
                # As chronyd: the daemon runs on without that command socket.
                log.error("Could not open command socket on %s port %d: %s", host, port,
                          exc.strerror or exc)
                continue
            sock.setblocking(False)
            self._socks.append((sock, False))
        for sock, unix in self._socks:
            loop.add_reader(sock.fileno(), self._readable, sock, unix)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sock, _ in self._socks:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())
            sock.close()
        self._socks.clear()
        for task in list(self._tasks):
            task.cancel()
        if self.path is not None:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(self.path.lstat().st_mode):
                    self.path.unlink()

    # -- receiving -------------------------------------------------------------

    def _readable(self, sock: socket.socket, unix: bool) -> None:
        for _ in range(64):
            try:
                if unix:
                    data, ancillary, _, peer = sock.recvmsg(
                        MAX_DATAGRAM, socket.CMSG_SPACE(_UCRED.size))
                else:
                    data, peer = sock.recvfrom(MAX_DATAGRAM)
                    ancillary = []
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("command socket: receive failed: %s", exc)
                return
            if len(self._tasks) >= MAX_IN_FLIGHT:
                self.dropped += 1
                continue
            uid = _sender_uid(ancillary) if unix else None
            task = asyncio.get_running_loop().create_task(
                self._answer(sock, unix, data, peer, uid))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, sock: socket.socket, unix: bool, data: bytes, peer: Any,
                      uid: int | None) -> None:
        self.requests += 1
        try:
            reply = await self._reply(unix, data, peer, uid)
        except Exception:  # report, keep serving
            log.exception("command request failed")
            return
        if reply is None or not peer:
            return  # chronyc always binds its socket; an unbound sender gets nothing
        try:
            sock.sendto(reply, peer)
        except OSError as exc:
            log.debug("command socket: cannot answer %r: %s", peer, exc)

    async def _reply(self, unix: bool, data: bytes, peer: Any, uid: int | None) -> bytes | None:
        request = candm.parse_request(data)
        if isinstance(request, candm.RequestError):
            return request.reply
        command = request.command
        if not unix:
            local = _is_loopback(peer[0])
            if not local:
                return None  # as chronyd with its default cmdallow: not even a refusal
            if not candm.is_allowed(command, unix_socket=False, localhost=True):
                self._refused(command, "over UDP (use the Unix socket)")
                return candm.build_reply(request, candm.Status.UNAUTH)
        privileged = uid is not None and uid in (0, os.geteuid())
        if command == candm.Command.NTSPY_JSON:
            return await self._json(request, privileged, unix, peer)
        if unix and not privileged and not candm.is_read_only(command):
            self._refused(command, f"from uid {uid} (only root and the daemon's user)")
            return candm.build_reply(request, candm.Status.UNAUTH)
        status, body = await self.adapter.answer(request)
        return candm.build_reply(request, status, body)

    async def _json(self, request: candm.Request, privileged: bool, unix: bool,
                    peer: Any) -> bytes:
        assert isinstance(request.body, candm.JsonQuery)
        name, args = request.body.command, [str(a) for a in request.body.args]
        if not unix:
            return candm.build_reply(request, candm.Status.UNAUTH)
        key = (peer, name, tuple(args))
        now = time.monotonic()
        kept = self._documents.get(key)
        if request.body.offset > 0 and kept is not None and now - kept[0] < DOCUMENT_KEPT_S:
            return candm.build_json_reply(request, kept[1])
        if not privileged and name not in READ_ONLY_VIEWS:
            self._refused(candm.Command.NTSPY_JSON, f"{name}: only root and the daemon's user")
            reply: dict[str, Any] = {
                "ok": False,
                "error": f"{name}: not authorised (only root and the daemon's user may "
                         "change the daemon)",
            }
        else:
            reply = await self.call(name, args)
        document = json.dumps(reply, sort_keys=True).encode()
        if len(document) > candm.NTSPY_JSON_MAX_CHUNK:
            if len(self._documents) >= MAX_DOCUMENTS:
                oldest = min(self._documents, key=lambda k: self._documents[k][0])
                del self._documents[oldest]
            self._documents[key] = (now, document)
        return candm.build_json_reply(request, document)

    async def call(self, name: str, args: list[str]) -> dict[str, Any]:
        """One handler by name, as the JSON envelope ``ntspy ctl`` gets."""
        handler = self.handlers.get(name)
        if handler is None:
            return {"ok": False, "error": f"unknown command {name!r}"}
        try:
            return {"ok": True, "result": await handler(args)}
        except NtsError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # report, keep serving
            log.exception("control command %s failed", name)
            return {"ok": False, "error": f"internal error: {exc}"}

    def _refused(self, command: int, why: str) -> None:
        key = (int(command), why)
        if key not in self._refusals_logged and len(self._refusals_logged) < 256:
            self._refusals_logged.add(key)
            name = candm.Command(command).name if command in candm.Command._value2member_map_ \
                else str(command)
            log.info("command %s refused %s", name, why)


def _unix_socket(path: Path) -> socket.socket:
    """The Unix datagram socket at ``path``: reachable by every local user, who is
    then told apart by the credentials the kernel attaches to each datagram."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(str(path))
        os.chmod(path, 0o666)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _sender_uid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS \
                and len(data) >= _UCRED.size:
            return int(_UCRED.unpack_from(data)[1])
    return None


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


# -- the client side (ntspy ctl) ------------------------------------------------------


async def request(path: Path, command: str, args: list[str] | None = None,
                  timeout: float = 5.0) -> Any:
    """Send one command to the daemon at ``path`` and return its result.

    Over the Unix socket with ntspy's JSON extension of chrony's protocol: the
    result is the daemon's view whole, paged if it is long.  Our own end is a
    socket in a fresh directory of ours (as chronyc's, a path: an abstract name
    would not reach a daemon in another network namespace), open to the daemon
    whatever user it runs as; answers are matched by their random sequence.
    """
    pager = candm.JsonPager(command, args or [])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    own = Path(tempfile.mkdtemp(prefix="ntspy-ctl-"))
    try:
        own.chmod(0o711)  # the daemon may pass through, not list
        sock.bind(str(own / "ctl.sock"))
        os.chmod(own / "ctl.sock", 0o666)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(
                f"cannot reach the ntspy daemon: no control socket at {path} (is it running?)"
            ) from None
        except OSError as exc:
            raise ControlError(f"cannot reach the ntspy daemon at {path}: {exc}") from None
        while not pager.done:
            await _exchange(loop, sock, pager, deadline, path)
    finally:
        sock.close()
        shutil.rmtree(own, ignore_errors=True)
    reply = pager.result()
    if not isinstance(reply, dict) or not reply.get("ok"):
        error = reply.get("error", "command failed") if isinstance(reply, dict) else "bad reply"
        raise ControlError(str(error))
    return reply.get("result")


async def _exchange(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                    pager: candm.JsonPager, deadline: float, path: Path) -> None:
    """One page: sent again (new sequence, as chronyc) after 1, 2, 4 s unanswered."""
    wait = 1.0
    attempt = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ControlError(f"no answer from the ntspy daemon at {path}")
        try:
            sock.send(pager.next_request(secrets.randbits(32), attempt))
        except OSError as exc:
            raise ControlError(f"cannot reach the ntspy daemon at {path}: {exc}") from None
        until = time.monotonic() + min(wait, left)
        while True:
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, MAX_DATAGRAM), remaining)
            except TimeoutError:
                break
            except OSError as exc:
                raise ControlError(f"no answer from the ntspy daemon at {path}: {exc}") from None
            try:
                pager.feed(data)
                return
            except candm.ReplyError:
                continue  # a late answer to an earlier try: keep waiting
            except candm.CommandFailed as exc:
                raise ControlError(candm.status_text(exc.status)) from None
            except candm.CandmError as exc:
                raise ControlError(f"bad answer from the ntspy daemon: {exc}") from None
        attempt += 1
        wait *= 2


def udp_addresses(config: Any) -> list[tuple[str, int]]:
    """Where the UDP command socket listens: ``cmdport`` (0: nowhere) on the IPv4 and
    IPv6 ``bindcmdaddress`` given, else 127.0.0.1 and ::1, as chronyd."""
    port = int(config.cmdport)
    if port == 0:
        return []
    ips = [a for a in config.bindcmdaddress if not a.startswith("/")]
    v4 = next((a for a in ips if ":" not in a), "127.0.0.1")
    v6 = next((a for a in ips if ":" in a), "::1")
    return [(v4, port), (v6, port)]


def control_path(config: Any) -> Path:
    """Where the Unix command socket is: the first ``bindcmdaddress`` that is a path,
    else :data:`DEFAULT_SOCKET`."""
    for entry in config.bindcmdaddress:
        if entry.startswith("/"):
            return Path(entry)
    return DEFAULT_SOCKET
