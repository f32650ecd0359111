"""Types of the optional compiled module ``ntspy._accel`` (``src/ntspy/_accel*.c``):
AES-SIV, the NTS response builder's and request scanner's backends, batched UDP I/O."""

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
    def try_open(
        self, nonce: Buffer, ciphertext: Buffer, associated_data: Buffer, /
    ) -> bytes | None: ...
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

class NtsPlan:
    """One session's response template, checked once (made by proto/nts.py's
    ResponsePlan; see _accel_nts.c)."""

    def __init__(
        self,
        c2s: AesSiv,
        s2c: AesSiv,
        master: AesSiv,
        cookie_ef_head: bytes,
        cookie_prefix: bytes,
        cookie_plain: bytes,
        cookie_pad: int,
        nonce_len: int,
        nonce_pad: int,
        auth_heads: tuple[bytes, ...],
        tails: tuple[int, ...],
    ) -> None: ...
    def seal(
        self, header: bytes, unique_id_field: bytes, count: int, random: bytes, limit: int, /
    ) -> bytes:
        """The response: header, unique id field, authenticator sealing ``count`` cookies."""
    def answer(
        self,
        request: bytes,
        header: bytes,
        count: int,
        random: bytes,
        uid_end: int,
        auth_at: int,
        nonce_start: int,
        nonce_end: int,
        ct_start: int,
        ct_end: int,
        /,
    ) -> bytes | None:
        """seal() for a request whose authenticator verifies under C2S, else None."""

class RequestScanner:
    """The usual NTS request layout as proto/nts.py defines it (see _accel_scan.c)."""

    def __init__(
        self,
        uid_type: int,
        cookie_type: int,
        placeholder_type: int,
        auth_type: int,
        min_uid_ef: int,
        min_auth_ef: int,
        tag_len: int,
        min_packet: int,
    ) -> None: ...
    def scan(self, data: bytes, /) -> tuple[int, int, int, int, int, int, int, int, int] | None:
        """proto/nts.py's scan_request(data)."""
