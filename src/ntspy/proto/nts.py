"""NTS extension fields in NTP packets (RFC 8915 s5).

Client side: :func:`build_request` and :func:`verify_response`.
Server side: :func:`parse_request`, :func:`authenticate_request`,
:func:`build_response` and :func:`build_nak`.

Nothing here draws randomness or reads a clock: nonces, unique identifiers
and timestamps are handed in.
"""

from __future__ import annotations

import enum
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import AuthenticationFailure, KissOfDeath, MalformedPacket, NtsNakReceived
from .aead import Aead
from .ntp import (
    EF_HEADER_LEN,
    HEADER_LEN,
    KISS_NTS_NAK,
    ExtensionField,
    Mode,
    NtpHeader,
    encode_ef,
    iter_efs,
)

UNIQUE_ID_LEN = 32  # what we send; RFC 8915 s5.3: at least 32 octets
MIN_UNIQUE_ID_LEN = 32
# RFC 8915 s5.6: nonce plus additional padding is at least 16 octets.
MIN_PADDED_NONCE_LEN = 16
MAX_COOKIES_PER_RESPONSE = 8
_AUTH_HEADER = struct.Struct("!HH")


class EfType(enum.IntEnum):
    UNIQUE_IDENTIFIER = 0x0104
    NTS_COOKIE = 0x0204
    NTS_COOKIE_PLACEHOLDER = 0x0304
    NTS_AUTHENTICATOR = 0x0404


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def encode_authenticator(nonce: bytes, ciphertext: bytes) -> bytes:
    """The NTS Authenticator and Encrypted Extension Fields EF (RFC 8915 s5.6)."""
    extra = max(0, MIN_PADDED_NONCE_LEN - _pad4(len(nonce)))
    body = (
        _AUTH_HEADER.pack(len(nonce), len(ciphertext))
        + nonce + bytes(_pad4(len(nonce)) - len(nonce))
        + ciphertext + bytes(_pad4(len(ciphertext)) - len(ciphertext))
        + bytes(extra)
    )
    return encode_ef(EfType.NTS_AUTHENTICATOR, body)


def decode_authenticator(body: bytes, zero_padding: bool = False) -> tuple[bytes, bytes]:
    """(nonce, ciphertext) from an authenticator EF body.

    With ``zero_padding`` the padding after the nonce and after the ciphertext
    must be zeros: the AEAD covers neither, so otherwise anyone on the path
    could alter those bytes and still have the packet accepted.
    """
    if len(body) < _AUTH_HEADER.size:
        raise MalformedPacket("NTS authenticator too short")
    nonce_len, ct_len = _AUTH_HEADER.unpack_from(body, 0)
    start = _AUTH_HEADER.size
    ct_start = start + _pad4(nonce_len)
    if ct_start + _pad4(ct_len) > len(body):
        raise MalformedPacket("NTS authenticator lengths exceed the field")
    if nonce_len == 0 or ct_len == 0:
        raise MalformedPacket("NTS authenticator with empty nonce or ciphertext")
    if zero_padding and (
        any(body[start + nonce_len:ct_start]) or any(body[ct_start + ct_len:])
    ):
        raise MalformedPacket("NTS authenticator padding is not zero")
    return body[start:start + nonce_len], body[ct_start:ct_start + ct_len]


def _single(efs: Sequence[ExtensionField], ef_type: int, what: str) -> ExtensionField:
    found = [ef for ef in efs if ef.type == ef_type]
    if len(found) != 1:
        raise MalformedPacket(f"expected exactly one {what}, found {len(found)}")
    return found[0]


def _split_authenticated(
    data: bytes, efs: list[ExtensionField]
) -> tuple[ExtensionField, list[ExtensionField]]:
    """The authenticator EF and the EFs before it; it must be the last field."""
    auth_at = [i for i, ef in enumerate(efs) if ef.type == EfType.NTS_AUTHENTICATOR]
    if not auth_at:
        raise AuthenticationFailure("packet has no NTS authenticator")
    if len(auth_at) > 1 or auth_at[0] != len(efs) - 1:
        raise MalformedPacket("NTS authenticator must be the only and last extension field")
    return efs[-1], efs[:-1]


# ---------------------------------------------------------------------------
# Client side


def build_request(
    header: NtpHeader,
    unique_id: bytes,
    cookie: bytes,
    placeholders: int,
    c2s: Aead,
    nonce: bytes,
    *,
    encrypted_placeholders: int = 0,
) -> bytes:
    """An authenticated NTS client request carrying one cookie.

    ``placeholders`` asks the server for that many extra cookies; each is sized
    like the cookie, so the response (one new cookie per cookie field) fits in
    the same number of bytes as the request.  ``encrypted_placeholders`` puts
    that many more inside the authenticator's encrypted part (RFC 8915 s5.6
    allows either; ours go outside, as chrony's do).
    """
    packet = (
        header.pack()
        + encode_ef(EfType.UNIQUE_IDENTIFIER, unique_id)
        + encode_ef(EfType.NTS_COOKIE, cookie)
        + encode_ef(EfType.NTS_COOKIE_PLACEHOLDER, bytes(len(cookie))) * placeholders
    )
    hidden = encode_ef(EfType.NTS_COOKIE_PLACEHOLDER, bytes(len(cookie))) * encrypted_placeholders
    return packet + encode_authenticator(nonce, c2s.seal(nonce, hidden, packet))


@dataclass(slots=True)
class VerifiedResponse:
    """A server response whose authenticity was proven."""

    header: NtpHeader
    cookies: list[bytes] = field(default_factory=list)


def verify_response(
    data: bytes,
    unique_id: bytes,
    origin_ts: int,
    s2c: Aead,
) -> VerifiedResponse:
    """Check that ``data`` answers our request and was sealed with the S2C key.

    Raises :class:`NtsNakReceived` for a NAK echoing our unique id (RFC 8915
    s5.7 lets a NAK through unauthenticated), :class:`KissOfDeath` for an
    authenticated kiss-o'-death, and :class:`AuthenticationFailure` or
    :class:`MalformedPacket` for anything that must be dropped.
    """
    header = NtpHeader.unpack(data)
    if header.mode != Mode.SERVER:
        raise MalformedPacket(f"response has mode {header.mode}, expected 4 (server)")
    if header.origin_ts != origin_ts:
        raise AuthenticationFailure("origin timestamp does not match our request (bogus or replay)")
    efs = list(iter_efs(data))
    uid = _single(efs, EfType.UNIQUE_IDENTIFIER, "unique identifier")
    if not hmac.compare_digest(uid.body, unique_id):
        raise AuthenticationFailure("unique identifier does not match our request")
    if header.stratum == 0 and header.reference_id == KISS_NTS_NAK:
        if any(ef.type == EfType.NTS_AUTHENTICATOR for ef in efs):
            raise MalformedPacket("NTS NAK must not carry an authenticator")
        raise NtsNakReceived("server sent NTS NAK: it could not use our cookie")
    auth, _ = _split_authenticated(data, efs)
    # Nothing the AEAD does not cover may change unnoticed: no padding other
    # than zeros, and no trailing bytes (iter_efs would skip 20 or 24 of them
    # as a legacy MAC) after the authenticator.
    if auth.offset + EF_HEADER_LEN + len(auth.body) != len(data):
        raise MalformedPacket("bytes after the NTS authenticator")
    nonce, ciphertext = decode_authenticator(auth.body, zero_padding=True)
    plaintext = s2c.open(nonce, ciphertext, data[:auth.offset])
    # Only cookies inside the encrypted part count (RFC 8915 s5.7): any in the
    # clear could have been put there by anyone on the path.
    cookies = [ef.body for ef in iter_efs(plaintext, 0) if ef.type == EfType.NTS_COOKIE]
    if header.stratum == 0:
        raise KissOfDeath(header.reference_id.decode("ascii", "replace").rstrip("\x00"))
    return VerifiedResponse(header, cookies)


# ---------------------------------------------------------------------------
# Server side


@dataclass(slots=True)
class NtsRequest:
    """The NTS parts of a client request, before authentication."""

    header: NtpHeader
    unique_id: bytes
    cookie: bytes
    placeholders: int
    auth_offset: int
    nonce: bytes
    ciphertext: bytes


def is_nts_request(efs: Sequence[ExtensionField]) -> bool:
    return any(ef.type == EfType.NTS_COOKIE for ef in efs)


def parse_request(data: bytes, header: NtpHeader, efs: list[ExtensionField]) -> NtsRequest:
    """Pick out the NTS fields of a request; MalformedPacket if they break RFC 8915 s5.7."""
    uid = _single(efs, EfType.UNIQUE_IDENTIFIER, "unique identifier")
    if len(uid.body) < MIN_UNIQUE_ID_LEN:
        raise MalformedPacket("unique identifier shorter than 32 bytes")
    cookie = _single(efs, EfType.NTS_COOKIE, "cookie")
    auth, covered = _split_authenticated(data, efs)
    placeholders = 0
    for ef in covered:
        if ef.type == EfType.NTS_COOKIE_PLACEHOLDER:
            if len(ef.body) != len(cookie.body):
                raise MalformedPacket("cookie placeholder not the size of the cookie")
            placeholders += 1
    nonce, ciphertext = decode_authenticator(auth.body)
    return NtsRequest(header, uid.body, cookie.body, placeholders, auth.offset, nonce, ciphertext)


def authenticate_request(data: bytes, request: NtsRequest, c2s: Aead) -> bytes:
    """Verify the request's authenticator with the C2S key from its cookie.

    Returns the decrypted extension fields (normally empty).
    """
    return c2s.open(request.nonce, request.ciphertext, data[:request.auth_offset])


def count_encrypted_placeholders(plaintext: bytes, cookie_len: int) -> int:
    """Cookie Placeholders among the extension fields of a request's decrypted part.

    They count like those outside it (RFC 8915 s5.7 SHOULD): one more cookie
    each.  Only placeholders the size of the cookie count; other fields, and
    a decrypted part that is not a sequence of fields, add nothing (the
    request is authentic, so it is still answered, with its other cookies).
    """
    count = 0
    try:
        for ef in iter_efs(plaintext, 0):
            if ef.type == EfType.NTS_COOKIE_PLACEHOLDER and len(ef.body) == cookie_len:
                count += 1
    except MalformedPacket:
        return 0
    return count


def response_length(uid_len: int, cookie_count: int, cookie_len: int, nonce_len: int) -> int:
    """Size in bytes of what :func:`build_response` produces for these sizes."""
    tag = 16  # every AEAD in the registry we implement has a 16-byte tag
    plain = cookie_count * max(16, _pad4(EF_HEADER_LEN + cookie_len))
    auth_body = 4 + max(MIN_PADDED_NONCE_LEN, _pad4(nonce_len)) + _pad4(plain + tag)
    uid = max(16, _pad4(EF_HEADER_LEN + uid_len))
    return HEADER_LEN + uid + max(16, EF_HEADER_LEN + auth_body)


def response_cookie_count(request: NtsRequest, request_len: int, cookie_len: int,
                          nonce_len: int) -> int:
    """How many new cookies to send: one per cookie and placeholder, capped at
    eight, and fewer if needed so that the response is never larger than the
    request (no amplification, RFC 8915 s5.7)."""
    count = min(1 + request.placeholders, MAX_COOKIES_PER_RESPONSE)
    uid_len = len(request.unique_id)
    while count > 0 and response_length(uid_len, count, cookie_len, nonce_len) > request_len:
        count -= 1
    return count


def build_response(
    header: NtpHeader,
    unique_id: bytes,
    cookies: Sequence[bytes],
    s2c: Aead,
    nonce: bytes,
) -> bytes:
    """An authenticated response: unique id echoed, new cookies encrypted."""
    packet = header.pack() + encode_ef(EfType.UNIQUE_IDENTIFIER, unique_id)
    plaintext = b"".join(encode_ef(EfType.NTS_COOKIE, c) for c in cookies)
    return packet + encode_authenticator(nonce, s2c.seal(nonce, plaintext, packet))


def build_nak(header: NtpHeader, unique_id: bytes) -> bytes:
    """An NTS NAK: kiss code NTSN, unique id echoed, nothing authenticated."""
    header.stratum = 0
    header.reference_id = KISS_NTS_NAK
    return header.pack() + encode_ef(EfType.UNIQUE_IDENTIFIER, unique_id)
