"""The control socket protocol behind ``ntspy ctl``.

One request per connection: a JSON object on one line, ``{"command": NAME,
"args": [...]}``; one JSON object back, ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``. The socket is a Unix socket with
owner-only permissions, so being able to connect is the authorisation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..errors import NtsError

MAX_REQUEST = 4096
MAX_REPLY = 4 << 20
DEFAULT_SOCKET = Path("/run/ntspy/ntspy.sock")

Handler = Callable[[list[str]], Awaitable[Any]]
log = logging.getLogger("ntspy.control")


class ControlError(NtsError):
    """The daemon could not be reached, or refused the command."""


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._client, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            reply = await self._dispatch(line)
        except (TimeoutError, ValueError, asyncio.LimitOverrunError, ConnectionError):
            reply = {"ok": False, "error": "bad request"}
        try:
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        request = json.loads(line)
        if not isinstance(request, dict):
            return {"ok": False, "error": "bad request"}
        command = request.get("command")
        args = request.get("args", [])
        handler = self.handlers.get(command) if isinstance(command, str) else None
        if handler is None or not isinstance(args, list):
            return {"ok": False, "error": f"unknown command {command!r}"}
        try:
            return {"ok": True, "result": await handler([str(a) for a in args])}
        except NtsError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # report, keep serving
            log.exception("control command %s failed", command)
            return {"ok": False, "error": f"internal error: {exc}"}


async def request(path: Path, command: str, args: list[str] | None = None,
                  timeout: float = 5.0) -> Any:
    """Send one command to the daemon and return its result."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
    except FileNotFoundError:
        raise ControlError(
            f"cannot reach the ntspy daemon: no control socket at {path} (is it running?)"
        ) from None
    except (OSError, TimeoutError) as exc:
        raise ControlError(f"cannot reach the ntspy daemon at {path}: {exc}") from None
    try:
        writer.write(json.dumps({"command": command, "args": args or []}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readuntil(b"\n"), timeout)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise ControlError(f"no answer from the ntspy daemon at {path}: {exc}") from None
    finally:
        writer.close()
    reply = json.loads(line)
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "command failed")))
    return reply.get("result")
