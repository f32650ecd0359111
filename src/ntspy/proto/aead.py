"""AEAD algorithms of the IANA AEAD registry that NTS uses.

RFC 8915 s5.1 makes AEAD_AES_SIV_CMAC_256 (15) mandatory; chrony prefers
AEAD_AES_128_GCM_SIV (30) for its smaller cookies, NTPsec and ntpd-rs also
offer the 384/512-bit SIV variants. All of them come from ``cryptography``,
except that the SIV ones use ``ntspy._accel`` when it was built (a compiled
AES-SIV that keeps its key schedules between calls, about 3x faster per
call; same bytes, tested). ``NTSPY_NO_ACCEL=1`` in the environment, read at
import, keeps everything on ``cryptography``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV, AESSIV

from .._optional import require_compiled
from ..errors import AuthenticationFailure

try:
    require_compiled()
    from .._accel import AesSiv as _FastSiv
    from .._accel import InvalidTag as _FastInvalidTag
except ImportError:  # not built (no compiler or headers at install time) or disabled
    _FastSiv = None  # type: ignore[assignment,misc]
    _FastInvalidTag = InvalidTag  # type: ignore[assignment,misc]

#: Whether AES-SIV runs on the compiled accelerator in this process.
ACCELERATED = _FastSiv is not None


class AeadId(enum.IntEnum):
    AES_SIV_CMAC_256 = 15
    AES_SIV_CMAC_384 = 16
    AES_SIV_CMAC_512 = 17
    AES_128_GCM_SIV = 30


@dataclass(frozen=True, slots=True)
class AeadInfo:
    id: AeadId
    name: str
    key_length: int
    nonce_length: int  # what we generate; SIV accepts any length
    tag_length: int


AEADS: dict[int, AeadInfo] = {
    AeadId.AES_SIV_CMAC_256: AeadInfo(AeadId.AES_SIV_CMAC_256, "AEAD_AES_SIV_CMAC_256", 32, 16, 16),
    AeadId.AES_SIV_CMAC_384: AeadInfo(AeadId.AES_SIV_CMAC_384, "AEAD_AES_SIV_CMAC_384", 48, 16, 16),
    AeadId.AES_SIV_CMAC_512: AeadInfo(AeadId.AES_SIV_CMAC_512, "AEAD_AES_SIV_CMAC_512", 64, 16, 16),
    AeadId.AES_128_GCM_SIV: AeadInfo(AeadId.AES_128_GCM_SIV, "AEAD_AES_128_GCM_SIV", 16, 12, 16),
}


def info(aead_id: int) -> AeadInfo:
    """Facts about one algorithm; KeyError for ids we do not implement."""
    return AEADS[aead_id]


@cache
def gcm_siv_available() -> bool:
    """Whether the OpenSSL under ``cryptography`` has AES-GCM-SIV (3.2+)."""
    try:
        AESGCMSIV(bytes(16)).encrypt(bytes(12), b"", None)
    except UnsupportedAlgorithm:
        return False
    return True


def supported() -> list[AeadId]:
    """Algorithms usable here, in our default preference order (like chrony's)."""
    ids = [AeadId.AES_128_GCM_SIV] if gcm_siv_available() else []
    return [*ids, AeadId.AES_SIV_CMAC_256, AeadId.AES_SIV_CMAC_512, AeadId.AES_SIV_CMAC_384]


class Aead:
    """One key under one algorithm: seal and open with a caller-supplied nonce."""

    __slots__ = ("_fast", "_gcm", "_siv", "aead_id", "key")

    def __init__(self, aead_id: int, key: bytes) -> None:
        meta = info(aead_id)
        if len(key) != meta.key_length:
            raise ValueError(f"{meta.name} needs a {meta.key_length}-byte key, got {len(key)}")
        self.aead_id = meta.id
        self.key = key
        gcm = meta.id == AeadId.AES_128_GCM_SIV
        fast = not gcm and _FastSiv is not None
        self._fast: _FastSiv | None = _FastSiv(key) if fast else None
        self._siv: AESSIV | None = None if gcm or fast else AESSIV(key)
        self._gcm: AESGCMSIV | None = AESGCMSIV(key) if gcm else None

    @property
    def nonce_length(self) -> int:
        return AEADS[self.aead_id].nonce_length

    @property
    def accelerated(self) -> bool:
        """Whether this key runs on ``ntspy._accel``."""
        return self._fast is not None

    @property
    def native(self) -> _FastSiv | None:
        """The ``ntspy._accel.AesSiv`` doing this key's work, or None."""
        return self._fast

    def seal(self, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
        """Encrypt and authenticate; returns ciphertext with the tag."""
        # RFC 8915 s5.6: for SIV the nonce is the last associated-data component
        # (the accelerator's seal/open put it there too).
        if self._fast is not None:
            return self._fast.seal(nonce, plaintext, associated_data)
        if self._siv is not None:
            return self._siv.encrypt(plaintext, [associated_data, nonce])
        assert self._gcm is not None
        return self._gcm.encrypt(nonce, plaintext, associated_data)

    def open(self, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
        """Verify and decrypt; any failure raises :class:`AuthenticationFailure`."""
        try:
            if self._fast is not None:
                return self._fast.open(nonce, ciphertext, associated_data)
            if self._siv is not None:
                return self._siv.decrypt(ciphertext, [associated_data, nonce])
            assert self._gcm is not None
            return self._gcm.decrypt(nonce, ciphertext, associated_data)
        except (InvalidTag, _FastInvalidTag, ValueError) as exc:
            raise AuthenticationFailure("AEAD verification failed") from exc

    def try_open(self, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes | None:
        """:meth:`open`, with None for input that does not verify."""
        try:
            return self.open(nonce, ciphertext, associated_data)
        except AuthenticationFailure:
            return None

    def opener(self) -> Callable[[bytes, bytes, bytes], bytes | None]:
        """:meth:`try_open` as one callable, the compiled one where there is
        one (no Python frame per call): for callers that keep it."""
        if self._fast is not None:
            return self._fast.try_open
        return self.try_open
