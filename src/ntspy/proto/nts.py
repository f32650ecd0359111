"""NTS extension fields in NTP packets (RFC 8915 s5).

Client side: :func:`build_request` and :func:`verify_response`.
Server side: :func:`scan_request` (the usual layout at fixed offsets),
:func:`parse_request` (any layout), :func:`authenticate_request`, and one
response builder, :class:`ResponsePlan` (:func:`build_response` and
:func:`build_nak` for callers with an :class:`NtpHeader`). The plan has a
compiled backend (``ntspy._accel.NtsPlan``), chosen once at import, that
makes the same bytes.

Nothing here draws randomness or reads a clock: nonces, unique identifiers
and timestamps are handed in.
"""

from __future__ import annotations

import enum
import hmac
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from .._optional import require_compiled
from ..errors import AuthenticationFailure, KissOfDeath, MalformedPacket, NtsNakReceived
from .aead import Aead
from .cookies import COOKIE_NONCE_LEN, CookieSealer
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
_EF_HEADER = struct.Struct("!HH")
_TAG_LEN = 16  # every AEAD in the registry we implement has a 16-byte tag

try:
    require_compiled()
    from .._accel import NtsPlan as _NtsPlan
    from .._accel import RequestScanner as _RequestScanner
except ImportError:  # not built, or NTSPY_NO_ACCEL
    _NtsPlan = None  # type: ignore[assignment,misc]
    _RequestScanner = None  # type: ignore[assignment,misc]

#: Whether :class:`ResponsePlan` can build on the compiled backend in this process.
COMPILED_BUILDER = _NtsPlan is not None


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
    """Size in bytes of the response :class:`ResponsePlan` (or :func:`build_response`)
    makes for these sizes."""
    plain = cookie_count * max(16, _pad4(EF_HEADER_LEN + cookie_len))
    auth_body = 4 + max(MIN_PADDED_NONCE_LEN, _pad4(nonce_len)) + _pad4(plain + _TAG_LEN)
    uid = max(16, _pad4(EF_HEADER_LEN + uid_len))
    return HEADER_LEN + uid + max(16, EF_HEADER_LEN + auth_body)


@lru_cache(maxsize=4096)
def cookies_that_fit(placeholders: int, uid_len: int, cookie_len: int, nonce_len: int,
                     request_len: int) -> int:
    """How many new cookies to send: one per cookie and placeholder, capped at
    eight, and fewer if needed so that the response is never larger than the
    request (no amplification, RFC 8915 s5.7)."""
    count = min(1 + placeholders, MAX_COOKIES_PER_RESPONSE)
    while count > 0 and response_length(uid_len, count, cookie_len, nonce_len) > request_len:
        count -= 1
    return count


def response_cookie_count(request: NtsRequest, request_len: int, cookie_len: int,
                          nonce_len: int) -> int:
    """:func:`cookies_that_fit` for a parsed request."""
    return cookies_that_fit(request.placeholders, len(request.unique_id), cookie_len, nonce_len,
                            request_len)


# ---------------------------------------------------------------------------
# Server side, the usual layout: scanned at fixed offsets, answered by a plan

RequestLayout = tuple[int, int, int, int, int, int, int, int, int]
"""Offsets of a request in the usual layout (:func:`scan_request`), in order:
cookie body start and end, placeholder count, end of the unique identifier EF,
authenticator EF start, nonce start and end, ciphertext start and end."""

_UID, _COOKIE = EfType.UNIQUE_IDENTIFIER, EfType.NTS_COOKIE
_PLACEHOLDER, _AUTHENTICATOR = EfType.NTS_COOKIE_PLACEHOLDER, EfType.NTS_AUTHENTICATOR
_MIN_UID_EF = EF_HEADER_LEN + MIN_UNIQUE_ID_LEN
# Shorter authenticators (20 or 24 bytes would even pass for a legacy MAC) are
# left to the general parser.
_MIN_AUTH_EF = 28
_MIN_REQUEST = HEADER_LEN + _MIN_UID_EF + 16 + _MIN_AUTH_EF


def scan_request_python(data: bytes) -> RequestLayout | None:
    """Where the NTS parts are in a request laid out as clients lay it out:
    header, unique id, cookie, placeholders the size of the cookie, and an
    authenticator ending the packet whose encrypted part holds only the tag.

    None for any other layout, a broken one too: :func:`parse_request` decides
    what that is. Every request this accepts parses the same way there (RFC
    8915 s5.7's checks hold: one unique id of at least 32 bytes, one cookie,
    placeholders its size, the authenticator last).
    """
    n = len(data)
    unpack = _EF_HEADER.unpack_from
    if n < _MIN_REQUEST:
        return None
    ef_type, length = unpack(data, HEADER_LEN)
    if ef_type != _UID or length < _MIN_UID_EF or length & 3:
        return None
    uid_end = pos = HEADER_LEN + length
    if pos + 4 > n:
        return None
    ef_type, length = unpack(data, pos)
    if ef_type != _COOKIE or length < 16 or length & 3:
        return None
    cookie_len = length
    pos += length
    cookie_end = pos
    placeholders = 0
    while True:
        if pos + 4 > n:
            return None
        ef_type, length = unpack(data, pos)
        if ef_type != _PLACEHOLDER or length != cookie_len:
            break
        placeholders += 1
        pos += length
    if ef_type != _AUTHENTICATOR or pos + length != n or length < _MIN_AUTH_EF or length & 3:
        return None
    nonce_len, ct_len = unpack(data, pos + 4)
    nonce_start = pos + 8
    ct_start = nonce_start + _pad4(nonce_len)
    if nonce_len == 0 or ct_len != _TAG_LEN or ct_start + _pad4(ct_len) > n:
        # An encrypted part that holds more than the tag carries fields (maybe
        # Cookie Placeholders, which count): parse_request reads them.
        return None
    return (uid_end + 4, cookie_end, placeholders, uid_end, pos, nonce_start,
            nonce_start + nonce_len, ct_start, ct_start + ct_len)



scan_request: Callable[[bytes], RequestLayout | None] = scan_request_python
"""Where the NTS parts are in a request in the usual layout (see
:func:`scan_request_python`): the compiled scanner, made here with this
module's numbers, where it is built; the same offsets either way
(tests/unit/test_backends.py)."""
if _RequestScanner is not None:
    scan_request = _RequestScanner(_UID, _COOKIE, _PLACEHOLDER, _AUTHENTICATOR, _MIN_UID_EF,
                                   _MIN_AUTH_EF, _TAG_LEN, _MIN_REQUEST).scan

class ResponsePlan:
    """How to answer one session's requests: the response builder.

    Made once per session (the keys a cookie carries) and master key, from the
    session's AEADs and the :class:`~ntspy.proto.cookies.CookieSealer` of its
    new cookies. Every length and padding of a response is cut once, here,
    out of what :func:`encode_ef` and :func:`encode_authenticator` make, and
    handed whole to the compiled backend (``ntspy._accel.NtsPlan``) when the
    keys run there; per packet only the header, the unique identifier field,
    the cookie count and the random bytes change. Both backends make the same
    bytes (tests/unit/test_backends.py).
    """

    __slots__ = ("_auth_heads", "_cookie_field", "_cookie_head", "_cookie_pad", "_fixed_len",
                 "_native", "_nonce_pad", "_tails", "c2s", "cookie_len", "nonce_len",
                 "random_len", "s2c", "sealer")

    def __init__(self, c2s: Aead, s2c: Aead, sealer: CookieSealer) -> None:
        if c2s.aead_id != s2c.aead_id:
            raise ValueError("C2S and S2C keys of different AEADs")
        self.c2s, self.s2c, self.sealer = c2s, s2c, sealer
        nonce_len = self.nonce_len = s2c.nonce_length
        cookie_len = self.cookie_len = sealer.length
        field = encode_ef(EfType.NTS_COOKIE, bytes(cookie_len))
        self._cookie_head = field[:EF_HEADER_LEN]
        self._cookie_pad = field[EF_HEADER_LEN + cookie_len:]
        self._nonce_pad = bytes(_pad4(nonce_len) - nonce_len)
        self.random_len: tuple[int, ...] = tuple(
            COOKIE_NONCE_LEN * count + nonce_len for count in range(MAX_COOKIES_PER_RESPONSE + 1)
        )
        """Random bytes :meth:`seal` takes, by cookie count."""
        heads, tails = [], []
        for count in range(MAX_COOKIES_PER_RESPONSE + 1):
            ct_len = _TAG_LEN + count * len(field)
            auth = encode_authenticator(bytes(nonce_len), bytes(ct_len))
            heads.append(auth[:8])
            tails.append(auth[8 + _pad4(nonce_len) + ct_len:])
        # A response is _fixed_len + the unique id field + _cookie_field per cookie
        # (cookie fields are multiples of 4, so no padding moves with the count).
        self._cookie_field = len(field)
        self._fixed_len = HEADER_LEN + len(heads[0]) + _pad4(nonce_len) + len(tails[0]) + _TAG_LEN
        self._auth_heads: tuple[bytes, ...] = tuple(heads)
        self._tails: tuple[bytes, ...] = tuple(tails)
        self._native: _NtsPlan | None = None
        c2s_native, s2c_native, cookies = c2s.native, s2c.native, sealer.compiled
        if (_NtsPlan is not None and c2s_native is not None and s2c_native is not None
                and cookies is not None):
            master, prefix, plaintext = cookies
            self._native = _NtsPlan(
                c2s_native, s2c_native, master, self._cookie_head, prefix, plaintext,
                len(self._cookie_pad), nonce_len, len(self._nonce_pad), self._auth_heads,
                tuple(len(t) for t in tails),
            )

    @property
    def compiled(self) -> bool:
        """Whether this plan builds on ``ntspy._accel``."""
        return self._native is not None

    def cookie_count(self, placeholders: int, unique_id_field_len: int, request_len: int) -> int:
        """New cookies for a request with ``placeholders`` and a unique identifier
        field this long (EF header and padding included): :func:`cookies_that_fit`'s
        answer, in closed form."""
        count = placeholders + 1 if placeholders < MAX_COOKIES_PER_RESPONSE else \
            MAX_COOKIES_PER_RESPONSE
        fit = (request_len - self._fixed_len - unique_id_field_len) // self._cookie_field
        if fit < count:  # no builtin min/max: this runs per packet
            count = fit if fit > 0 else 0
        return count

    def seal(self, header: bytes, unique_id_field: bytes, count: int, random: bytes,
             limit: int) -> bytes:
        """The response: ``header`` (48 bytes), ``unique_id_field`` (the unique
        identifier EF as it goes out), the authenticator sealing ``count`` new
        cookies. ``random``: 16 bytes per cookie nonce, then the nonce.
        ValueError if it would be longer than ``limit`` (its request's length)."""
        native = self._native
        if native is not None:
            return native.seal(header, unique_id_field, count, random, limit)
        return self._seal(header, unique_id_field, count, random, limit)

    def answer(self, request: bytes, layout: RequestLayout, header: bytes, count: int,
               random: bytes) -> bytes | None:
        """The response to a request :func:`scan_request` laid out (as :meth:`seal`
        makes it, with the request's unique id field), or None when its
        authenticator does not verify under the C2S key."""
        _, _, _, uid_end, auth_at, nonce_start, nonce_end, ct_start, ct_end = layout
        native = self._native
        if native is not None:
            return native.answer(request, header, count, random, uid_end, auth_at,
                                 nonce_start, nonce_end, ct_start, ct_end)
        try:
            self.c2s.open(request[nonce_start:nonce_end], request[ct_start:ct_end],
                          request[:auth_at])
        except AuthenticationFailure:
            return None
        return self._seal(header, request[HEADER_LEN:uid_end], count, random, len(request))

    def _seal(self, header: bytes, unique_id_field: bytes, count: int, random: bytes,
              limit: int) -> bytes:
        if len(header) != HEADER_LEN:
            raise ValueError("header has a wrong length")
        if not 0 <= count <= MAX_COOKIES_PER_RESPONSE:
            raise ValueError("count out of range")
        cut = COOKIE_NONCE_LEN * count
        if len(random) != cut + self.nonce_len:
            raise ValueError("random must hold 16 bytes per cookie and the nonce")
        seal, head, pad = self.sealer.seal, self._cookie_head, self._cookie_pad
        plaintext = b"".join([head + seal(random[at:at + COOKIE_NONCE_LEN]) + pad
                              for at in range(0, cut, COOKIE_NONCE_LEN)])
        nonce = random[cut:]
        packet = header + unique_id_field
        out = (packet + self._auth_heads[count] + nonce + self._nonce_pad
               + self.s2c.seal(nonce, plaintext, packet) + self._tails[count])
        if len(out) > limit:
            # count is sized so that this never happens: a response longer
            # than its request would make the server an amplifier
            raise ValueError("the response would be longer than the request")
        return out


def build_response(
    header: NtpHeader,
    unique_id: bytes,
    cookies: Sequence[bytes],
    s2c: Aead,
    nonce: bytes,
) -> bytes:
    """An authenticated response with cookies sealed already: unique id
    echoed, the cookies encrypted (what :class:`ResponsePlan` makes, for
    callers that have an :class:`NtpHeader` and no key ring, e.g. tests)."""
    packet = header.pack() + encode_ef(EfType.UNIQUE_IDENTIFIER, unique_id)
    plaintext = b"".join(encode_ef(EfType.NTS_COOKIE, c) for c in cookies)
    return packet + encode_authenticator(nonce, s2c.seal(nonce, plaintext, packet))


def nak_packet(header: bytes, unique_id_field: bytes) -> bytes:
    """An NTS NAK (RFC 8915 s5.7): ``header`` (48 bytes, kiss code NTSN, made
    by the caller) and the request's unique identifier field, nothing
    authenticated."""
    return header + unique_id_field


def build_nak(header: NtpHeader, unique_id: bytes) -> bytes:
    """An NTS NAK: kiss code NTSN, unique id echoed, nothing authenticated."""
    header.stratum = 0
    header.reference_id = KISS_NTS_NAK
    return nak_packet(header.pack(), encode_ef(EfType.UNIQUE_IDENTIFIER, unique_id))
