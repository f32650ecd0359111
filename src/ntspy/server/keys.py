"""The server's master key ring on disk (``ntsdumpdir``).

Keys are saved whenever they change and at shutdown, owner-only, with an
atomic write, so a restart keeps every cookie clients hold valid. A damaged
key file is moved aside (nothing is lost), reported, and replaced by a new
ring: clients then get an NTS NAK once and redo NTS-KE.

With several worker processes, the process that rotates writes the file and
the others pick the change up with :meth:`KeyStore.refresh`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from ..errors import StateFileError, StateFileUnreadable
from ..proto.cookies import DEFAULT_KEPT_KEYS, MASTER_KEY_LEN, KeyRing, MasterKey
from ..state import (
    b64,
    check_permissions,
    load_state,
    quarantine,
    save_state,
    set_aside,
    temp_path,
    unb64,
)

KEY_FILE_NAME = "ntspy-server-keys.state"
STATE_KIND = "ntspy-server-keys"
STATE_VERSION = 1

log = logging.getLogger("ntspy.server.keys")


class KeyStore:
    def __init__(
        self,
        dumpdir: Path | None,
        rotate_interval: int,
        random_bytes: Callable[[int], bytes] = os.urandom,
        kept: int = DEFAULT_KEPT_KEYS,
        trusted_uids: frozenset[int] = frozenset(),
    ) -> None:
        """``trusted_uids``: owners besides root and ourselves that key files may have
        (the ``user`` the server runs as after start-up)."""
        self.path = dumpdir / KEY_FILE_NAME if dumpdir is not None else None
        self.rotate_interval = rotate_interval
        self.random_bytes = random_bytes
        self.ring = KeyRing(kept=kept)
        self._mtime_ns = 0
        self._unsaved = False
        self._reported = ""
        self.trusted_uids = trusted_uids

    def load(self, now: int) -> KeyRing:
        """Load the saved ring (if any), add a key if it is empty or due, save.

        Raises :class:`StateFileError` for what must stop start-up: a key file
        that is there but cannot be read (replacing it would NAK every client),
        a directory or file others could write master keys into.
        """
        if self.path is not None:
            self._check_safety()
            with contextlib.suppress(OSError):  # left by a crash mid-write: it is stale
                temp_path(self.path).unlink()
            try:
                self.ring.replace(*self._read())
                if self.ring.keys:
                    log.info("loaded %d NTS master keys from %s", len(self.ring.keys), self.path)
            except StateFileUnreadable as exc:
                raise StateFileError(f"{exc}: the NTS master keys are there but cannot be "
                                     "read; fix the file's permissions (it is not replaced: "
                                     "every client's cookies depend on it)") from None
            except StateFileError as exc:
                log.error("NTS server keys unusable, starting a new key ring: %s", exc)
                self._set_aside()
            warning = check_permissions(self.path)
            if warning is not None:
                log.warning("%s; rewriting it owner-only", warning)
                self.try_save()
        self.rotate_if_due(now)
        return self.ring

    def _set_aside(self) -> None:
        """Move a key file we could not read (a directory, a FIFO...) out of the way:
        the new ring must be saved there, and the old file must not be lost."""
        assert self.path is not None
        moved = set_aside(self.path)
        if moved is not None:
            log.error("moved unreadable NTS key file %s to %s", self.path, moved)

    def rotate_if_due(self, now: int) -> bool:
        if self._unsaved and self.try_save():
            log.info("NTS master keys saved to %s at last", self.path)
        if not self.ring.due(now, self.rotate_interval):
            return False
        self.rotate(now)
        return True

    def _check_safety(self) -> None:
        """Refuse a key directory or file that someone else could write to: whoever
        can plant a master key can mint cookies the server accepts."""
        assert self.path is not None
        me = os.geteuid()
        for path, what in ((self.path.parent, "ntsdumpdir"), (self.path, "key file")):
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StateFileError(f"cannot check {what} {path}: {exc}") from None
            if st.st_uid not in (me, 0, *self.trusted_uids):
                raise StateFileError(f"{what} {path} belongs to uid {st.st_uid}, not to this "
                                     f"server (uid {me}) or root: refusing its keys")
            if st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & 0o1000):
                raise StateFileError(f"{what} {path} is writable by others (mode "
                                     f"{stat.S_IMODE(st.st_mode):04o}): another user could "
                                     f"plant master keys; chmod go-w {path}")

    def rotate(self, now: int) -> None:
        """A new current key, on disk before a cookie can be sealed under it.

        If it cannot be saved (a full disk), the ring stays as it is and the
        rotation is retried at the next look; a ring with no key at all takes the
        new one in memory (the server must serve) and keeps trying to save it.
        """
        ids = {k.key_id for k in self.ring.keys}
        key_id = self._new_id(ids)
        new = MasterKey(key_id, self.random_bytes(MASTER_KEY_LEN), now)
        candidate = KeyRing(kept=self.ring.kept)
        candidate.replace([*reversed(self.ring.keys), new])
        try:
            self._write(candidate)
        except StateFileError as exc:
            self._report(f"cannot save the new NTS master key: {exc}")
            if self.ring.keys:
                return  # keep issuing under the saved key; rotate again later
            self.ring.add(new)
            self._unsaved = True
            log.error("serving with an NTS master key held in memory only; saving it "
                      "is retried")
            return
        self.ring.add(new)
        self._unsaved = False
        self._reported = ""
        log.info("new NTS master key %08x", key_id)

    def save(self) -> None:
        """Write the ring; raises StateFileError."""
        self._write(self.ring)
        self._unsaved = False

    def try_save(self) -> bool:
        """:meth:`save`, reporting a failure once instead of raising."""
        try:
            self.save()
        except StateFileError as exc:
            self._report(f"cannot save NTS server keys: {exc}")
            return False
        return True

    def _report(self, message: str) -> None:
        if message != self._reported:
            log.error("%s", message)
        self._reported = message

    def _write(self, ring: KeyRing) -> None:
        if self.path is None:
            return
        payload = {
            "kept": ring.kept,
            "keys": [
                {"id": k.key_id, "key": b64(k.key), "created": k.created} for k in ring.keys
            ],
            # A fleet's key that opens cookies but seals none yet (server/fleet.py).
            "pending": [
                {"id": k.key_id, "key": b64(k.key), "created": k.created} for k in ring.pending
            ],
        }
        save_state(self.path, STATE_KIND, STATE_VERSION, payload)
        self._mtime_ns = self.path.stat().st_mtime_ns

    def refresh(self) -> bool:
        """Re-read the file if another process rewrote it; True if the ring changed."""
        if self.path is None:
            return False
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return False
        if mtime == self._mtime_ns:
            return False
        try:
            self.ring.replace(*self._read())
        except StateFileError as exc:
            log.error("cannot reload NTS server keys: %s", exc)
            return False
        return True

    def _read(self) -> tuple[list[MasterKey], list[MasterKey]]:
        """The saved keys (oldest first, as the ring takes them) and pending keys."""
        assert self.path is not None
        self._mtime_ns = self.path.stat().st_mtime_ns if self.path.exists() else 0
        state = load_state(self.path, STATE_KIND, STATE_VERSION)
        if state is None:
            return [], []
        try:
            keys, pending = (
                [MasterKey(int(k["id"]), unb64(k["key"]), int(k["created"])) for k in entries]
                for entries in (state.payload["keys"], state.payload.get("pending", []))
            )
            if len({k.key_id for k in (*keys, *pending)}) != len(keys) + len(pending):
                raise ValueError("duplicate key id")
            # The file lists the newest first; the ring adds the oldest first and
            # sorts stably by creation time, so reversing keeps keys created in the
            # same second in order across a restart (the current key stays current).
            return keys[: self.ring.kept][::-1], pending
        # OverflowError: a JSON number like 1e400 reads as infinity;
        # StateFileError: a key that is not base64.
        except (KeyError, TypeError, ValueError, OverflowError, StateFileError) as exc:
            moved = quarantine(self.path)
            raise StateFileError(f"{self.path}: bad key entry ({exc}); moved to {moved}") from exc

    def _new_id(self, taken: set[int]) -> int:
        while True:
            key_id = int.from_bytes(self.random_bytes(4), "big")
            if key_id not in taken:
                return key_id
