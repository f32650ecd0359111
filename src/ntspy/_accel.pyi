"""Types of the optional compiled AES-SIV (``src/ntspy/_accel.c``)."""

from collections.abc import Sequence
from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview

class InvalidTag(Exception):
    """The input did not verify under this key."""

class AesSiv:
    """AES-SIV-CMAC with a 32-, 48- or 64-byte key, keyed once."""

    def __init__(self, key: Buffer) -> None: ...
    @property
    def key_length(self) -> int: ...
    def seal(self, nonce: Buffer, plaintext: Buffer, associated_data: Buffer, /) -> bytes: ...
    def open(self, nonce: Buffer, ciphertext: Buffer, associated_data: Buffer, /) -> bytes: ...
    def encrypt(
        self, plaintext: Buffer, associated_data: Sequence[Buffer] | None = None, /
    ) -> bytes: ...
    def decrypt(
        self, ciphertext: Buffer, associated_data: Sequence[Buffer] | None = None, /
    ) -> bytes: ...
