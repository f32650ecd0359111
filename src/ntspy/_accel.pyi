"""Types of the optional compiled AES-SIV and batched UDP I/O (``src/ntspy/_accel.c``)."""

from collections.abc import Sequence
from typing import Any, TypeAlias

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

def recv_batch(
    fd: int, max_count: int, bufsize: int, /
) -> list[tuple[bytes | None, tuple[Any, ...] | None, int]]:
    """Up to ``max_count`` (1-256) queued datagrams from one non-blocking recvmmsg.

    Each is (data, address, rx_ns): data None when longer than ``bufsize``
    (1-65536, truncated), address in the socket module's format (None for
    families other than AF_INET/AF_INET6), rx_ns the kernel receive time in
    Unix ns or -1. Empty when nothing is queued; OSError on other errors.
    """

def send_batch(fd: int, items: Sequence[tuple[bytes, tuple[Any, ...]]], /) -> int:
    """Send each (data, numeric address) with sendmmsg; the number sent.

    ``items``: a list or tuple of at most 256. A datagram the kernel refuses
    is skipped and the rest still go out; a malformed item raises TypeError,
    ValueError or OverflowError before anything is sent.
    """

def nts_reply(
    request: bytes,
    header: bytes,
    layout: tuple[int, int, int, int, int, int, int, int],
    session: tuple[object, ...],
    count: int,
    random: bytes,
    /,
) -> bytes | None:
    """The NTS response to ``request``, None when it does not verify (see
    ``server/responder.py``'s fast path and the C source for the tuples)."""
