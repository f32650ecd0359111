"""Persisted state (client cookies, server keys, drift): atomic writes, checked reads.

A crash must never leave a half-written file, and a damaged file must be
noticed, set aside and ignored rather than trusted or fatal.  Hence:

* :func:`atomic_write` writes a temp file in the same directory, fsyncs it,
  renames it over the old file and fsyncs the directory;
* :func:`encode_state`/:func:`decode_state` wrap a JSON payload in a small
  container (magic line with kind and version, JSON line, SHA-256 line), so
  truncation, bit flips, a file of the wrong kind or from a newer ntspy are
  all detected;
* :func:`quarantine` renames a bad file aside instead of deleting it.

The checksum detects accidents, not attackers: whoever can write the file can
recompute it.  Secrets are protected by file modes (:func:`check_permissions`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import StateFileError, StateFileUnreadable

MAGIC = b"ntspy-state"
FORMAT_VERSION = 1
"""Version of the container itself; payload versions are the caller's ``version``."""
CHECKSUM_ALGORITHM = "sha256"
DEFAULT_MAX_SIZE = 1 << 20

_KIND_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)
_VERSION_RE = re.compile(r"[1-9][0-9]{0,8}", re.ASCII)


# --------------------------------------------------------------------------
# files


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file.

    The parent directory is created (mode 0o700) if missing.  Raises
    :class:`StateFileError` when anything fails; the old file is then untouched
    and no temporary file is left behind.
    """
    path = Path(path)
    parent = path.parent
    # One fixed temporary name per file: a crash mid-write leaves at most one,
    # which the next write replaces (unique names would pile up, each holding
    # whatever secret the file holds).
    tmp_name = str(temp_path(path))
    try:
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)  # never write through a link someone left there
        fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise StateFileError(f"cannot write {path}: {_reason(exc)}") from exc
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)  # the data must be on disk before the rename can expose it
        finally:
            os.close(fd)
        os.replace(tmp_name, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            raise StateFileError(f"cannot write {path}: {_reason(exc)}") from exc
        raise
    _fsync_directory(parent)


def temp_path(path: Path) -> Path:
    """Where :func:`atomic_write` stages ``path`` before the rename."""
    return path.with_name(f".{path.name}.tmp")


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable.  Some file systems refuse fsync on a
    # directory; the new file is in place anyway, so that is not an error.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_state(path: Path, *, max_size: int = DEFAULT_MAX_SIZE) -> bytes | None:
    """The bytes of a state file, or None if it does not exist.

    Raises :class:`StateFileError` if it cannot be read, is not a regular file
    or is larger than ``max_size``.
    """
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the daemon.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileUnreadable(f"cannot read {path}: {_reason(exc)}") from exc
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise StateFileError(f"{path} is not a regular file")
            data = f.read(max_size + 1)
    except IsADirectoryError:
        raise StateFileError(f"{path} is not a regular file") from None
    except OSError as exc:
        raise StateFileUnreadable(f"cannot read {path}: {_reason(exc)}") from exc
    if len(data) > max_size:
        raise StateFileError(f"{path} is larger than {max_size} bytes")
    return data


def quarantine(path: Path) -> Path | None:
    """Rename a bad file to ``PATH.corrupt-N`` (first free N) so nothing is lost.

    Returns the new path, or None if ``path`` does not exist.
    """
    path = Path(path)
    for n in itertools.count(1):
        candidate = path.with_name(f"{path.name}.corrupt-{n}")
        if os.path.lexists(candidate):
            continue
        try:
            os.rename(path, candidate)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateFileError(f"cannot move {path} aside: {_reason(exc)}") from exc
        return candidate
    raise AssertionError("unreachable")  # itertools.count never ends


def set_aside(path: Path) -> Path | None:
    """Move whatever unusable thing is at ``path`` (a damaged file, a directory, a
    FIFO) out of the way, so a good file can be written there and nothing is lost.

    Returns where it went, or None if there was nothing or it could not be moved.
    """
    if not os.path.lexists(path):
        return None
    try:
        return quarantine(path)
    except StateFileError:
        return None


def check_permissions(path: Path) -> str | None:
    """A warning if group or others may read or write a file holding secrets.

    None when the file is private to its owner or does not exist.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot check permissions of {path}: {_reason(exc)}"
    who = [name for name, bits in (("group", 0o070), ("others", 0o007)) if mode & bits]
    if not who:
        return None
    return (
        f"{path} holds secrets but is accessible by {' and '.join(who)} "
        f"(mode {stat.S_IMODE(mode):04o}); restrict it with chmod 600"
    )


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


# --------------------------------------------------------------------------
# container


@dataclass(slots=True)
class StateFile:
    """A versioned, checksummed JSON document of one ``kind``.

    On disk::

        ntspy-state 1 <kind> <version>\\n
        <payload as one line of ASCII JSON>\\n
        sha256 <hex digest of the two lines above>\\n
    """

    kind: str
    version: int
    payload: dict[str, Any]

    def encode(self) -> bytes:
        """The file's bytes; :class:`StateFileError` if the payload is not JSON."""
        if not _KIND_RE.fullmatch(self.kind):
            raise StateFileError(f"invalid state kind {self.kind!r}")
        if not _VERSION_RE.fullmatch(str(self.version)):
            raise StateFileError(f"invalid state version {self.version!r}")
        if not isinstance(self.payload, dict):
            raise StateFileError("state payload must be a dict")
        try:
            # ensure_ascii keeps the body on one line whatever the strings hold
            body = json.dumps(
                self.payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                allow_nan=False,
            ).encode("ascii")  # fmt: skip
        except (TypeError, ValueError) as exc:
            raise StateFileError(f"state payload is not JSON-serialisable: {exc}") from exc
        header = b"%s %d %s %d" % (MAGIC, FORMAT_VERSION, self.kind.encode(), self.version)
        signed = header + b"\n" + body + b"\n"
        return signed + _trailer(signed)

    @classmethod
    def decode(cls, data: bytes, kind: str, max_version: int) -> StateFile:
        """Check and parse a state file; any damage is a :class:`StateFileError`."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise StateFileError("state data must be bytes")
        data = bytes(data)
        lines = data.split(b"\n")
        if not lines[0].startswith(MAGIC + b" "):
            raise StateFileError("not an ntspy state file (bad magic)")
        if len(lines) != 4 or lines[3] != b"":
            raise StateFileError("state file is truncated or malformed")
        header, body, trailer = lines[0], lines[1], lines[2]
        signed = header + b"\n" + body + b"\n"
        # Exact comparison, so even a flipped case bit in the hex digest counts.
        if trailer + b"\n" != _trailer(signed):
            raise StateFileError("state file checksum mismatch (corrupt or truncated)")
        fields = header.split(b" ")
        if len(fields) != 4 or fields[1] != str(FORMAT_VERSION).encode():
            raise StateFileError("unsupported state file format")
        if fields[2] != kind.encode():
            found = fields[2].decode("ascii", "backslashreplace")
            raise StateFileError(f"state file holds {found!r}, expected {kind!r}")
        version_text = fields[3].decode("ascii", "replace")
        if not _VERSION_RE.fullmatch(version_text):
            raise StateFileError(f"invalid state version {version_text!r}")
        version = int(version_text)
        if version > max_version:
            raise StateFileError(
                f"{kind} state version {version} is newer than this ntspy reads ({max_version})"
            )
        try:
            payload = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise StateFileError(f"state file body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise StateFileError("state file body is not a JSON object")
        return cls(kind=kind, version=version, payload=payload)


def _trailer(signed: bytes) -> bytes:
    return f"{CHECKSUM_ALGORITHM} {hashlib.sha256(signed).hexdigest()}\n".encode("ascii")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def encode_state(kind: str, version: int, payload: dict[str, Any]) -> bytes:
    """Bytes of a state file of ``kind`` holding ``payload`` (a JSON object)."""
    return StateFile(kind, version, payload).encode()


def decode_state(data: bytes, kind: str, max_version: int) -> dict[str, Any]:
    """The payload of a state file; :class:`StateFileError` on bad magic, wrong
    kind, bad checksum, truncation, bad JSON or a version above ``max_version``.
    Use :meth:`StateFile.decode` to learn the version too."""
    return StateFile.decode(data, kind, max_version).payload


def save_state(path: Path, kind: str, version: int, payload: dict[str, Any]) -> None:
    """Encode and atomically write a private (0o600) state file."""
    atomic_write(path, encode_state(kind, version, payload), 0o600)


def load_state(
    path: Path, kind: str, max_version: int, *, max_size: int = DEFAULT_MAX_SIZE
) -> StateFile | None:
    """Read a state file; None if missing.

    A file whose content is damaged is moved aside with :func:`quarantine` and
    a :class:`StateFileError` naming the new place is raised, so the caller can
    log it and start afresh.  Files that cannot be read are left where they are.
    """
    data = read_state(path, max_size=max_size)
    if data is None:
        return None
    try:
        return StateFile.decode(data, kind, max_version)
    except StateFileError as exc:
        moved = quarantine(path)
        where = f"; moved to {moved}" if moved else ""
        raise StateFileError(f"{path}: {exc}{where}") from exc


# --------------------------------------------------------------------------
# binary values inside payloads


def b64(data: bytes) -> str:
    """Standard base64 text for a binary value in a payload."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """Inverse of :func:`b64`; :class:`StateFileError` on anything not strict base64."""
    if not isinstance(text, str):
        raise StateFileError(f"expected a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII text
        raise StateFileError(f"invalid base64 value: {exc}") from None
