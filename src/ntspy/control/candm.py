"""chrony's command and monitoring protocol ("candm"), version 6 as in chrony 4.3.

A sans-I/O codec: bytes in, dataclasses out, and back.  No sockets here; the
daemon and ``ntspy ctl`` move the datagrams.  It is written from the protocol
description (field layouts, numbers), so that Debian's ``chronyc`` 4.3 can
monitor and drive an ntspy daemon, and ``ntspy ctl`` can talk to a chronyd.

The wire, in short (all integers big-endian):

* A request is a 20-byte header -- version (6), packet type (1), two reserved
  zero bytes, command (u16), attempt (u16, resend counter), sequence (u32,
  random per attempt), two zero u32 -- then the command's fields, then zero
  padding.  The padding makes every request at least as long as the reply the
  command gets, so the command port never amplifies traffic: a server never
  sends a reply longer than the request it answers (it stays silent instead).
* A reply is a 28-byte header -- version, type (2), two zero bytes, command
  (echoed), reply code (u16), status (u16), three zero u16, sequence (echoed),
  two zero u32 -- then the reply's fields.  A failed command gets the plain
  28-byte NULL reply with the status set.
* ``Float`` is chrony's 32-bit number: a 7-bit signed exponent over a 25-bit
  signed coefficient, value = coefficient * 2 ** (exponent - 25).
* ``Timespec`` is seconds high u32, seconds low u32, nanoseconds u32
  (0x7fffffff in the high word means "no high word").
* ``IPAddr`` is 16 address bytes (IPv4 in the first four), then family u16
  (0 unspecified, 1 IPv4, 2 IPv6, 3 "ID", a not-yet-resolved source), then a
  zero u16: 20 bytes.

What a daemon serving chronyc has to do besides calling this module:

* Over UDP (``cmdport``, chrony's default 323) answer only loopback or
  ``cmdallow``-ed clients, and answer only the commands :func:`is_monitoring`
  accepts; answer every other command with :attr:`Status.UNAUTH`.  Everything
  is allowed over the Unix datagram socket (``bindcmdaddress /path``).
* chronyc ``-h /dir/sock`` binds its own datagram socket at
  ``/dir/chronyc.<pid>.sock`` (mode 0666), connects it to ``/dir/sock`` and
  sends from it: the daemon must answer with ``sendto`` to the sender's
  address, from the socket bound at ``/dir/sock``, and the directory must be
  writable by whoever runs chronyc.  Since every command is allowed there,
  the directory is the access control: chronyd creates it 0770 and refuses
  one that others can enter.  chronyc's default is /run/chrony/chronyd.sock.
* Echo command and sequence (:func:`build_reply` does).  chronyc waits 1 s,
  resends with a new random sequence and ``attempt`` + 1, waits 2 s, resends,
  waits 4 s, then gives up ("506 Cannot talk to daemon").
* LOGON always fails (status FAILED); NULL succeeds with the NULL reply.

The ntspy extension (:data:`Command.NTSPY_JSON`, :data:`ReplyCode.NTSPY_JSON`)
carries a JSON query and pages a JSON answer back in chunks; see
:class:`JsonQuery`, :func:`build_json_reply` and :class:`JsonPager`.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self, TypeAlias

from ..errors import MalformedPacket

PROTO_VERSION = 6
# A server still answers "version mismatch" to requests from version 5 on; a
# client accepts such an answer from servers of version 4 on.
PROTO_VERSION_MISMATCH_COMPAT_SERVER = 5
PROTO_VERSION_MISMATCH_COMPAT_CLIENT = 4
PKT_TYPE_REQUEST = 1
PKT_TYPE_REPLY = 2

DEFAULT_PORT = 323
DEFAULT_SOCKET = "/run/chrony/chronyd.sock"  # Debian's chronyc default for -h

REQUEST_HEADER_LEN = 20
REPLY_HEADER_LEN = 28
IPADDR_LEN = 20
TIMESPEC_LEN = 12
FLOAT_LEN = 4
NAME_LEN = 256
MAX_CLIENT_ACCESSES = 8
MAX_MANUAL_LIST_SAMPLES = 16
# The largest request chrony accepts: header, its largest command (ADD_SOURCE)
# and the longest padding (CLIENT_ACCESSES_BY_INDEX3's).
MAX_PADDING_LENGTH = 484
MAX_REQUEST_LENGTH = REQUEST_HEADER_LEN + 356 + MAX_PADDING_LENGTH  # 860

# chrony: tv_sec_high value for "32-bit seconds only".
TV_NOHIGHSEC = 0x7FFFFFFF


class Command(enum.IntEnum):
    """Request codes (chrony's REQ_*).  Codes chrony 4.3 no longer serves are
    listed too: a server answers them with :attr:`Status.INVALID`."""

    NULL = 0
    ONLINE = 1
    OFFLINE = 2
    BURST = 3
    MODIFY_MINPOLL = 4
    MODIFY_MAXPOLL = 5
    DUMP = 6
    MODIFY_MAXDELAY = 7
    MODIFY_MAXDELAYRATIO = 8
    MODIFY_MAXUPDATESKEW = 9
    LOGON = 10
    SETTIME = 11
    LOCAL = 12  # obsolete
    MANUAL = 13
    N_SOURCES = 14
    SOURCE_DATA = 15
    REKEY = 16
    ALLOW = 17
    ALLOWALL = 18
    DENY = 19
    DENYALL = 20
    CMDALLOW = 21
    CMDALLOWALL = 22
    CMDDENY = 23
    CMDDENYALL = 24
    ACCHECK = 25
    CMDACCHECK = 26
    ADD_SERVER = 27  # obsolete
    ADD_PEER = 28  # obsolete
    DEL_SOURCE = 29
    WRITERTC = 30
    DFREQ = 31
    DOFFSET = 32  # obsolete
    TRACKING = 33
    SOURCESTATS = 34
    RTCREPORT = 35
    TRIMRTC = 36
    CYCLELOGS = 37
    SUBNETS_ACCESSED = 38  # obsolete
    CLIENT_ACCESSES = 39  # obsolete
    CLIENT_ACCESSES_BY_INDEX = 40  # obsolete
    MANUAL_LIST = 41
    MANUAL_DELETE = 42
    MAKESTEP = 43
    ACTIVITY = 44
    MODIFY_MINSTRATUM = 45
    MODIFY_POLLTARGET = 46
    MODIFY_MAXDELAYDEVRATIO = 47
    RESELECT = 48
    RESELECTDISTANCE = 49
    MODIFY_MAKESTEP = 50
    SMOOTHING = 51
    SMOOTHTIME = 52
    REFRESH = 53
    SERVER_STATS = 54
    CLIENT_ACCESSES_BY_INDEX2 = 55  # obsolete
    LOCAL2 = 56
    NTP_DATA = 57
    ADD_SERVER2 = 58  # obsolete
    ADD_PEER2 = 59  # obsolete
    ADD_SERVER3 = 60  # obsolete
    ADD_PEER3 = 61  # obsolete
    SHUTDOWN = 62
    ONOFFLINE = 63
    ADD_SOURCE = 64
    NTP_SOURCE_NAME = 65
    RESET_SOURCES = 66
    AUTH_DATA = 67
    CLIENT_ACCESSES_BY_INDEX3 = 68
    SELECT_DATA = 69
    RELOAD_SOURCES = 70
    DOFFSET2 = 71
    # ntspy's extension, far above chrony's codes (4.3 ends at 71; later
    # releases add a few each): a JSON query answered in pages.
    NTSPY_JSON = 0x7000


N_CHRONY_REQUEST_TYPES = 72


class ReplyCode(enum.IntEnum):
    """Reply codes (chrony's RPY_*)."""

    NULL = 1
    N_SOURCES = 2
    SOURCE_DATA = 3
    MANUAL_TIMESTAMP = 4  # obsolete
    TRACKING = 5
    SOURCESTATS = 6
    RTC = 7
    SUBNETS_ACCESSED = 8  # obsolete
    CLIENT_ACCESSES = 9  # obsolete
    CLIENT_ACCESSES_BY_INDEX = 10  # obsolete
    MANUAL_LIST = 11  # obsolete
    ACTIVITY = 12
    SMOOTHING = 13
    SERVER_STATS = 14  # obsolete
    CLIENT_ACCESSES_BY_INDEX2 = 15  # obsolete
    NTP_DATA = 16
    MANUAL_TIMESTAMP2 = 17
    MANUAL_LIST2 = 18
    NTP_SOURCE_NAME = 19
    AUTH_DATA = 20
    CLIENT_ACCESSES_BY_INDEX3 = 21
    SERVER_STATS2 = 22  # obsolete
    SELECT_DATA = 23
    SERVER_STATS3 = 24  # what chrony 4.3 sends and chronyc 4.3 wants
    # ntspy's extension: one page of a JSON document.
    NTSPY_JSON = 0x7001


class Status(enum.IntEnum):
    """Status codes (chrony's STT_*)."""

    SUCCESS = 0
    FAILED = 1
    UNAUTH = 2
    INVALID = 3
    NOSUCHSOURCE = 4
    INVALIDTS = 5
    NOTENABLED = 6
    BADSUBNET = 7
    ACCESSALLOWED = 8
    ACCESSDENIED = 9
    NOHOSTACCESS = 10  # deprecated
    SOURCEALREADYKNOWN = 11
    TOOMANYSOURCES = 12
    NORTC = 13
    BADRTCFILE = 14
    INACTIVE = 15
    BADSAMPLE = 16
    INVALIDAF = 17
    BADPKTVERSION = 18
    BADPKTLENGTH = 19
    INVALIDNAME = 21


# What chronyc prints for each status (it prints "200 OK" only for changing
# commands, and "520 Got unexpected error from daemon" for anything else).
STATUS_TEXT: dict[int, str] = {
    Status.SUCCESS: "200 OK",
    Status.ACCESSALLOWED: "208 Access allowed",
    Status.ACCESSDENIED: "209 Access denied",
    Status.FAILED: "500 Failure",
    Status.UNAUTH: "501 Not authorised",
    Status.INVALID: "502 Invalid command",
    Status.NOSUCHSOURCE: "503 No such source",
    Status.INVALIDTS: "504 Duplicate or stale logon detected",
    Status.NOTENABLED: "505 Facility not enabled in daemon",
    Status.BADSUBNET: "507 Bad subnet",
    Status.NOHOSTACCESS: "510 No command access from this host",
    Status.SOURCEALREADYKNOWN: "511 Source already present",
    Status.TOOMANYSOURCES: "512 Too many sources present",
    Status.NORTC: "513 RTC driver not running",
    Status.BADRTCFILE: "514 Can't write RTC parameters",
    Status.INVALIDAF: "515 Invalid address family",
    Status.BADSAMPLE: "516 Sample index out of range",
    Status.BADPKTVERSION: "517 Protocol version mismatch",
    Status.BADPKTLENGTH: "518 Packet length mismatch",
    Status.INACTIVE: "519 Client logging is not active in the daemon",
    Status.INVALIDNAME: "521 Invalid name",
}


def status_text(status: int) -> str:
    return STATUS_TEXT.get(status, "520 Got unexpected error from daemon")


class AddressFamily(enum.IntEnum):
    UNSPEC = 0
    INET4 = 1
    INET6 = 2
    ID = 3


class SourceType(enum.IntEnum):
    """``type`` of an ADD_SOURCE request."""

    SERVER = 1
    PEER = 2
    POOL = 3


class AddSourceFlag(enum.IntFlag):
    """``flags`` of an ADD_SOURCE request."""

    ONLINE = 0x1
    AUTOOFFLINE = 0x2
    IBURST = 0x4
    PREFER = 0x8
    NOSELECT = 0x10
    TRUST = 0x20
    REQUIRE = 0x40
    INTERLEAVED = 0x80
    BURST = 0x100
    NTS = 0x200
    COPY = 0x400
    EF_EXP1 = 0x800


class SourceMode(enum.IntEnum):
    """``mode`` of a SOURCE_DATA reply: '^', '=' and '#' in chronyc."""

    CLIENT = 0
    PEER = 1
    REF = 2


class SourceState(enum.IntEnum):
    """``state`` of a SOURCE_DATA reply: '*', '?', 'x', '~', '+', '-' in chronyc."""

    SELECTED = 0
    NONSELECTABLE = 1
    FALSETICKER = 2
    JITTERY = 3
    UNSELECTED = 4
    SELECTABLE = 5


class AuthMode(enum.IntEnum):
    """``mode`` of an AUTH_DATA reply."""

    NONE = 0
    SYMMETRIC = 1
    NTS = 2


class SelectOption(enum.IntFlag):
    """``conf_options``/``eff_options`` of a SELECT_DATA reply."""

    NOSELECT = 0x1
    PREFER = 0x2
    TRUST = 0x4
    REQUIRE = 0x8


# NTP_DATA flags word: the ten NTP test bits, then two flags.
NTP_FLAGS_TESTS = 0x3FF
NTP_FLAG_INTERLEAVED = 0x4000
NTP_FLAG_AUTHENTICATED = 0x8000

SMOOTHING_FLAG_ACTIVE = 0x1
SMOOTHING_FLAG_LEAPONLY = 0x2

SMOOTHTIME_RESET = 0
SMOOTHTIME_ACTIVATE = 1

# The reference id chronyc treats as "local clock, not synchronised" in waitsync.
LOCAL_REFID = 0x7F7F0101


# ---------------------------------------------------------------------------
# Errors


class CandmError(MalformedPacket):
    """A command-protocol packet that cannot be used."""


class RequestError(CandmError):
    """A request the server cannot serve.

    ``reply`` is what chrony would send back (a NULL reply carrying
    ``status``), or None when chrony drops such a packet without an answer.
    ``command`` and ``sequence`` are set when the header could be read.
    """

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        command: int | None = None,
        sequence: int | None = None,
        reply: bytes | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.command = command
        self.sequence = sequence
        self.reply = reply


class ReplyError(CandmError):
    """A datagram that is not (a usable form of) the reply we wait for.

    chronyc ignores such datagrams and keeps waiting until its timeout."""


class ReplyTooLong(CandmError):
    """The reply would be longer than the request: chrony sends nothing then."""


class CommandFailed(CandmError):
    """The server answered with a status other than success."""

    def __init__(self, status: int) -> None:
        super().__init__(status_text(status))
        self.status = status


# ---------------------------------------------------------------------------
# Float, Timespec, IPAddr

_FLOAT_EXP_BITS = 7
_FLOAT_COEF_BITS = 32 - _FLOAT_EXP_BITS
_FLOAT_EXP_MIN = -(1 << (_FLOAT_EXP_BITS - 1))
_FLOAT_EXP_MAX = -_FLOAT_EXP_MIN - 1
_FLOAT_COEF_MAX = (1 << (_FLOAT_COEF_BITS - 1)) - 1
_LN2 = math.log(2)


def float_to_wire(x: float) -> int:
    """A Python float -> chrony's 32-bit Float, as an unsigned 32-bit integer.

    Same arithmetic as chrony, so the bits match what chronyc/chronyd send:
    NaN becomes 0, magnitudes below 1e-100 become 0, above 1e100 (and the
    infinities) the largest magnitude."""
    neg = 0
    if x < 0.0:
        x = -x
        neg = 1
    elif not x >= 0.0:  # NaN
        x = 0.0
    if x < 1.0e-100:
        exp = coef = 0
    elif x > 1.0e100:
        exp = _FLOAT_EXP_MAX
        coef = _FLOAT_COEF_MAX + neg
    else:
        exp = int(math.log(x) / _LN2 + 1)  # int() truncates toward zero, as C does
        coef = int(x * 2.0 ** (_FLOAT_COEF_BITS - exp) + 0.5)
        while coef > _FLOAT_COEF_MAX + neg:
            coef >>= 1
            exp += 1
        if exp > _FLOAT_EXP_MAX:
            exp = _FLOAT_EXP_MAX
            coef = _FLOAT_COEF_MAX + neg
        elif exp < _FLOAT_EXP_MIN:
            if exp + _FLOAT_COEF_BITS >= _FLOAT_EXP_MIN:
                coef >>= _FLOAT_EXP_MIN - exp
                exp = _FLOAT_EXP_MIN
            else:
                exp = coef = 0
    if neg:
        coef = -coef & ((1 << _FLOAT_COEF_BITS) - 1)
    return ((exp & ((1 << _FLOAT_EXP_BITS) - 1)) << _FLOAT_COEF_BITS) | coef


def float_from_wire(value: int) -> float:
    """chrony's 32-bit Float (as an unsigned 32-bit integer) -> a Python float."""
    value &= 0xFFFFFFFF
    exp = value >> _FLOAT_COEF_BITS
    if exp >= 1 << (_FLOAT_EXP_BITS - 1):
        exp -= 1 << _FLOAT_EXP_BITS
    coef = value & ((1 << _FLOAT_COEF_BITS) - 1)
    if coef >= 1 << (_FLOAT_COEF_BITS - 1):
        coef -= 1 << _FLOAT_COEF_BITS
    return math.ldexp(float(coef), exp - _FLOAT_COEF_BITS)


def wire_round(x: float) -> float:
    """``x`` as it arrives after a trip through a Float."""
    return float_from_wire(float_to_wire(x))


_U32 = struct.Struct("!I")
_TIMESPEC = struct.Struct("!III")
_IPADDR = struct.Struct("!16sHH")


def pack_float(x: float) -> bytes:
    return _U32.pack(float_to_wire(x))


def unpack_float(data: bytes, offset: int = 0) -> float:
    return float_from_wire(_U32.unpack_from(data, offset)[0])


def pack_timespec(t: float) -> bytes:
    """Unix time in seconds (a float; NaN/inf become 0) -> Timespec."""
    if not math.isfinite(t):
        t = 0.0
    seconds = math.floor(t)
    nanos = round((t - seconds) * 1e9)
    if nanos >= 1_000_000_000:
        seconds += 1
        nanos -= 1_000_000_000
    seconds = max(-(1 << 63), min((1 << 63) - 1, seconds))
    return _TIMESPEC.pack((seconds >> 32) & 0xFFFFFFFF, seconds & 0xFFFFFFFF, nanos)


def unpack_timespec(data: bytes, offset: int = 0) -> float:
    """Timespec -> Unix time in seconds (a float)."""
    high, low, nanos = _TIMESPEC.unpack_from(data, offset)
    if high == TV_NOHIGHSEC:
        high = 0
    seconds = (high << 32) | low
    if seconds >= 1 << 63:
        seconds -= 1 << 64
    return float(seconds + min(nanos, 999_999_999) / 1e9)


@dataclass(frozen=True, slots=True)
class SourceId:
    """chrony's stand-in address of a source whose name is not resolved yet."""

    id: int

    def __str__(self) -> str:
        return f"ID#{self.id:010d}"


# None is chrony's "unspecified" address (e.g. "all sources" in ONLINE).
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address | SourceId | None


def parse_address(text: str) -> Address:
    """"192.0.2.1", "2001:db8::1", "ID#0000000001" or "" (unspecified) -> Address."""
    if not text:
        return None
    if text.startswith("ID#"):
        digits = text[3:]
        if not digits.isdigit() or int(digits) > 0xFFFFFFFF:
            raise ValueError(f"bad source id {text!r}")
        return SourceId(int(digits))
    return ipaddress.ip_address(text)


def pack_address(address: Address) -> bytes:
    if address is None:
        return _IPADDR.pack(b"", AddressFamily.UNSPEC, 0)
    if isinstance(address, ipaddress.IPv4Address):
        return _IPADDR.pack(address.packed, AddressFamily.INET4, 0)
    if isinstance(address, ipaddress.IPv6Address):
        return _IPADDR.pack(address.packed, AddressFamily.INET6, 0)
    if isinstance(address, SourceId):
        if not 0 <= address.id <= 0xFFFFFFFF:
            raise ValueError("source id out of range")
        return _IPADDR.pack(_U32.pack(address.id), AddressFamily.ID, 0)
    raise TypeError(f"not an address: {address!r}")


def unpack_address(data: bytes, offset: int = 0) -> Address:
    raw, family, _pad = _IPADDR.unpack_from(data, offset)
    if family == AddressFamily.INET4:
        return ipaddress.IPv4Address(raw[:4])
    if family == AddressFamily.INET6:
        return ipaddress.IPv6Address(raw)
    if family == AddressFamily.ID:
        return SourceId(_U32.unpack_from(raw)[0])
    return None  # chrony reads any other family as unspecified


def address_to_string(address: Address) -> str:
    """How chronyc prints an address (-n or CSV)."""
    if address is None:
        return "[UNSPEC]"
    return str(address)


def refid_to_string(ref_id: int) -> str:
    """A reference id as chronyc prints it: its printable ASCII bytes."""
    chars = [(ref_id >> shift) & 0xFF for shift in (24, 16, 8, 0)]
    return "".join(chr(c) for c in chars if 0x20 <= c < 0x7F)


def mask_for(address: Address, bits: int | None = None) -> Address:
    """The mask chronyc sends with ``address`` (all ones unless ``bits``)."""
    if isinstance(address, ipaddress.IPv4Address):
        width = 32
    elif isinstance(address, ipaddress.IPv6Address):
        width = 128
    else:
        return None
    n = width if bits is None or not 0 <= bits <= width else bits
    value = ((1 << n) - 1) << (width - n)
    if width == 32:
        return ipaddress.IPv4Address(value)
    return ipaddress.IPv6Address(value)


# ---------------------------------------------------------------------------
# Field layouts
#
# A layout is a tuple of (name, kind).  Kinds: struct codes B b H h I i (one
# big-endian integer), "?" a bool in a byte, "Z" a bool in a u32, "c" one
# character in a byte, "F" Float, "T" Timespec, "A" IPAddr, "N" a 256-byte
# NUL-terminated name, "xN" N zero bytes, "XN" N 0xff bytes (name ignored).

Layout: TypeAlias = tuple[tuple[str, str], ...]

_INT_STRUCTS = {code: struct.Struct("!" + code) for code in "BbHhIi"}
_KIND_SIZES = {"?": 1, "Z": 4, "c": 1, "F": 4, "T": TIMESPEC_LEN, "A": IPADDR_LEN, "N": NAME_LEN}


def _kind_size(kind: str) -> int:
    if kind in _INT_STRUCTS:
        return _INT_STRUCTS[kind].size
    if kind[0] in "xX":
        return int(kind[1:])
    return _KIND_SIZES[kind]


def layout_size(layout: Layout) -> int:
    return sum(_kind_size(kind) for _, kind in layout)


def pack_name(name: str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) >= NAME_LEN:
        raise ValueError(f"name longer than {NAME_LEN - 1} bytes")
    return raw.ljust(NAME_LEN, b"\0")


def unpack_name(data: bytes, offset: int = 0) -> str:
    """A 256-byte name field -> str (up to the first NUL; all 256 bytes when
    there is none, which :func:`name_is_terminated` then reports)."""
    raw = data[offset : offset + NAME_LEN]
    end = raw.find(b"\0")
    return (raw if end < 0 else raw[:end]).decode("utf-8", "surrogateescape")


def _pack_value(name: str, kind: str, value: Any) -> bytes:
    if kind in _INT_STRUCTS:
        try:
            return _INT_STRUCTS[kind].pack(int(value))
        except struct.error as exc:
            raise ValueError(f"{name} = {value!r} does not fit the field") from exc
    if kind == "?":
        return b"\x01" if value else b"\x00"
    if kind == "Z":
        return _U32.pack(1 if value else 0)
    if kind == "c":
        if not isinstance(value, str) or len(value) != 1 or ord(value) > 0xFF:
            raise ValueError(f"{name} must be one character")
        return bytes((ord(value),))
    if kind == "F":
        return pack_float(float(value))
    if kind == "T":
        return pack_timespec(float(value))
    if kind == "A":
        return pack_address(value)
    if kind == "N":
        return pack_name(str(value))
    if kind[0] == "x":
        return bytes(int(kind[1:]))
    if kind[0] == "X":
        return b"\xff" * int(kind[1:])
    raise AssertionError(f"unknown field kind {kind!r}")


def _unpack_value(kind: str, data: bytes, offset: int) -> Any:
    if kind in _INT_STRUCTS:
        return _INT_STRUCTS[kind].unpack_from(data, offset)[0]
    if kind == "?":
        return data[offset] != 0
    if kind == "Z":
        return _U32.unpack_from(data, offset)[0] != 0
    if kind == "c":
        return chr(data[offset])
    if kind == "F":
        return unpack_float(data, offset)
    if kind == "T":
        return unpack_timespec(data, offset)
    if kind == "A":
        return unpack_address(data, offset)
    if kind == "N":
        return unpack_name(data, offset)
    raise AssertionError(f"unknown field kind {kind!r}")


class _Body:
    """A fixed-layout part of a packet, described by ``_layout``."""

    __slots__ = ()
    _layout: ClassVar[Layout] = ()

    @classmethod
    def wire_size(cls) -> int:
        return layout_size(cls._layout)

    def pack(self) -> bytes:
        parts = []
        for name, kind in self._layout:
            value = None if kind[0] in "xX" else getattr(self, name)
            parts.append(_pack_value(name, kind, value))
        return b"".join(parts)

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> Self:
        """Decode from ``data`` at ``offset``; the caller checked the length."""
        values: dict[str, Any] = {}
        for name, kind in cls._layout:
            if kind[0] not in "xX":
                values[name] = _unpack_value(kind, data, offset)
            offset += _kind_size(kind)
        return cls._from_wire(values)

    @classmethod
    def _from_wire(cls, values: dict[str, Any]) -> Self:
        return cls(**values)


# ---------------------------------------------------------------------------
# Request bodies


@dataclass(frozen=True, slots=True)
class NoArgs(_Body):
    """Commands without fields (TRACKING, N_SOURCES, DUMP, REKEY, SHUTDOWN...)."""


@dataclass(frozen=True, slots=True)
class MaskAddress(_Body):
    """ONLINE, OFFLINE: the sources whose address matches ``address`` under
    ``mask``; both unspecified (None) means all sources."""

    mask: Address = None
    address: Address = None
    _layout: ClassVar[Layout] = (("mask", "A"), ("address", "A"))


@dataclass(frozen=True, slots=True)
class BurstArgs(_Body):
    """BURST: ``n_good_samples``/``n_total_samples`` for the matching sources."""

    mask: Address = None
    address: Address = None
    n_good_samples: int = 0
    n_total_samples: int = 0
    _layout: ClassVar[Layout] = (
        ("mask", "A"),
        ("address", "A"),
        ("n_good_samples", "i"),
        ("n_total_samples", "i"),
    )


@dataclass(frozen=True, slots=True)
class AddressInt(_Body):
    """MODIFY_MINPOLL, MODIFY_MAXPOLL, MODIFY_MINSTRATUM, MODIFY_POLLTARGET."""

    address: Address = None
    value: int = 0
    _layout: ClassVar[Layout] = (("address", "A"), ("value", "i"))


@dataclass(frozen=True, slots=True)
class AddressFloat(_Body):
    """MODIFY_MAXDELAY, MODIFY_MAXDELAYRATIO, MODIFY_MAXDELAYDEVRATIO."""

    address: Address = None
    value: float = 0.0
    _layout: ClassVar[Layout] = (("address", "A"), ("value", "F"))


@dataclass(frozen=True, slots=True)
class FloatArg(_Body):
    """MODIFY_MAXUPDATESKEW (ppm), DFREQ (ppm), DOFFSET2 (s), RESELECTDISTANCE (s)."""

    value: float = 0.0
    _layout: ClassVar[Layout] = (("value", "F"),)


@dataclass(frozen=True, slots=True)
class IntArg(_Body):
    """MANUAL (0 off, 1 on, 2 reset), SMOOTHTIME (0 reset, 1 activate),
    MANUAL_DELETE (sample index)."""

    value: int = 0
    _layout: ClassVar[Layout] = (("value", "i"),)


@dataclass(frozen=True, slots=True)
class MakestepArgs(_Body):
    """MODIFY_MAKESTEP (chronyc's ``makestep THRESHOLD LIMIT``; a bare
    ``makestep`` is MAKESTEP, without fields)."""

    limit: int = 0
    threshold: float = 0.0
    _layout: ClassVar[Layout] = (("limit", "i"), ("threshold", "F"))


@dataclass(frozen=True, slots=True)
class TimeArg(_Body):
    """SETTIME (and the defunct LOGON): a Unix time in seconds."""

    time: float = 0.0
    _layout: ClassVar[Layout] = (("time", "T"),)


@dataclass(frozen=True, slots=True)
class LocalArgs(_Body):
    """LOCAL2: ``local [stratum N] [distance D] [orphan]`` or ``local off``."""

    on: bool = False
    stratum: int = 0
    distance: float = 0.0
    orphan: bool = False
    _layout: ClassVar[Layout] = (("on", "Z"), ("stratum", "i"), ("distance", "F"), ("orphan", "Z"))


@dataclass(frozen=True, slots=True)
class SourceIndex(_Body):
    """SOURCE_DATA, SOURCESTATS, SELECT_DATA: the ``index``-th source (0-based)."""

    index: int = 0
    _layout: ClassVar[Layout] = (("index", "I"),)


@dataclass(frozen=True, slots=True)
class AllowDenyArgs(_Body):
    """ALLOW, ALLOWALL, DENY, DENYALL and the CMD* versions: a subnet."""

    address: Address = None
    subnet_bits: int = 0
    _layout: ClassVar[Layout] = (("address", "A"), ("subnet_bits", "i"))


@dataclass(frozen=True, slots=True)
class AddressArg(_Body):
    """DEL_SOURCE, NTP_DATA, AUTH_DATA, NTP_SOURCE_NAME, ACCHECK, CMDACCHECK."""

    address: Address = None
    _layout: ClassVar[Layout] = (("address", "A"),)


@dataclass(frozen=True, slots=True)
class AddSource(_Body):
    """ADD_SOURCE (``add server|peer|pool NAME [options]``); defaults are chrony's.

    chronyc resolves ``name`` before sending but sends the name, not the
    address.  A server checks :meth:`check` after its permission check."""

    source_type: int = SourceType.SERVER
    name: str = ""
    port: int = 123
    minpoll: int = 6
    maxpoll: int = 10
    presend_minpoll: int = 100
    min_stratum: int = 0
    poll_target: int = 8
    version: int = 0  # 0: the daemon's default
    max_sources: int = 4
    min_samples: int = -1
    max_samples: int = -1
    authkey: int = 0
    nts_port: int = 4460
    max_delay: float = 3.0
    max_delay_ratio: float = 0.0
    max_delay_dev_ratio: float = 10.0
    min_delay: float = 0.0
    asymmetry: float = 1.0
    offset: float = 0.0
    flags: AddSourceFlag = AddSourceFlag.ONLINE
    filter_length: int = 0
    cert_set: int = 0
    max_delay_quant: float = 0.0
    _layout: ClassVar[Layout] = (
        ("source_type", "I"),
        ("name", "N"),
        ("port", "I"),
        ("minpoll", "i"),
        ("maxpoll", "i"),
        ("presend_minpoll", "i"),
        ("min_stratum", "I"),
        ("poll_target", "I"),
        ("version", "I"),
        ("max_sources", "I"),
        ("min_samples", "i"),
        ("max_samples", "i"),
        ("authkey", "I"),
        ("nts_port", "I"),
        ("max_delay", "F"),
        ("max_delay_ratio", "F"),
        ("max_delay_dev_ratio", "F"),
        ("min_delay", "F"),
        ("asymmetry", "F"),
        ("offset", "F"),
        ("flags", "I"),
        ("filter_length", "i"),
        ("cert_set", "I"),
        ("max_delay_quant", "F"),
        ("reserved", "x4"),
    )

    @classmethod
    def _from_wire(cls, values: dict[str, Any]) -> Self:
        values["flags"] = AddSourceFlag(values["flags"])
        return cls(**values)

    @property
    def pool(self) -> bool:
        return self.source_type == SourceType.POOL

    def check(self) -> int:
        """The status chrony answers this request with before trying to add it:
        INVALID for an unknown type, INVALIDNAME for a name that is not
        NUL-terminated, empty or not a printable ASCII word; else SUCCESS."""
        if self.source_type not in (SourceType.SERVER, SourceType.PEER, SourceType.POOL):
            return Status.INVALID
        raw = self.name.encode("utf-8", "surrogateescape")
        if not raw or len(raw) >= NAME_LEN or not all(0x21 <= c < 0x7F for c in raw):
            return Status.INVALIDNAME
        return Status.SUCCESS


@dataclass(frozen=True, slots=True)
class ClientAccessesQuery(_Body):
    """CLIENT_ACCESSES_BY_INDEX3 (``clients [-p MIN_HITS] [-r]``): up to
    ``n_clients`` (at most 8) records from ``first_index``; ``reset`` clears
    the counters of the records reported."""

    first_index: int = 0
    n_clients: int = MAX_CLIENT_ACCESSES
    min_hits: int = 0
    reset: bool = False
    _layout: ClassVar[Layout] = (
        ("first_index", "I"),
        ("n_clients", "I"),
        ("min_hits", "I"),
        ("reset", "Z"),
    )


# ntspy's JSON extension.  Request: offset u32, text length u16, zero u16,
# UTF-8 JSON text, zeros up to NTSPY_JSON_REQUEST_LENGTH (the request is
# always that long, so every page of the reply fits under it).  Reply: total
# document length u32, offset of this chunk u32, CRC-32 of the whole document
# u32, chunk length u16, zero u16, the chunk.
NTSPY_JSON_REQUEST_LENGTH = MAX_REQUEST_LENGTH
_JSON_REQ_FIXED = struct.Struct("!IHH")
_JSON_RPY_FIXED = struct.Struct("!IIIHH")
NTSPY_JSON_MAX_TEXT = NTSPY_JSON_REQUEST_LENGTH - REQUEST_HEADER_LEN - _JSON_REQ_FIXED.size
NTSPY_JSON_MAX_CHUNK = NTSPY_JSON_REQUEST_LENGTH - REPLY_HEADER_LEN - _JSON_RPY_FIXED.size


@dataclass(frozen=True, slots=True)
class JsonQuery:
    """NTSPY_JSON request: ``{"command": command, "args": [...]}`` and the
    byte offset of the page of the answer wanted."""

    command: str
    args: tuple[Any, ...] = ()
    offset: int = 0

    def text(self) -> bytes:
        doc = {"command": self.command, "args": list(self.args)}
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    def pack(self) -> bytes:
        text = self.text()
        if len(text) > NTSPY_JSON_MAX_TEXT:
            raise ValueError(f"JSON query longer than {NTSPY_JSON_MAX_TEXT} bytes")
        if not 0 <= self.offset <= 0xFFFFFFFF:
            raise ValueError("offset out of range")
        body = _JSON_REQ_FIXED.pack(self.offset, len(text), 0) + text
        return body.ljust(NTSPY_JSON_REQUEST_LENGTH - REQUEST_HEADER_LEN, b"\0")

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> Self:
        start, length, _zero = _JSON_REQ_FIXED.unpack_from(data, offset)
        if length > NTSPY_JSON_MAX_TEXT:
            raise ValueError("JSON text length out of range")
        text_at = offset + _JSON_REQ_FIXED.size
        doc = json.loads(data[text_at : text_at + length].decode("utf-8"))
        if not isinstance(doc, dict) or not isinstance(doc.get("command"), str):
            raise ValueError("JSON query without a command name")
        args = doc.get("args", [])
        if not isinstance(args, list):
            raise ValueError("JSON query args is not a list")
        return cls(doc["command"], tuple(args), start)


RequestBody: TypeAlias = (
    NoArgs
    | MaskAddress
    | BurstArgs
    | AddressInt
    | AddressFloat
    | FloatArg
    | IntArg
    | MakestepArgs
    | TimeArg
    | LocalArgs
    | SourceIndex
    | AllowDenyArgs
    | AddressArg
    | AddSource
    | ClientAccessesQuery
    | JsonQuery
)


# ---------------------------------------------------------------------------
# Reply bodies


@dataclass(frozen=True, slots=True)
class NSources(_Body):
    n_sources: int = 0
    _layout: ClassVar[Layout] = (("n_sources", "I"),)


@dataclass(frozen=True, slots=True)
class SourceData(_Body):
    """One line of ``chronyc sources``.  ``since_sample`` in whole seconds
    (0xFFFFFFFF: never); measurements in seconds."""

    address: Address = None
    poll: int = 0
    stratum: int = 0
    state: int = SourceState.NONSELECTABLE
    mode: int = SourceMode.CLIENT
    flags: int = 0
    reachability: int = 0
    since_sample: int = 0
    orig_latest_meas: float = 0.0
    latest_meas: float = 0.0
    latest_meas_err: float = 0.0
    _layout: ClassVar[Layout] = (
        ("address", "A"),
        ("poll", "h"),
        ("stratum", "H"),
        ("state", "H"),
        ("mode", "H"),
        ("flags", "H"),
        ("reachability", "H"),
        ("since_sample", "I"),
        ("orig_latest_meas", "F"),
        ("latest_meas", "F"),
        ("latest_meas_err", "F"),
    )


@dataclass(frozen=True, slots=True)
class Tracking(_Body):
    """``chronyc tracking``.  ``address`` None: chronyc shows the reference
    id as text (e.g. LOCL); ``leap_status`` 0 normal, 1 insert, 2 delete,
    3 unsynchronised; ``current_correction`` > 0 means the clock is slow."""

    ref_id: int = 0
    address: Address = None
    stratum: int = 0
    leap_status: int = 3
    ref_time: float = 0.0
    current_correction: float = 0.0
    last_offset: float = 0.0
    rms_offset: float = 0.0
    freq_ppm: float = 0.0
    resid_freq_ppm: float = 0.0
    skew_ppm: float = 0.0
    root_delay: float = 0.0
    root_dispersion: float = 0.0
    last_update_interval: float = 0.0
    _layout: ClassVar[Layout] = (
        ("ref_id", "I"),
        ("address", "A"),
        ("stratum", "H"),
        ("leap_status", "H"),
        ("ref_time", "T"),
        ("current_correction", "F"),
        ("last_offset", "F"),
        ("rms_offset", "F"),
        ("freq_ppm", "F"),
        ("resid_freq_ppm", "F"),
        ("skew_ppm", "F"),
        ("root_delay", "F"),
        ("root_dispersion", "F"),
        ("last_update_interval", "F"),
    )


@dataclass(frozen=True, slots=True)
class SourceStats(_Body):
    """One line of ``chronyc sourcestats``."""

    ref_id: int = 0
    address: Address = None
    n_samples: int = 0
    n_runs: int = 0
    span_seconds: int = 0
    sd: float = 0.0
    resid_freq_ppm: float = 0.0
    skew_ppm: float = 0.0
    est_offset: float = 0.0
    est_offset_err: float = 0.0
    _layout: ClassVar[Layout] = (
        ("ref_id", "I"),
        ("address", "A"),
        ("n_samples", "I"),
        ("n_runs", "I"),
        ("span_seconds", "I"),
        ("sd", "F"),
        ("resid_freq_ppm", "F"),
        ("skew_ppm", "F"),
        ("est_offset", "F"),
        ("est_offset_err", "F"),
    )


@dataclass(frozen=True, slots=True)
class RtcReport(_Body):
    ref_time: float = 0.0
    n_samples: int = 0
    n_runs: int = 0
    span_seconds: int = 0
    rtc_seconds_fast: float = 0.0
    rtc_gain_rate_ppm: float = 0.0
    _layout: ClassVar[Layout] = (
        ("ref_time", "T"),
        ("n_samples", "H"),
        ("n_runs", "H"),
        ("span_seconds", "I"),
        ("rtc_seconds_fast", "F"),
        ("rtc_gain_rate_ppm", "F"),
    )


@dataclass(frozen=True, slots=True)
class ManualTimestamp(_Body):
    """Reply to SETTIME (sent with reply code MANUAL_TIMESTAMP2)."""

    offset: float = 0.0
    dfreq_ppm: float = 0.0
    new_afreq_ppm: float = 0.0
    _layout: ClassVar[Layout] = (("offset", "F"), ("dfreq_ppm", "F"), ("new_afreq_ppm", "F"))


@dataclass(frozen=True, slots=True)
class ClientAccess(_Body):
    """One client record of ``chronyc clients``.  Intervals are log2 seconds,
    127 for "-"; ``last_*_ago`` in seconds, 0xFFFFFFFF for never."""

    address: Address = None
    ntp_hits: int = 0
    nke_hits: int = 0
    cmd_hits: int = 0
    ntp_drops: int = 0
    nke_drops: int = 0
    cmd_drops: int = 0
    ntp_interval: int = 127
    nke_interval: int = 127
    cmd_interval: int = 127
    ntp_timeout_interval: int = 127
    last_ntp_hit_ago: int = 0xFFFFFFFF
    last_nke_hit_ago: int = 0xFFFFFFFF
    last_cmd_hit_ago: int = 0xFFFFFFFF
    _layout: ClassVar[Layout] = (
        ("address", "A"),
        ("ntp_hits", "I"),
        ("nke_hits", "I"),
        ("cmd_hits", "I"),
        ("ntp_drops", "I"),
        ("nke_drops", "I"),
        ("cmd_drops", "I"),
        ("ntp_interval", "b"),
        ("nke_interval", "b"),
        ("cmd_interval", "b"),
        ("ntp_timeout_interval", "b"),
        ("last_ntp_hit_ago", "I"),
        ("last_nke_hit_ago", "I"),
        ("last_cmd_hit_ago", "I"),
    )


_CLIENTS_FIXED = struct.Struct("!III")


@dataclass(frozen=True, slots=True)
class ClientAccesses:
    """CLIENT_ACCESSES_BY_INDEX3 reply: ``n_indices`` is the size of the
    server's table, ``next_index`` the index after the last one examined.
    chronyc asks again from ``next_index`` while it got 8 clients and
    ``next_index < n_indices``."""

    n_indices: int = 0
    next_index: int = 0
    clients: tuple[ClientAccess, ...] = ()

    @classmethod
    def wire_size(cls) -> int:
        return _CLIENTS_FIXED.size + MAX_CLIENT_ACCESSES * ClientAccess.wire_size()

    def pack(self) -> bytes:
        if len(self.clients) > MAX_CLIENT_ACCESSES:
            raise ValueError(f"at most {MAX_CLIENT_ACCESSES} clients per reply")
        try:
            head = _CLIENTS_FIXED.pack(self.n_indices, self.next_index, len(self.clients))
        except struct.error as exc:
            raise ValueError("index out of range") from exc
        body = head + b"".join(c.pack() for c in self.clients)
        return body.ljust(self.wire_size(), b"\0")

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> Self:
        n_indices, next_index, n_clients = _CLIENTS_FIXED.unpack_from(data, offset)
        offset += _CLIENTS_FIXED.size
        size = ClientAccess.wire_size()
        clients = tuple(
            ClientAccess.unpack(data, offset + i * size)
            for i in range(min(n_clients, MAX_CLIENT_ACCESSES))
        )
        return cls(n_indices, next_index, clients)


@dataclass(frozen=True, slots=True)
class ServerStats(_Body):
    """``chronyc serverstats`` (sent with reply code SERVER_STATS3)."""

    ntp_hits: int = 0
    nke_hits: int = 0
    cmd_hits: int = 0
    ntp_drops: int = 0
    nke_drops: int = 0
    cmd_drops: int = 0
    log_drops: int = 0
    ntp_auth_hits: int = 0
    ntp_interleaved_hits: int = 0
    ntp_timestamps: int = 0
    ntp_span_seconds: int = 0
    _layout: ClassVar[Layout] = tuple(
        (name, "I")
        for name in (
            "ntp_hits",
            "nke_hits",
            "cmd_hits",
            "ntp_drops",
            "nke_drops",
            "cmd_drops",
            "log_drops",
            "ntp_auth_hits",
            "ntp_interleaved_hits",
            "ntp_timestamps",
            "ntp_span_seconds",
        )
    )


@dataclass(frozen=True, slots=True)
class ManualSample(_Body):
    when: float = 0.0
    slewed_offset: float = 0.0
    orig_offset: float = 0.0
    residual: float = 0.0
    _layout: ClassVar[Layout] = (
        ("when", "T"),
        ("slewed_offset", "F"),
        ("orig_offset", "F"),
        ("residual", "F"),
    )


@dataclass(frozen=True, slots=True)
class ManualList:
    """``chronyc manual list`` (reply code MANUAL_LIST2): up to 16 samples."""

    samples: tuple[ManualSample, ...] = ()

    @classmethod
    def wire_size(cls) -> int:
        return 4 + MAX_MANUAL_LIST_SAMPLES * ManualSample.wire_size()

    def pack(self) -> bytes:
        if len(self.samples) > MAX_MANUAL_LIST_SAMPLES:
            raise ValueError(f"at most {MAX_MANUAL_LIST_SAMPLES} samples")
        body = _U32.pack(len(self.samples)) + b"".join(s.pack() for s in self.samples)
        return body.ljust(self.wire_size(), b"\0")

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> Self:
        (n,) = _U32.unpack_from(data, offset)
        size = ManualSample.wire_size()
        return cls(
            tuple(
                ManualSample.unpack(data, offset + 4 + i * size)
                for i in range(min(n, MAX_MANUAL_LIST_SAMPLES))
            )
        )


@dataclass(frozen=True, slots=True)
class Activity(_Body):
    """``chronyc activity``."""

    online: int = 0
    offline: int = 0
    burst_online: int = 0
    burst_offline: int = 0
    unresolved: int = 0
    _layout: ClassVar[Layout] = (
        ("online", "i"),
        ("offline", "i"),
        ("burst_online", "i"),
        ("burst_offline", "i"),
        ("unresolved", "i"),
    )


@dataclass(frozen=True, slots=True)
class Smoothing(_Body):
    active: bool = False
    leap_only: bool = False
    offset: float = 0.0
    freq_ppm: float = 0.0
    wander_ppm: float = 0.0
    last_update_ago: float = 0.0
    remaining_time: float = 0.0
    _layout: ClassVar[Layout] = (
        ("_flags", "I"),
        ("offset", "F"),
        ("freq_ppm", "F"),
        ("wander_ppm", "F"),
        ("last_update_ago", "F"),
        ("remaining_time", "F"),
    )

    @property
    def _flags(self) -> int:
        return (SMOOTHING_FLAG_ACTIVE if self.active else 0) | (
            SMOOTHING_FLAG_LEAPONLY if self.leap_only else 0
        )

    @classmethod
    def _from_wire(cls, values: dict[str, Any]) -> Self:
        flags = values.pop("_flags")
        return cls(
            active=bool(flags & SMOOTHING_FLAG_ACTIVE),
            leap_only=bool(flags & SMOOTHING_FLAG_LEAPONLY),
            **values,
        )


@dataclass(frozen=True, slots=True)
class NtpData(_Body):
    """``chronyc ntpdata``: the last NTP exchange with a source.  ``poll`` and
    ``precision`` are log2 seconds; ``tests`` the ten test bits (chronyc
    prints them as 3+3+4 binary digits); tx/rx_tss_char 'D'aemon, 'K'ernel
    or 'H'ardware timestamps."""

    remote_address: Address = None
    local_address: Address = None
    remote_port: int = 123
    leap: int = 0
    version: int = 4
    mode: int = 4
    stratum: int = 0
    poll: int = 0
    precision: int = 0
    root_delay: float = 0.0
    root_dispersion: float = 0.0
    ref_id: int = 0
    ref_time: float = 0.0
    offset: float = 0.0
    peer_delay: float = 0.0
    peer_dispersion: float = 0.0
    response_time: float = 0.0
    jitter_asymmetry: float = 0.0
    tests: int = 0
    interleaved: bool = False
    authenticated: bool = False
    tx_tss_char: str = "D"
    rx_tss_char: str = "D"
    total_tx_count: int = 0
    total_rx_count: int = 0
    total_valid_count: int = 0
    total_good_count: int = 0
    _layout: ClassVar[Layout] = (
        ("remote_address", "A"),
        ("local_address", "A"),
        ("remote_port", "H"),
        ("leap", "B"),
        ("version", "B"),
        ("mode", "B"),
        ("stratum", "B"),
        ("poll", "b"),
        ("precision", "b"),
        ("root_delay", "F"),
        ("root_dispersion", "F"),
        ("ref_id", "I"),
        ("ref_time", "T"),
        ("offset", "F"),
        ("peer_delay", "F"),
        ("peer_dispersion", "F"),
        ("response_time", "F"),
        ("jitter_asymmetry", "F"),
        ("_flags", "H"),
        ("tx_tss_char", "c"),
        ("rx_tss_char", "c"),
        ("total_tx_count", "I"),
        ("total_rx_count", "I"),
        ("total_valid_count", "I"),
        ("total_good_count", "I"),
        ("reserved", "X12"),  # chrony fills these with 0xff
    )

    @property
    def _flags(self) -> int:
        if not 0 <= self.tests <= NTP_FLAGS_TESTS:
            raise ValueError("tests must fit in 10 bits")
        return (
            self.tests
            | (NTP_FLAG_INTERLEAVED if self.interleaved else 0)
            | (NTP_FLAG_AUTHENTICATED if self.authenticated else 0)
        )

    @classmethod
    def _from_wire(cls, values: dict[str, Any]) -> Self:
        flags = values.pop("_flags")
        return cls(
            tests=flags & NTP_FLAGS_TESTS,
            interleaved=bool(flags & NTP_FLAG_INTERLEAVED),
            authenticated=bool(flags & NTP_FLAG_AUTHENTICATED),
            **values,
        )


@dataclass(frozen=True, slots=True)
class NtpSourceName(_Body):
    """``chronyc sourcename ADDRESS`` and ``chronyc -N``: the configured name."""

    name: str = ""
    _layout: ClassVar[Layout] = (("name", "N"),)


@dataclass(frozen=True, slots=True)
class AuthData(_Body):
    """One line of ``chronyc authdata``.  ``key_type`` is chrony's number
    (for NTS the AEAD id, e.g. 15); ``last_ke_ago`` seconds, 0xFFFFFFFF never."""

    mode: int = AuthMode.NONE
    key_type: int = 0
    key_id: int = 0
    key_length: int = 0
    ke_attempts: int = 0
    last_ke_ago: int = 0xFFFFFFFF
    cookies: int = 0
    cookie_length: int = 0
    nak: bool = False
    _layout: ClassVar[Layout] = (
        ("mode", "H"),
        ("key_type", "H"),
        ("key_id", "I"),
        ("key_length", "H"),
        ("ke_attempts", "H"),
        ("last_ke_ago", "I"),
        ("cookies", "H"),
        ("cookie_length", "H"),
        ("nak", "H"),
        ("pad", "x2"),
    )

    @classmethod
    def _from_wire(cls, values: dict[str, Any]) -> Self:
        values["nak"] = bool(values["nak"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class SelectData(_Body):
    """One line of ``chronyc selectdata``: ``state_char`` is chrony's one-letter
    selection state ('*', '+', 'x', 'N', 's', 'M', 'd', 'D', '~', 'w', 'W',
    'S', 'O', 'T', 'P', 'U'); limits in seconds."""

    ref_id: int = 0
    address: Address = None
    state_char: str = "N"
    authentication: bool = False
    leap: int = 0
    conf_options: int = 0  # SelectOption bits
    eff_options: int = 0
    last_sample_ago: int = 0
    score: float = 0.0
    lo_limit: float = 0.0
    hi_limit: float = 0.0
    _layout: ClassVar[Layout] = (
        ("ref_id", "I"),
        ("address", "A"),
        ("state_char", "c"),
        ("authentication", "?"),
        ("leap", "B"),
        ("pad", "x1"),
        ("conf_options", "H"),
        ("eff_options", "H"),
        ("last_sample_ago", "I"),
        ("score", "F"),
        ("lo_limit", "F"),
        ("hi_limit", "F"),
    )


@dataclass(frozen=True, slots=True)
class JsonChunk:
    """NTSPY_JSON reply: bytes ``offset``.. of a JSON document of
    ``total_length`` bytes whose CRC-32 is ``digest``."""

    total_length: int
    offset: int
    digest: int
    data: bytes

    def pack(self) -> bytes:
        if len(self.data) > NTSPY_JSON_MAX_CHUNK:
            raise ValueError(f"chunk longer than {NTSPY_JSON_MAX_CHUNK} bytes")
        try:
            head = _JSON_RPY_FIXED.pack(
                self.total_length, self.offset, self.digest, len(self.data), 0
            )
        except struct.error as exc:
            raise ValueError("JSON chunk header out of range") from exc
        return head + self.data

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> Self:
        total, start, digest, length, _zero = _JSON_RPY_FIXED.unpack_from(data, offset)
        at = offset + _JSON_RPY_FIXED.size
        if length > NTSPY_JSON_MAX_CHUNK or at + length > len(data):
            raise ValueError("JSON chunk longer than the packet")
        return cls(total, start, digest, bytes(data[at : at + length]))


ReplyBody: TypeAlias = (
    NSources
    | SourceData
    | Tracking
    | SourceStats
    | RtcReport
    | ManualTimestamp
    | ClientAccesses
    | ServerStats
    | ManualList
    | Activity
    | Smoothing
    | NtpData
    | NtpSourceName
    | AuthData
    | SelectData
    | JsonChunk
)

_REPLY_CLASSES: dict[int, type[Any]] = {
    ReplyCode.N_SOURCES: NSources,
    ReplyCode.SOURCE_DATA: SourceData,
    ReplyCode.TRACKING: Tracking,
    ReplyCode.SOURCESTATS: SourceStats,
    ReplyCode.RTC: RtcReport,
    ReplyCode.MANUAL_TIMESTAMP2: ManualTimestamp,
    ReplyCode.CLIENT_ACCESSES_BY_INDEX3: ClientAccesses,
    ReplyCode.SERVER_STATS3: ServerStats,
    ReplyCode.MANUAL_LIST2: ManualList,
    ReplyCode.ACTIVITY: Activity,
    ReplyCode.SMOOTHING: Smoothing,
    ReplyCode.NTP_DATA: NtpData,
    ReplyCode.NTP_SOURCE_NAME: NtpSourceName,
    ReplyCode.AUTH_DATA: AuthData,
    ReplyCode.SELECT_DATA: SelectData,
    ReplyCode.NTSPY_JSON: JsonChunk,
}
_REPLY_CODE_OF: dict[type[Any], int] = {cls: code for code, cls in _REPLY_CLASSES.items()}


def reply_length(reply_code: int) -> int:
    """Bytes a reply with this code has (chrony's rule); 0 for codes chrony
    4.3 does not know.  For NTSPY_JSON the minimum (an empty chunk)."""
    if reply_code == ReplyCode.NULL:
        return REPLY_HEADER_LEN
    if reply_code == ReplyCode.NTSPY_JSON:
        return REPLY_HEADER_LEN + _JSON_RPY_FIXED.size
    cls = _REPLY_CLASSES.get(reply_code)
    if cls is None:
        return 0
    return REPLY_HEADER_LEN + int(cls.wire_size())


# ---------------------------------------------------------------------------
# Per-command tables


@dataclass(frozen=True, slots=True)
class _CommandSpec:
    body: type[Any]
    data_length: int
    reply: int  # the reply code answering success (chronyc insists on it)

    @property
    def length(self) -> int:
        """Request length with padding: never shorter than the reply."""
        base = REQUEST_HEADER_LEN + self.data_length
        return max(base, reply_length(self.reply))


def _spec(
    body: type[Any], reply: int = ReplyCode.NULL, data_length: int | None = None
) -> _CommandSpec:
    return _CommandSpec(body, body.wire_size() if data_length is None else data_length, reply)


C = Command
_COMMANDS: dict[int, _CommandSpec] = {
    C.NULL: _spec(NoArgs),
    C.ONLINE: _spec(MaskAddress),
    C.OFFLINE: _spec(MaskAddress),
    C.BURST: _spec(BurstArgs),
    C.MODIFY_MINPOLL: _spec(AddressInt),
    C.MODIFY_MAXPOLL: _spec(AddressInt),
    C.DUMP: _spec(NoArgs, data_length=4),  # one zero u32
    C.MODIFY_MAXDELAY: _spec(AddressFloat),
    C.MODIFY_MAXDELAYRATIO: _spec(AddressFloat),
    C.MODIFY_MAXUPDATESKEW: _spec(FloatArg),
    C.LOGON: _spec(TimeArg),
    C.SETTIME: _spec(TimeArg, ReplyCode.MANUAL_TIMESTAMP2),
    C.MANUAL: _spec(IntArg),
    C.N_SOURCES: _spec(NoArgs, ReplyCode.N_SOURCES),
    C.SOURCE_DATA: _spec(SourceIndex, ReplyCode.SOURCE_DATA),
    C.REKEY: _spec(NoArgs),
    C.ALLOW: _spec(AllowDenyArgs),
    C.ALLOWALL: _spec(AllowDenyArgs),
    C.DENY: _spec(AllowDenyArgs),
    C.DENYALL: _spec(AllowDenyArgs),
    C.CMDALLOW: _spec(AllowDenyArgs),
    C.CMDALLOWALL: _spec(AllowDenyArgs),
    C.CMDDENY: _spec(AllowDenyArgs),
    C.CMDDENYALL: _spec(AllowDenyArgs),
    C.ACCHECK: _spec(AddressArg),
    C.CMDACCHECK: _spec(AddressArg),
    C.DEL_SOURCE: _spec(AddressArg),
    C.WRITERTC: _spec(NoArgs),
    C.DFREQ: _spec(FloatArg),
    C.TRACKING: _spec(NoArgs, ReplyCode.TRACKING),
    C.SOURCESTATS: _spec(SourceIndex, ReplyCode.SOURCESTATS),
    C.RTCREPORT: _spec(NoArgs, ReplyCode.RTC),
    C.TRIMRTC: _spec(NoArgs),
    C.CYCLELOGS: _spec(NoArgs),
    C.MANUAL_LIST: _spec(NoArgs, ReplyCode.MANUAL_LIST2),
    C.MANUAL_DELETE: _spec(IntArg),
    C.MAKESTEP: _spec(NoArgs),
    C.ACTIVITY: _spec(NoArgs, ReplyCode.ACTIVITY),
    C.MODIFY_MINSTRATUM: _spec(AddressInt),
    C.MODIFY_POLLTARGET: _spec(AddressInt),
    C.MODIFY_MAXDELAYDEVRATIO: _spec(AddressFloat),
    C.RESELECT: _spec(NoArgs),
    C.RESELECTDISTANCE: _spec(FloatArg),
    C.MODIFY_MAKESTEP: _spec(MakestepArgs),
    C.SMOOTHING: _spec(NoArgs, ReplyCode.SMOOTHING),
    C.SMOOTHTIME: _spec(IntArg),
    C.REFRESH: _spec(NoArgs),
    C.SERVER_STATS: _spec(NoArgs, ReplyCode.SERVER_STATS3),
    C.LOCAL2: _spec(LocalArgs),
    C.NTP_DATA: _spec(AddressArg, ReplyCode.NTP_DATA),
    C.SHUTDOWN: _spec(NoArgs),
    C.ONOFFLINE: _spec(NoArgs),
    C.ADD_SOURCE: _spec(AddSource),
    C.NTP_SOURCE_NAME: _spec(AddressArg, ReplyCode.NTP_SOURCE_NAME),
    C.RESET_SOURCES: _spec(NoArgs),
    C.AUTH_DATA: _spec(AddressArg, ReplyCode.AUTH_DATA),
    C.CLIENT_ACCESSES_BY_INDEX3: _spec(ClientAccessesQuery, ReplyCode.CLIENT_ACCESSES_BY_INDEX3),
    C.SELECT_DATA: _spec(SourceIndex, ReplyCode.SELECT_DATA),
    C.RELOAD_SOURCES: _spec(NoArgs),
    C.DOFFSET2: _spec(FloatArg),
    C.NTSPY_JSON: _CommandSpec(
        JsonQuery, NTSPY_JSON_REQUEST_LENGTH - REQUEST_HEADER_LEN, ReplyCode.NTSPY_JSON
    ),
}
del C


def request_length(command: int) -> int:
    """Length of a request for ``command`` with chronyc's padding; 0 for a
    command chrony 4.3 does not serve (it answers those with INVALID)."""
    spec = _COMMANDS.get(command)
    return 0 if spec is None else spec.length


def padding_length(command: int) -> int:
    spec = _COMMANDS.get(command)
    if spec is None:
        return 0
    return spec.length - REQUEST_HEADER_LEN - spec.data_length


def expected_reply(command: int) -> int | None:
    """The reply code chronyc accepts for a successful ``command``."""
    spec = _COMMANDS.get(command)
    return None if spec is None else spec.reply


def body_type(command: int) -> type[Any] | None:
    """The request-body class of ``command``, None if it is not served."""
    spec = _COMMANDS.get(command)
    return None if spec is None else spec.body


class Permission(enum.IntEnum):
    OPEN = 0  # anyone allowed to talk to the command port
    LOCAL = 1  # loopback only (unused by chrony 4.3)
    AUTH = 2  # Unix domain socket only


_O, _A = Permission.OPEN, Permission.AUTH
# chrony 4.3's table, index = request code.
_PERMISSIONS: tuple[Permission, ...] = (
    _O, _A, _A, _A, _A, _A, _A, _A, _A, _A,  # 0-9
    _O, _A, _A, _A, _O, _O, _A, _A, _A, _A,  # 10-19
    _A, _A, _A, _A, _A, _A, _A, _A, _A, _A,  # 20-29
    _A, _A, _A, _O, _O, _O, _A, _A, _A, _A,  # 30-39
    _A, _O, _A, _A, _O, _A, _A, _A, _A, _A,  # 40-49
    _A, _O, _A, _A, _A, _A, _A, _A, _A, _A,  # 50-59
    _A, _A, _A, _A, _A, _O, _A, _A, _A, _A,  # 60-69
    _A, _A,  # 70-71
)  # fmt: skip
del _O, _A

# Commands that only report (whatever the permission table says); CLIENT_
# ACCESSES_BY_INDEX3 only while its ``reset`` flag is clear.
_READ_ONLY = frozenset(
    {
        Command.NULL,
        Command.N_SOURCES,
        Command.SOURCE_DATA,
        Command.TRACKING,
        Command.SOURCESTATS,
        Command.RTCREPORT,
        Command.MANUAL_LIST,
        Command.ACTIVITY,
        Command.SMOOTHING,
        Command.SERVER_STATS,
        Command.NTP_DATA,
        Command.NTP_SOURCE_NAME,
        Command.AUTH_DATA,
        Command.CLIENT_ACCESSES_BY_INDEX3,
        Command.SELECT_DATA,
        Command.ACCHECK,
        Command.CMDACCHECK,
    }
)


def permission(command: int) -> Permission:
    """chrony 4.3's permission for ``command`` (unknown codes and ntspy's JSON
    extension: AUTH, i.e. Unix socket only)."""
    if 0 <= command < len(_PERMISSIONS):
        return _PERMISSIONS[command]
    return Permission.AUTH


def is_monitoring(command: int) -> bool:
    """True for the commands chrony answers over UDP (PERMIT_OPEN): NULL,
    LOGON, N_SOURCES, SOURCE_DATA, TRACKING, SOURCESTATS, RTCREPORT,
    MANUAL_LIST, ACTIVITY, SMOOTHING, NTP_SOURCE_NAME.  Note that chrony 4.3
    keeps SERVER_STATS, NTP_DATA, AUTH_DATA, SELECT_DATA and the clients list
    to the Unix socket although they only read (see :func:`is_read_only`)."""
    return permission(command) == Permission.OPEN


def is_read_only(command: int) -> bool:
    """True for commands that change nothing in the daemon."""
    return command in _READ_ONLY


def is_allowed(command: int, *, unix_socket: bool, localhost: bool = True) -> bool:
    """chrony's decision: all commands over the Unix socket; over UDP the
    OPEN ones (LOCAL ones from loopback only).  UNAUTH answers the rest."""
    if unix_socket:
        return True
    level = permission(command)
    return level == Permission.OPEN or (level == Permission.LOCAL and localhost)


# ---------------------------------------------------------------------------
# Requests

_REQ_HEADER = struct.Struct("!BBBBHHIII")
_RPY_HEADER = struct.Struct("!BBBBHHHHHHIII")


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request.  ``length`` is how many bytes arrived: no reply may
    be longer."""

    command: int
    body: RequestBody
    sequence: int
    attempt: int = 0
    length: int = 0
    version: int = PROTO_VERSION


def build_request(
    command: int, body: RequestBody | None = None, *, sequence: int, attempt: int = 0
) -> bytes:
    """A request for ``command`` exactly as chronyc 4.3 sends it (fields, then
    zero padding up to the length of the reply it gets)."""
    spec = _COMMANDS.get(command)
    if spec is None:
        raise ValueError(f"command {command} is not served by chrony 4.3")
    if body is None:
        body = spec.body()
    if not isinstance(body, spec.body):
        raise TypeError(f"command {command} takes {spec.body.__name__}, not {type(body).__name__}")
    if not 0 <= sequence <= 0xFFFFFFFF or not 0 <= attempt <= 0xFFFF:
        raise ValueError("sequence or attempt out of range")
    header = _REQ_HEADER.pack(
        PROTO_VERSION, PKT_TYPE_REQUEST, 0, 0, command, attempt, sequence, 0, 0
    )
    data: bytes = body.pack()
    if len(data) > spec.data_length:
        raise AssertionError("request body longer than its layout")
    return (header + data).ljust(spec.length, b"\0")


def _status_reply(command: int, sequence: int, status: int) -> bytes:
    return _RPY_HEADER.pack(
        PROTO_VERSION, PKT_TYPE_REPLY, 0, 0, command, ReplyCode.NULL, status, 0, 0, 0,
        sequence, 0, 0,
    )  # fmt: skip


def parse_request(data: bytes) -> Request | RequestError:
    """Decode a request as chronyd does; never raises.

    On a RequestError, send ``error.reply`` if it is not None (it is chrony's
    answer and is never longer than the request), else drop the packet."""
    n = len(data)
    if n < REPLY_HEADER_LEN or n > MAX_REQUEST_LENGTH:
        # Too short for even an error reply, or longer than any request.
        return RequestError(f"request of {n} bytes")
    version, pkt_type, res1, res2, command, attempt, sequence, _, _ = _REQ_HEADER.unpack_from(data)

    def fail(reason: str, status: int) -> RequestError:
        return RequestError(
            reason,
            status=status,
            command=command,
            sequence=sequence,
            reply=_status_reply(command, sequence, status),
        )

    if pkt_type != PKT_TYPE_REQUEST or res1 or res2:
        return RequestError("not a command request", command=command, sequence=sequence)
    if version != PROTO_VERSION:
        if version >= PROTO_VERSION_MISMATCH_COMPAT_SERVER:
            return fail(f"protocol version {version}", Status.BADPKTVERSION)
        return RequestError(f"protocol version {version}", command=command, sequence=sequence)
    spec = _COMMANDS.get(command)
    if spec is None:
        return fail(f"command {command} not served", Status.INVALID)
    if n < spec.length:
        reason = f"request of {n} bytes, command {command} needs {spec.length}"
        return fail(reason, Status.BADPKTLENGTH)
    try:
        body = spec.body.unpack(data, REQUEST_HEADER_LEN)
    except (ValueError, UnicodeDecodeError, struct.error, RecursionError) as exc:
        return fail(f"bad fields for command {command}: {exc}", Status.INVALID)
    return Request(command, body, sequence, attempt, n, version)


# ---------------------------------------------------------------------------
# Replies


@dataclass(frozen=True, slots=True)
class Reply:
    command: int
    reply_code: int
    status: int
    sequence: int
    body: ReplyBody | None = None
    version: int = PROTO_VERSION

    @property
    def ok(self) -> bool:
        return self.status == Status.SUCCESS


def reply_code_for(body: ReplyBody | None) -> int:
    if body is None:
        return ReplyCode.NULL
    try:
        return _REPLY_CODE_OF[type(body)]
    except KeyError:
        raise TypeError(f"not a reply body: {type(body).__name__}") from None


def build_reply(
    request: Request, status: int = Status.SUCCESS, body: ReplyBody | None = None
) -> bytes:
    """The reply to ``request``.  A failed command takes ``body=None`` (the
    NULL reply); a successful one the body chronyc expects for it.

    Raises ReplyTooLong if the reply would be longer than the request (chrony
    then sends nothing; with the lengths parse_request enforces it does not
    happen), ValueError for a body that does not answer this command."""
    code = reply_code_for(body)
    if body is not None:
        if status != Status.SUCCESS:
            raise ValueError("a failed command gets the NULL reply, not a body")
        wanted = expected_reply(request.command)
        if wanted is not None and wanted != code:
            raise ValueError(f"command {request.command} is answered by reply {wanted}, not {code}")
    header = _RPY_HEADER.pack(
        PROTO_VERSION, PKT_TYPE_REPLY, 0, 0, request.command, code, status, 0, 0, 0,
        request.sequence, 0, 0,
    )  # fmt: skip
    out = header if body is None else header + body.pack()
    if len(out) > request.length:
        raise ReplyTooLong(f"reply of {len(out)} bytes to a request of {request.length}")
    return out


def reply_fits(request: Request, reply_code: int) -> bool:
    """Whether a reply with ``reply_code`` may answer ``request`` (chrony's
    no-amplification rule; NTSPY_JSON: an empty chunk)."""
    return 0 < reply_length(reply_code) <= request.length


def parse_reply(data: bytes, expected_sequence: int, expected_command: int | None = None) -> Reply:
    """Decode a reply as chronyc does.  Raises ReplyError for anything that is
    not a well-formed reply to our request (chronyc ignores it and waits on)."""
    n = len(data)
    if n < REPLY_HEADER_LEN:
        raise ReplyError(f"reply of {n} bytes")
    (
        version, pkt_type, res1, res2, command, code, status, _p1, _p2, _p3, sequence, _p4, _p5,
    ) = _RPY_HEADER.unpack_from(data)  # fmt: skip
    if pkt_type != PKT_TYPE_REPLY or res1 or res2:
        raise ReplyError("not a command reply")
    if version != PROTO_VERSION and not (
        version >= PROTO_VERSION_MISMATCH_COMPAT_CLIENT and status == Status.BADPKTVERSION
    ):
        raise ReplyError(f"reply of protocol version {version}")
    if sequence != expected_sequence:
        raise ReplyError("reply to another request (sequence)")
    if expected_command is not None and command != expected_command:
        raise ReplyError("reply to another command")
    need = reply_length(code)
    if n < need:
        raise ReplyError(f"reply {code} of {n} bytes, needs {need}")
    cls = _REPLY_CLASSES.get(code)
    body: ReplyBody | None = None
    if cls is not None:
        try:
            body = cls.unpack(data, REPLY_HEADER_LEN)
        except (ValueError, struct.error) as exc:
            raise ReplyError(f"bad reply {code}: {exc}") from exc
    return Reply(command, code, status, sequence, body, version)


# ---------------------------------------------------------------------------
# ntspy's JSON extension: server and client sides


def document_digest(document: bytes) -> int:
    return zlib.crc32(document) & 0xFFFFFFFF


def build_json_reply(request: Request, document: bytes) -> bytes:
    """The page of ``document`` (a complete JSON text) that ``request`` asks for.

    Serve the same document to every page of one listing (e.g. keep it a few
    seconds per query text): the client checks the CRC and starts over if
    the document changed under it."""
    if not isinstance(request.body, JsonQuery):
        raise TypeError("not an NTSPY_JSON request")
    start = min(request.body.offset, len(document))
    room = min(NTSPY_JSON_MAX_CHUNK, request.length - REPLY_HEADER_LEN - _JSON_RPY_FIXED.size)
    piece = document[start : start + room]
    chunk = JsonChunk(len(document), start, document_digest(document), piece)
    return build_reply(request, Status.SUCCESS, chunk)


class JsonPager:
    """The client side of one NTSPY_JSON query, without I/O.

    ::

        pager = JsonPager("serverkeys")
        while not pager.done:
            sock.send(pager.next_request(sequence=random_u32()))
            while True:
                try:
                    pager.feed(sock.recv(4096))
                    break
                except ReplyError:
                    continue  # not our reply: keep waiting (until a timeout)
        result = pager.result()

    ``feed`` raises CommandFailed when the server refuses the query and
    CandmError when the document cannot be assembled."""

    def __init__(
        self,
        command: str,
        args: Sequence[Any] = (),
        *,
        max_restarts: int = 3,
        max_size: int = 64 << 20,
    ) -> None:
        self.command = command
        self.args = tuple(args)
        JsonQuery(command, self.args).pack()  # fail early on an oversized query
        self.max_restarts = max_restarts
        self.max_size = max_size
        self.restarts = 0
        self.requests_sent = 0
        self._buffer = bytearray()
        self._total: int | None = None
        self._digest: int | None = None
        self._sequence: int | None = None
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    @property
    def offset(self) -> int:
        return len(self._buffer)

    def next_request(self, sequence: int, attempt: int = 0) -> bytes:
        """The request to send now (a resend too: give a fresh ``sequence``
        and ``attempt`` + 1, as chronyc does)."""
        if self._done:
            raise RuntimeError("the document is complete")
        self._sequence = sequence
        self.requests_sent += 1
        query = JsonQuery(self.command, self.args, len(self._buffer))
        return build_request(Command.NTSPY_JSON, query, sequence=sequence, attempt=attempt)

    def _restart(self, why: str) -> None:
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise CandmError(f"JSON document could not be assembled: {why}")
        self._buffer.clear()
        self._total = self._digest = None

    def feed(self, data: bytes) -> bool:
        """Take a datagram; True once the document is complete."""
        if self._sequence is None or self._done:
            raise ReplyError("no request outstanding")
        reply = parse_reply(data, self._sequence, Command.NTSPY_JSON)
        if reply.status != Status.SUCCESS:
            self._sequence = None
            raise CommandFailed(reply.status)
        chunk = reply.body
        if not isinstance(chunk, JsonChunk):
            raise ReplyError(f"reply {reply.reply_code} to a JSON query")
        if chunk.offset != len(self._buffer):
            raise ReplyError("chunk for another offset")
        self._sequence = None
        if chunk.total_length > self.max_size:
            raise CandmError(f"JSON document of {chunk.total_length} bytes is too large")
        if self._total is None:
            self._total, self._digest = chunk.total_length, chunk.digest
        elif (chunk.total_length, chunk.digest) != (self._total, self._digest):
            self._restart("the document changed while paging")
            return False
        if not chunk.data and len(self._buffer) < self._total:
            raise CandmError("server sent an empty chunk before the end")
        self._buffer += chunk.data
        if len(self._buffer) > self._total:
            self._restart("more data than announced")
            return False
        if len(self._buffer) == self._total:
            if document_digest(bytes(self._buffer)) != self._digest:
                self._restart("CRC mismatch")
                return False
            self._done = True
        return self._done

    def document(self) -> bytes:
        if not self._done:
            raise RuntimeError("the document is not complete")
        return bytes(self._buffer)

    def result(self) -> Any:
        """The document, parsed."""
        return json.loads(self.document().decode("utf-8"))


# ---------------------------------------------------------------------------
# Conveniences for a client mirroring chronyc's command line


def next_clients_query(
    previous: ClientAccessesQuery, reply: ClientAccesses
) -> ClientAccessesQuery | None:
    """The next page of ``clients`` chronyc asks for, or None when it stops."""
    if reply.next_index >= reply.n_indices or len(reply.clients) < MAX_CLIENT_ACCESSES:
        return None
    return ClientAccessesQuery(
        reply.next_index, previous.n_clients, previous.min_hits, previous.reset
    )
