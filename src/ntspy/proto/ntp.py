"""NTPv4 packets (RFC 5905) and extension fields (RFC 7822).

Timestamps stay 64-bit integers on the wire side (32-bit seconds since 1900 and
a 32-bit fraction) and become Unix nanoseconds only when a caller hands in a
nearby reference time to resolve the era: a 32-bit seconds field wraps every
136 years, the first time on 2036-02-07.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import MalformedPacket

# Seconds from 1900-01-01 (NTP era 0) to 1970-01-01 (Unix epoch).
NTP_UNIX_OFFSET = 2_208_988_800
ERA_SECONDS = 1 << 32
NS_PER_SECOND = 1_000_000_000
HEADER_LEN = 48
NTP_PORT = 123

# RFC 7822 s3: an extension field is at least 16 bytes, a multiple of 4.
EF_HEADER_LEN = 4
EF_MIN_LEN = 16
# RFC 7822 s7.5: a legacy MAC after the header is 4 + 16 or 4 + 20 bytes.
LEGACY_MAC_LENGTHS = (20, 24)

_HEADER = struct.Struct("!BBbbII4sQQQQ")
_NTP_EPOCH_SHIFTED = NTP_UNIX_OFFSET << 32
_TIMESTAMP_MASK = (1 << 64) - 1
_EF_HEADER = struct.Struct("!HH")


class Mode(enum.IntEnum):
    RESERVED = 0
    SYMMETRIC_ACTIVE = 1
    SYMMETRIC_PASSIVE = 2
    CLIENT = 3
    SERVER = 4
    BROADCAST = 5
    CONTROL = 6
    PRIVATE = 7


class Leap(enum.IntEnum):
    NONE = 0
    INSERT_SECOND = 1
    DELETE_SECOND = 2
    UNSYNCHRONIZED = 3


# A server's response header at fixed offsets, for the packet path that packs it
# in one call: first byte (leap, version, mode), stratum, poll, the 21 bytes from
# precision to the reference time (RESPONSE_MIDDLE, the same in every response
# until the server's state changes), origin (the request's transmit time, the
# 8 bytes at REQUEST_TRANSMIT), receive and transmit timestamps.
RESPONSE_HEADER = struct.Struct("!BBB21s8sQQ")
RESPONSE_MIDDLE = struct.Struct("!bII4sQ")
REQUEST_POLL = 2  # offset of a request's poll byte
REQUEST_TRANSMIT = slice(40, 48)  # a request's transmit timestamp, as sent


def first_byte(leap: int, version: int, mode: int) -> int:
    """The header's first byte: leap indicator, version, mode."""
    return (leap & 3) << 6 | (version & 7) << 3 | (mode & 7)


#: ``first byte & VERSION_MODE_MASK`` of an NTPv4 client request.
V4_CLIENT = 4 << 3 | 3
VERSION_MODE_MASK = 0x3F


KISS_NTS_NAK = b"NTSN"
KISS_RATE = b"RATE"
KISS_DENY = b"DENY"
KISS_RESTRICT = b"RSTR"


# ---------------------------------------------------------------------------
# Timestamps


def unix_ns_to_ntp(unix_ns: int) -> int:
    """Unix time in nanoseconds -> 64-bit NTP timestamp (era folded away)."""
    # (ns << 32) // 1e9 is exactly the seconds << 32 plus the fraction (floored,
    # negative times too); adding the epoch and folding to 64 bits folds the era.
    return ((unix_ns << 32) // NS_PER_SECOND + _NTP_EPOCH_SHIFTED) & _TIMESTAMP_MASK


def ntp_to_unix_ns(timestamp: int, pivot_unix_ns: int) -> int:
    """64-bit NTP timestamp -> Unix nanoseconds, in the era closest to ``pivot_unix_ns``.

    The pivot is any time known to be within 68 years of the true one (the local
    clock, a build date): that picks the right era across the 2036 wrap.
    """
    seconds = timestamp >> 32
    fraction = timestamp & 0xFFFFFFFF
    pivot_ntp_seconds = pivot_unix_ns // NS_PER_SECOND + NTP_UNIX_OFFSET
    era = pivot_ntp_seconds // ERA_SECONDS
    best = era * ERA_SECONDS + seconds
    for candidate in (best - ERA_SECONDS, best + ERA_SECONDS):
        if abs(candidate - pivot_ntp_seconds) < abs(best - pivot_ntp_seconds):
            best = candidate
    nanos = (fraction * NS_PER_SECOND + (1 << 31)) >> 32
    return (best - NTP_UNIX_OFFSET) * NS_PER_SECOND + nanos


def short_to_seconds(value: int) -> float:
    """NTP short format (16.16 fixed point, root delay/dispersion) -> seconds."""
    return value / 65536.0


def seconds_to_short(seconds: float) -> int:
    """Seconds -> NTP short format, clamped to the field's range."""
    return max(0, min(0xFFFFFFFF, round(seconds * 65536.0)))


def reference_id_for(address: str) -> bytes:
    """RFC 5905 reference id of an upstream: its IPv4 address, or the first four bytes
    of the MD5 of its IPv6 address (of the name, for anything that is not an address)."""
    import hashlib
    import ipaddress

    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return hashlib.md5(address.encode(), usedforsecurity=False).digest()[:4]
    if isinstance(ip, ipaddress.IPv4Address):
        return ip.packed
    return hashlib.md5(ip.packed, usedforsecurity=False).digest()[:4]


def offset_delay_ns(t1: int, t2: int, t3: int, t4: int) -> tuple[int, int]:
    """Clock offset and round-trip delay from the four on-wire times (Unix ns).

    t1 client transmit, t2 server receive, t3 server transmit, t4 client receive.
    Offset is positive when the server is ahead of the client (RFC 5905 s8).
    """
    offset = ((t2 - t1) + (t3 - t4)) // 2
    delay = (t4 - t1) - (t3 - t2)
    return offset, delay


# ---------------------------------------------------------------------------
# Header


@dataclass(slots=True)
class NtpHeader:
    """The 48-byte NTPv4 header; every field as on the wire."""

    leap: int = Leap.NONE
    version: int = 4
    mode: int = Mode.CLIENT
    stratum: int = 0
    poll: int = 0
    precision: int = 0
    root_delay: int = 0  # NTP short format
    root_dispersion: int = 0  # NTP short format
    reference_id: bytes = b"\x00\x00\x00\x00"
    reference_ts: int = 0
    origin_ts: int = 0
    receive_ts: int = 0
    transmit_ts: int = 0

    def pack(self) -> bytes:
        if not (0 <= self.leap <= 3 and 0 <= self.version <= 7 and 0 <= self.mode <= 7):
            raise ValueError("leap, version or mode out of range")
        first = (self.leap << 6) | (self.version << 3) | self.mode
        return _HEADER.pack(
            first,
            self.stratum,
            self.poll,
            self.precision,
            self.root_delay,
            self.root_dispersion,
            self.reference_id,
            self.reference_ts,
            self.origin_ts,
            self.receive_ts,
            self.transmit_ts,
        )

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> NtpHeader:
        if len(data) < HEADER_LEN:
            raise MalformedPacket(f"NTP packet too short: {len(data)} bytes, need {HEADER_LEN}")
        (first, stratum, poll, precision, root_delay, root_disp, ref_id,
         ref_ts, org_ts, rec_ts, xmt_ts) = _HEADER.unpack_from(data, 0)
        return cls(
            leap=first >> 6,
            version=(first >> 3) & 7,
            mode=first & 7,
            stratum=stratum,
            poll=poll,
            precision=precision,
            root_delay=root_delay,
            root_dispersion=root_disp,
            reference_id=ref_id,
            reference_ts=ref_ts,
            origin_ts=org_ts,
            receive_ts=rec_ts,
            transmit_ts=xmt_ts,
        )

    @property
    def kiss_code(self) -> str | None:
        """The kiss code (e.g. ``RATE``, ``NTSN``) if this is a kiss-o'-death packet."""
        if self.stratum != 0 or self.mode != Mode.SERVER:
            return None
        return self.reference_id.decode("ascii", "replace").rstrip("\x00")


# ---------------------------------------------------------------------------
# Extension fields


@dataclass(slots=True)
class ExtensionField:
    """One RFC 7822 extension field as found in a packet.

    ``offset`` is where the field starts in the packet (the NTS authenticator
    needs it: the associated data is everything before it).
    """

    type: int
    body: bytes
    offset: int = 0


def encode_ef(ef_type: int, body: bytes, min_length: int = EF_MIN_LEN) -> bytes:
    """Encode one extension field, zero-padded to a multiple of 4 and ``min_length``."""
    length = EF_HEADER_LEN + len(body)
    length = max(min_length, (length + 3) & ~3)
    if length > 0xFFFF:
        raise ValueError("extension field too long")
    return _EF_HEADER.pack(ef_type, length) + body + bytes(length - EF_HEADER_LEN - len(body))


def iter_efs(packet: bytes | memoryview, start: int = HEADER_LEN) -> Iterator[ExtensionField]:
    """Yield the extension fields after the header.

    A trailing legacy MAC (20 or 24 bytes, RFC 7822 s7.5) is not an EF and is
    left out; anything else that does not parse raises :class:`MalformedPacket`.
    """
    end = len(packet)
    pos = start
    while pos < end:
        remaining = end - pos
        if remaining in LEGACY_MAC_LENGTHS:
            return
        if remaining < EF_MIN_LEN:
            raise MalformedPacket(f"truncated extension field at offset {pos} ({remaining} bytes)")
        ef_type, length = _EF_HEADER.unpack_from(packet, pos)
        if length < EF_MIN_LEN or length % 4:
            raise MalformedPacket(f"extension field at offset {pos} has invalid length {length}")
        if length > remaining:
            raise MalformedPacket(
                f"extension field at offset {pos} runs past the packet ({length} > {remaining})"
            )
        yield ExtensionField(ef_type, bytes(packet[pos + EF_HEADER_LEN:pos + length]), pos)
        pos += length


@dataclass(slots=True)
class NtpPacket:
    """A parsed NTP packet: header plus its extension fields."""

    header: NtpHeader
    extensions: list[ExtensionField]

    @classmethod
    def parse(cls, data: bytes | memoryview) -> NtpPacket:
        header = NtpHeader.unpack(data)
        efs = list(iter_efs(data)) if header.version == 4 else []
        return cls(header, efs)

    def pack(self) -> bytes:
        return self.header.pack() + b"".join(
            encode_ef(ef.type, ef.body) for ef in self.extensions
        )


# chrony's reference id for its local reference: 127.127.1.1
LOCAL_REFID = bytes([127, 127, 1, 1])


@dataclass(slots=True, frozen=True)
class SyncState:
    """What the server says about its own clock in every response."""

    leap: int = Leap.UNSYNCHRONIZED
    stratum: int = 16
    precision: int = -20
    root_delay: float = 0.0
    root_dispersion: float = 0.0
    reference_id: bytes = b"\x00\x00\x00\x00"
    reference_ts: int = 0  # NTP timestamp of the last update

    @classmethod
    def local(cls, stratum: int, reference_ts: int) -> SyncState:
        """``local stratum N``: the server is its own reference, like chronyd."""
        return cls(Leap.NONE, stratum, -20, 0.0, 0.0, LOCAL_REFID, reference_ts)
