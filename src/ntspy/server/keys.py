"""The server's master key ring on disk (``ntsdumpdir``).

Keys are saved whenever they change and at shutdown, owner-only, with an
atomic write, so a restart keeps every cookie clients hold valid. A damaged
key file is moved aside (nothing is lost), reported, and replaced by a new
ring: clients then get an NTS NAK once and redo NTS-KE.

With several worker processes, the process that rotates writes the file and
the others pick the change up with :meth:`KeyStore.refresh`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import StateFileError
from ..proto.cookies import DEFAULT_KEPT_KEYS, MASTER_KEY_LEN, KeyRing, MasterKey
from ..state import (
    b64,
    check_permissions,
    load_state,
    quarantine,
    save_state,
    set_aside,
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
    ) -> None:
        self.path = dumpdir / KEY_FILE_NAME if dumpdir is not None else None
        self.rotate_interval = rotate_interval
        self.random_bytes = random_bytes
        self.ring = KeyRing(kept=kept)
        self._mtime_ns = 0

    def load(self, now: int) -> KeyRing:
        """Load the saved ring (if any), add a key if it is empty or due, save."""
        if self.path is not None:
            try:
                self.ring.replace(self._read())
                if self.ring.keys:
                    log.info("loaded %d NTS master keys from %s", len(self.ring.keys), self.path)
            except StateFileError as exc:
                log.error("NTS server keys unusable, starting a new key ring: %s", exc)
                self._set_aside()
            warning = check_permissions(self.path)
            if warning is not None:
                log.warning("%s; rewriting it owner-only", warning)
                self.save()
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
        if not self.ring.due(now, self.rotate_interval):
            return False
        self.rotate(now)
        return True

    def rotate(self, now: int) -> None:
        ids = {k.key_id for k in self.ring.keys}
        key_id = self._new_id(ids)
        self.ring.add(MasterKey(key_id, self.random_bytes(MASTER_KEY_LEN), now))
        log.info("new NTS master key %08x", key_id)
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        payload = {
            "kept": self.ring.kept,
            "keys": [
                {"id": k.key_id, "key": b64(k.key), "created": k.created} for k in self.ring.keys
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
            self.ring.replace(self._read())
        except StateFileError as exc:
            log.error("cannot reload NTS server keys: %s", exc)
            return False
        return True

    def _read(self) -> list[MasterKey]:
        assert self.path is not None
        self._mtime_ns = self.path.stat().st_mtime_ns if self.path.exists() else 0
        state = load_state(self.path, STATE_KIND, STATE_VERSION)
        if state is None:
            return []
        try:
            keys = [
                MasterKey(int(k["id"]), unb64(k["key"]), int(k["created"]))
                for k in state.payload["keys"]
            ]
            if len({k.key_id for k in keys}) != len(keys):
                raise ValueError("duplicate key id")
            # The file lists the newest first; the ring adds the oldest first and
            # sorts stably by creation time, so reversing keeps keys created in the
            # same second in order across a restart (the current key stays current).
            return keys[: self.ring.kept][::-1]
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
