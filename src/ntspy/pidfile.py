"""chrony's ``pidfile``: one running instance per configuration, named by its pid.

The file is locked (``flock``) for as long as the daemon lives, so a stale file
left by a crash never blocks a start, and a second instance learns which
process holds it instead of stealing the first one's sockets.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .errors import NtsError


class AlreadyRunning(NtsError):
    """Another instance holds the pidfile."""


class PidFile:
    """A held pidfile; :meth:`release` (or the process's end) lets it go."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"another instance is running (pid {holder}, pidfile {path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd: int | None = fd

    def release(self) -> None:
        """Remove the file and drop the lock (a no-op the second time)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # after dropping root the directory may be closed
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
