"""Server cookies (RFC 8915 s6): stateless, sealed under rotating master keys.

A cookie carries everything the server needs to answer a client, so the
server keeps no per-client state::

    key id (u32) | nonce (16) | AEAD_AES_SIV_CMAC_256(master key)(
        u16 AEAD id | u16 zero | C2S key | S2C key)

with the key id as associated data. With AES-SIV-CMAC-256 client keys that
is 104 bytes, with AES-128-GCM-SIV 72: always a multiple of four.

The :class:`KeyRing` holds the current master key and a few previous ones, so
cookies issued before a rotation keep working for a while. This module alone
knows that format: the server's packet path asks the ring to open a cookie
(:meth:`KeyRing.unseal`, :meth:`KeyRing.keys_in`) and for a
:class:`CookieSealer` that seals new ones.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import AuthenticationFailure, MalformedPacket
from .aead import Aead, AeadId, info

if TYPE_CHECKING:
    from .._accel import AesSiv

MASTER_KEY_ALGORITHM = AeadId.AES_SIV_CMAC_256
MASTER_KEY_LEN = 32
COOKIE_NONCE_LEN = 16
DEFAULT_KEPT_KEYS = 3  # current + 2 previous: cookies outlive two rotations
_PREFIX = struct.Struct("!I")
_PLAIN_HEADER = struct.Struct("!HH")
_TAG_LEN = 16
_HEAD = _PREFIX.size + COOKIE_NONCE_LEN  # key id, nonce: before the ciphertext
_MIN_COOKIE = _HEAD + _PLAIN_HEADER.size + _TAG_LEN


@dataclass(slots=True)
class CookieKeys:
    """What a cookie carries: the negotiated AEAD and the two session keys."""

    aead_id: int
    c2s: bytes
    s2c: bytes


@dataclass(slots=True)
class MasterKey:
    key_id: int
    key: bytes
    created: int  # Unix seconds, handed in by the caller

    def __post_init__(self) -> None:
        if len(self.key) != MASTER_KEY_LEN:
            raise ValueError(f"master key must be {MASTER_KEY_LEN} bytes")
        if not 0 <= self.key_id <= 0xFFFFFFFF:
            raise ValueError("master key id must fit in 32 bits")


def cookie_length(aead_id: int) -> int:
    """Length of the cookies we issue for clients using ``aead_id``."""
    key_len = info(aead_id).key_length
    return _PREFIX.size + COOKIE_NONCE_LEN + _PLAIN_HEADER.size + 2 * key_len + _TAG_LEN


class CookieSealer:
    """Seals new cookies carrying one session's keys under one master key.

    A cookie is ``prefix | nonce | master.seal(nonce, plaintext, prefix)``;
    :attr:`compiled` hands the same recipe to the compiled response builder
    (``ntspy._accel.NtsPlan``), which makes the same bytes. A sealer is bound
    to the ring's current key when it was made: rebuild it when
    :attr:`KeyRing.version` changes.
    """

    __slots__ = ("length", "master", "plaintext", "prefix")

    def __init__(self, master: Aead, prefix: bytes, plaintext: bytes) -> None:
        self.master = master
        self.prefix = prefix
        self.plaintext = plaintext
        self.length = len(prefix) + COOKIE_NONCE_LEN + len(plaintext) + _TAG_LEN
        """Bytes per cookie."""

    @property
    def compiled(self) -> tuple[AesSiv, bytes, bytes] | None:
        """(master key, prefix, plaintext) for ``ntspy._accel.NtsPlan``, which seals
        each cookie as ``prefix | nonce | master.seal(nonce, plaintext, ad=prefix)``;
        None when the master key does not run on the accelerator."""
        native = self.master.native
        return None if native is None else (native, self.prefix, self.plaintext)

    def seal(self, nonce: bytes) -> bytes:
        """One cookie under the 16-byte ``nonce``."""
        if len(nonce) != COOKIE_NONCE_LEN:
            raise ValueError("cookie nonce must be 16 bytes")
        prefix = self.prefix
        return prefix + nonce + self.master.seal(nonce, self.plaintext, prefix)


def _plaintext(keys: CookieKeys) -> bytes:
    return _PLAIN_HEADER.pack(keys.aead_id, 0) + keys.c2s + keys.s2c


class KeyRing:
    """Master keys, newest first. Only the newest seals; all of them open.

    The keys and their AEAD objects live in one tuple that every change
    replaces whole, so a reader in another thread (the NTS-KE engine's)
    sees the ring before or after a rotation, never half of one.
    """

    def __init__(self, keys: Iterable[MasterKey] = (), kept: int = DEFAULT_KEPT_KEYS) -> None:
        if kept < 1:
            raise ValueError("a key ring keeps at least one key")
        self.kept = kept
        self._ring: tuple[tuple[MasterKey, ...], dict[int, Aead]] = ((), {})
        # what unseal uses: each key's Aead.opener(), replaced with _ring
        self._openers: dict[bytes, Callable[[bytes, bytes, bytes], bytes | None]] = {}
        self._pending: tuple[MasterKey, ...] = ()
        self.version = 0
        """Grows with every change of the ring (caches of it compare this)."""
        self.replace(keys)

    def replace(self, keys: Iterable[MasterKey], pending: Iterable[MasterKey] = ()) -> None:
        """Swap in a new set of keys (e.g. reloaded from disk), keeping this object.

        ``pending`` keys open cookies but seal none yet: a fleet publishes a new
        key to every server before any server issues cookies under it."""
        ordered: list[MasterKey] = []
        # Newest first; of keys made in the same second, the later one listed.
        for key in reversed(sorted(keys, key=lambda k: k.created)):
            if any(k.key_id == key.key_id for k in ordered):
                raise ValueError(f"key id {key.key_id:08x} already in the ring")
            ordered.append(key)
        kept = tuple(ordered[: self.kept])
        waiting = tuple(k for k in pending if all(k.key_id != o.key_id for o in kept))
        aeads = {k.key_id: Aead(MASTER_KEY_ALGORITHM, k.key) for k in (*kept, *waiting)}
        self._pending = waiting
        self._set(kept, aeads)

    @property
    def pending(self) -> list[MasterKey]:
        """Keys that open cookies but do not seal yet (see :meth:`replace`)."""
        return list(self._pending)

    @property
    def accepted(self) -> list[MasterKey]:
        """Every key a cookie may be under: :attr:`keys`, then :attr:`pending`."""
        return [*self._ring[0], *self._pending]

    @property
    def keys(self) -> list[MasterKey]:
        return list(self._ring[0])

    @property
    def current(self) -> MasterKey:
        keys = self._ring[0]
        if not keys:
            raise LookupError("key ring is empty")
        return keys[0]

    def add(self, key: MasterKey) -> None:
        """Make ``key`` the current key; the oldest beyond ``kept`` are forgotten."""
        keys, aeads = self._ring
        if any(k.key_id == key.key_id for k in keys):
            raise ValueError(f"key id {key.key_id:08x} already in the ring")
        kept = (key, *keys)[: self.kept]
        waiting = tuple(k for k in self._pending if k.key_id != key.key_id)
        aead = aeads.get(key.key_id)
        new = {key.key_id: aead if aead is not None else Aead(MASTER_KEY_ALGORITHM, key.key)}
        new.update((k.key_id, aeads[k.key_id]) for k in (*kept[1:], *waiting))
        self._pending = waiting
        self._set(kept, new)

    def _set(self, kept: tuple[MasterKey, ...], aeads: dict[int, Aead]) -> None:
        # Each attribute is replaced whole: a reader in another thread may see
        # the openers of the ring before or after the change, either is valid.
        self._ring = (kept, aeads)
        # keyed by the cookie's prefix as it is on the wire: one slice per packet,
        # which is the associated data too
        self._openers = {_PREFIX.pack(key_id): aead.opener() for key_id, aead in aeads.items()}
        self.version += 1

    def _current(self) -> tuple[MasterKey, Aead]:
        keys, aeads = self._ring
        if not keys:
            raise LookupError("key ring is empty")
        return keys[0], aeads[keys[0].key_id]

    def due(self, now: int, interval: int) -> bool:
        """Whether the current key is older than ``interval`` seconds (0 = never)."""
        keys = self._ring[0]
        return not keys or (interval > 0 and now - keys[0].created >= interval)

    def sealer(self, keys: CookieKeys) -> CookieSealer:
        """What seals cookies for ``keys`` under the current master key
        (LookupError when the ring is empty)."""
        current, aead = self._current()
        return CookieSealer(aead, _PREFIX.pack(current.key_id), _plaintext(keys))

    def seal(self, keys: CookieKeys, nonce: bytes) -> bytes:
        """A new cookie for ``keys`` under the current master key."""
        return self.sealer(keys).seal(nonce)

    def seal_many(self, keys: CookieKeys, nonces: bytes) -> list[bytes]:
        """One cookie per 16-byte nonce in ``nonces``, as :meth:`seal` makes them
        (the key lookup and the plaintext are done once for all)."""
        if not nonces or len(nonces) % COOKIE_NONCE_LEN:
            raise ValueError("cookie nonces must be 16 bytes each")
        sealer = self.sealer(keys)
        prefix, plaintext, seal = sealer.prefix, sealer.plaintext, sealer.master.seal
        out = []
        for at in range(0, len(nonces), COOKIE_NONCE_LEN):
            nonce = nonces[at : at + COOKIE_NONCE_LEN]
            out.append(prefix + nonce + seal(nonce, plaintext, prefix))
        return out

    def unseal(self, cookie: bytes) -> bytes | None:
        """What ``cookie`` seals, or None when it does not open here (too short,
        unknown key id, does not verify).

        Opaque to the caller, but equal for cookies that carry the same keys:
        the packet path keeps what it derives from a session under it, and
        reads the keys with :meth:`keys_in` only the first time.
        """
        if len(cookie) < _MIN_COOKIE:
            return None
        prefix = cookie[:_PREFIX.size]
        opener = self._openers.get(prefix)
        if opener is None:
            return None
        return opener(cookie[_PREFIX.size:_HEAD], cookie[_HEAD:], prefix)

    @staticmethod
    def keys_in(sealed: bytes) -> CookieKeys:
        """The keys in what :meth:`unseal` returned; AuthenticationFailure when
        they cannot be a session's (an AEAD we do not know, wrong lengths)."""
        if len(sealed) < _PLAIN_HEADER.size:
            raise AuthenticationFailure("cookie plaintext too short")
        aead_id, _ = _PLAIN_HEADER.unpack_from(sealed, 0)
        try:
            key_len = info(aead_id).key_length
        except KeyError:
            raise AuthenticationFailure(f"cookie names unknown AEAD {aead_id}") from None
        body = sealed[_PLAIN_HEADER.size:]
        if len(body) != 2 * key_len:
            raise AuthenticationFailure("cookie keys have the wrong length")
        return CookieKeys(aead_id, body[:key_len], body[key_len:])

    def open(self, cookie: bytes) -> CookieKeys:
        """The keys inside ``cookie``.

        Raises :class:`AuthenticationFailure` for an unknown key id or a cookie
        that does not verify (the server answers those with an NTS NAK), and
        :class:`MalformedPacket` for one that cannot be a cookie at all.
        """
        if len(cookie) < _MIN_COOKIE:
            raise MalformedPacket(f"cookie too short ({len(cookie)} bytes)")
        (key_id,) = _PREFIX.unpack_from(cookie, 0)
        aead = self._ring[1].get(key_id)
        if aead is None:
            raise AuthenticationFailure(f"cookie under unknown master key {key_id:08x}")
        return self.keys_in(aead.open(cookie[_PREFIX.size:_HEAD], cookie[_HEAD:],
                                      cookie[:_PREFIX.size]))
