"""NTS Key Establishment records (RFC 8915 s4), sans I/O.

An NTS-KE message is a sequence of records sent over TLS 1.3 (ALPN
``ntske/1``, TCP port 4460) and closed by an End of Message record.  Each
record is::

    C (1 bit) | record type (15 bits) | body length (16 bits) | body

This module turns bytes into :class:`Record` values and back, builds the
client request and the server response, and checks each side's message
against the rules of RFC 8915 s4.1.  It never touches a socket or TLS: the
adapters in ``ntspy.net`` and ``ntspy.client`` / ``ntspy.server`` feed it the
plaintext of the TLS stream and send what it returns.

On receipt we hold peers to the rules that change meaning (which records,
how many, what bodies) but not to the sender-side critical-bit rules of known
record types: the RFC states those as duties of the sender, and a receiver
loses nothing by accepting, say, a non-critical End of Message.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from ..errors import KeProtocolError, KeServerError
from .aead import AeadId

EXPORTER_LABEL = b"EXPORTER-network-time-security"
"""TLS exporter label for the NTS keys (RFC 8915 s5.1)."""

ALPN_NTSKE = b"ntske/1"
"""ALPN protocol id the KE TLS session must negotiate (RFC 8915 s4)."""

DEFAULT_KE_PORT = 4460

MAX_MESSAGE_SIZE = 65536
"""Largest KE message we accept or build, in bytes.

RFC 8915 s4 lets implementations cap message size but says clients SHOULD
accept responses of at least 65536 octets (servers MUST accept requests of at
least 1024), so one cap of 64 KiB serves both directions.
"""

_HEADER = struct.Struct("!HH")
RECORD_HEADER_LEN = _HEADER.size
_CRITICAL_BIT = 0x8000
_MAX_TYPE = 0x7FFF
_MAX_BODY = 0xFFFF
_U16 = struct.Struct("!H")
# RFC 8915 s4.1.7: a Server record holds a DNS name (A-labels only) or an IPv4 /
# IPv6 literal without zone id, so this covers every valid body and keeps
# spaces, control characters and '%' out of the names we later log and resolve.
_SERVER_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:_")
_MAX_SERVER_NAME = 255


class RecordType(IntEnum):
    """NTS-KE record types (IANA "NTS Key Establishment Record Types")."""

    END_OF_MESSAGE = 0
    NEXT_PROTOCOL = 1
    ERROR = 2
    WARNING = 3
    AEAD_ALGORITHM = 4
    NEW_COOKIE = 5
    NTPV4_SERVER = 6
    NTPV4_PORT = 7
    # chrony >= 4.6.1: empty, non-critical; "derive AES-128-GCM-SIV keys with the
    # compliant exporter context". See exporter_context_for().
    COMPLIANT_128GCM_EXPORT = 1024


class ErrorCode(IntEnum):
    """Codes of the Error record (RFC 8915 s4.1.3)."""

    UNRECOGNIZED_CRITICAL_RECORD = 0
    BAD_REQUEST = 1
    INTERNAL_SERVER_ERROR = 2


class NextProtocol(IntEnum):
    """NTS Next Protocol ids (RFC 8915 s7.7)."""

    NTPV4 = 0


KNOWN_WARNING_CODES: frozenset[int] = frozenset()
"""Warning codes we understand.  No code is registered yet, and RFC 8915
s4.1.4 says unrecognised warning codes MUST be treated as errors, so today
every Warning record fails a KE."""

_KNOWN_TYPES = frozenset(int(t) for t in RecordType)


@dataclass(slots=True)
class Record:
    """One NTS-KE record: critical bit, 15-bit type, opaque body."""

    critical: bool
    type: int
    body: bytes

    def encode(self) -> bytes:
        """Wire form of this record."""
        return encode_record(self.type, self.body, self.critical)


def record_header(rtype: int, length: int, critical: bool = False) -> bytes:
    """The 4-byte header of a record of type ``rtype`` with a ``length``-byte body."""
    return _HEADER.pack(rtype | (_CRITICAL_BIT if critical else 0), length)


def encode_record(rtype: int, body: bytes = b"", critical: bool = False) -> bytes:
    """Encode one record.

    Raises ``ValueError`` for a type outside 0..0x7fff or a body over 65535
    bytes: no peer can send those, so they are a bug in the caller.
    """
    if not 0 <= rtype <= _MAX_TYPE:
        raise ValueError(f"record type {rtype} does not fit in 15 bits")
    if len(body) > _MAX_BODY:
        raise ValueError(f"record body of {len(body)} bytes does not fit in 16 bits")
    return _HEADER.pack(rtype | (_CRITICAL_BIT if critical else 0), len(body)) + bytes(body)


class RecordReader:
    """Incremental decoder for one KE message arriving over a byte stream.

    Feed it what TLS delivers, in pieces of any size; it returns the records
    completed by each piece.  After End of Message the message is over: any
    further byte is a protocol error (RFC 8915 s4: nothing follows End of
    Message), as is a message growing past :data:`MAX_MESSAGE_SIZE`.
    """

    __slots__ = ("_buf", "_consumed", "_done")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._consumed = 0  # bytes of the message already turned into records
        self._done = False

    @property
    def done(self) -> bool:
        """True once End of Message has been read."""
        return self._done

    def feed(self, data: bytes) -> list[Record]:
        """Add received bytes; return the records they complete.

        Raises :class:`KeProtocolError` (code Bad Request) for bytes after End
        of Message, an End of Message with a body, or an oversized message.
        """
        if not data:
            return []
        if self._done:
            raise KeProtocolError("data after End of Message", ErrorCode.BAD_REQUEST)
        self._buf += data
        records: list[Record] = []
        pos = 0
        while not self._done and len(self._buf) - pos >= _HEADER.size:
            word, length = _HEADER.unpack_from(self._buf, pos)
            end = pos + _HEADER.size + length
            # Refuse as soon as the header announces too much: no need to
            # buffer 64 KiB of a body we are going to reject anyway.
            if self._consumed + end > MAX_MESSAGE_SIZE:
                raise _too_large()
            if end > len(self._buf):
                break
            record = Record(
                critical=bool(word & _CRITICAL_BIT),
                type=word & _MAX_TYPE,
                body=bytes(self._buf[pos + _HEADER.size : end]),
            )
            pos = end
            records.append(record)
            if record.type == RecordType.END_OF_MESSAGE:
                if record.body:
                    raise KeProtocolError("End of Message record has a body")
                self._done = True
        if self._done and pos < len(self._buf):
            raise KeProtocolError("data after End of Message", ErrorCode.BAD_REQUEST)
        del self._buf[:pos]
        self._consumed += pos
        if self._consumed + len(self._buf) > MAX_MESSAGE_SIZE:
            raise _too_large()
        return records

    def eof(self) -> None:
        """Tell the reader the stream has ended; raises if the message is incomplete."""
        if not self._done:
            raise KeProtocolError("stream ended before End of Message", ErrorCode.BAD_REQUEST)


def _too_large() -> KeProtocolError:
    return KeProtocolError(
        f"NTS-KE message larger than {MAX_MESSAGE_SIZE} bytes", ErrorCode.BAD_REQUEST
    )


def parse_records(data: bytes) -> list[Record]:
    """Decode one whole KE message, which must end exactly with End of Message."""
    reader = RecordReader()
    records = reader.feed(data)
    reader.eof()
    return records


def exporter_context(aead_id: int, s2c: bool, protocol: int = NextProtocol.NTPV4) -> bytes:
    """TLS exporter context for one direction's key (RFC 8915 s5.1).

    u16 next protocol id, u16 AEAD id, then one octet: 0x00 for the
    client-to-server key, 0x01 for the server-to-client key.
    """
    return struct.pack("!HHB", protocol, aead_id, 1 if s2c else 0)


def exporter_context_for(aead_id: int, s2c: bool, compliant_128gcm: bool) -> bytes:
    """Exporter context for NTPv4 keys, with chrony's AES-128-GCM-SIV quirk.

    chrony 4.4 to 4.6.0 derive AES-128-GCM-SIV (id 30) keys with the context
    of AES-SIV-CMAC-256 (id 15).  chrony 4.6.1 and later send the empty,
    non-critical record 1024 (:attr:`RecordType.COMPLIANT_128GCM_EXPORT`); a
    server that knows it echoes it, and then both sides use the RFC context
    with id 30.  So when GCM-SIV was negotiated without that exchange, the peer
    is (or behaves like) an older chrony and id 15 is what it uses.

    ``compliant_128gcm`` is :attr:`ServerResponse.compliant_128gcm` on a
    client and :attr:`ClientRequest.compliant_128gcm` on a server that echoes
    the record.  Every other algorithm always uses its own id.
    """
    context_id = aead_id
    if aead_id == AeadId.AES_128_GCM_SIV and not compliant_128gcm:
        context_id = AeadId.AES_SIV_CMAC_256
    return exporter_context(context_id, s2c)


# --------------------------------------------------------------------------
# shared body codecs


def _u16_list(record: Record, what: str) -> list[int]:
    if len(record.body) % 2:
        raise KeProtocolError(f"{what} record body has odd length {len(record.body)}")
    return [v for (v,) in _U16.iter_unpack(record.body)]


def _u16(record: Record, what: str) -> int:
    if len(record.body) != 2:
        raise KeProtocolError(f"{what} record body must be 2 bytes, got {len(record.body)}")
    value: int = _U16.unpack(record.body)[0]
    return value


def _server_name(body: bytes) -> str:
    if not body or len(body) > _MAX_SERVER_NAME or not _SERVER_CHARS.issuperset(body):
        raise KeProtocolError(f"invalid NTPv4 server name {body[:64]!r}")
    return body.decode("ascii")


def _port(record: Record) -> int:
    port = _u16(record, "NTPv4 Port")
    if port == 0:
        raise KeProtocolError("NTPv4 Port record names port 0")
    return port


def _check_framing(records: Sequence[Record]) -> None:
    """End of Message exactly once, last, with no body (RFC 8915 s4.1.1)."""
    if not records or records[-1].type != RecordType.END_OF_MESSAGE:
        raise KeProtocolError("message does not end with End of Message")
    for record in records[:-1]:
        if record.type == RecordType.END_OF_MESSAGE:
            raise KeProtocolError("records after End of Message")
    if records[-1].body:
        raise KeProtocolError("End of Message record has a body")


def _check_compliant_flag(record: Record) -> None:
    if record.body:
        raise KeProtocolError("compliant AES-128-GCM-SIV export record has a body")


class _Once:
    """Tracks record types that may occur at most once in a message."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def see(self, record: Record, what: str) -> None:
        if record.type in self._seen:
            raise KeProtocolError(f"more than one {what} record")
        self._seen.add(record.type)


def _first_unknown_critical(records: Iterable[Record]) -> Record | None:
    for record in records:
        if record.critical and record.type not in _KNOWN_TYPES:
            return record
    return None


# --------------------------------------------------------------------------
# client side


def build_client_request(
    aeads: Sequence[int],
    server: str | None = None,
    port: int | None = None,
    compliant_128gcm: bool = False,
) -> bytes:
    """The whole KE request, to send in one write (NTPsec expects that).

    ``aeads`` is our preference order.  ``server`` / ``port`` ask the KE
    server for a particular NTP server (RFC 8915 s4.1.7, s4.1.8); the server
    may ignore them, so they go non-critical: a server that does not know
    them should carry on, not fail.  ``compliant_128gcm`` adds chrony's
    record 1024 (see :func:`exporter_context_for`).
    """
    if not aeads:
        raise ValueError("a KE request must offer at least one AEAD algorithm")
    parts = [
        encode_record(RecordType.NEXT_PROTOCOL, _U16.pack(NextProtocol.NTPV4), critical=True),
        encode_record(RecordType.AEAD_ALGORITHM, _pack_u16s(aeads), critical=True),
    ]
    if server is not None:
        parts.append(encode_record(RecordType.NTPV4_SERVER, _encode_server(server)))
    if port is not None:
        parts.append(encode_record(RecordType.NTPV4_PORT, _encode_port(port)))
    if compliant_128gcm:
        parts.append(encode_record(RecordType.COMPLIANT_128GCM_EXPORT))
    parts.append(_END)
    return b"".join(parts)


@dataclass(slots=True)
class ServerResponse:
    """What a successful KE response negotiated."""

    next_protocol: int
    aead: int
    cookies: list[bytes]
    server: str | None  # None: use the KE server's address (RFC 8915 s4.1.7)
    port: int | None  # None: the default NTP port 123 (RFC 8915 s4.1.8)
    warnings: list[int] = field(default_factory=list)
    compliant_128gcm: bool = False


def parse_server_response(
    records: Sequence[Record], offered_aeads: Sequence[int]
) -> ServerResponse:
    """Check a server's KE response against RFC 8915 s4.1 and extract its result.

    Raises :class:`KeServerError` if the server sent an Error record, and
    :class:`KeProtocolError` for anything else that makes the response
    unusable: framing, missing or repeated records, no common protocol or
    AEAD, an AEAD we did not offer, no cookies, malformed bodies, an
    unrecognised critical record or warning code.
    """
    _check_framing(records)
    for record in records:
        if record.type == RecordType.ERROR:
            # s4.1.3: an Error record ends the KE whatever else came with it.
            raise KeServerError(_u16(record, "Error"))
    unknown = _first_unknown_critical(records)
    if unknown is not None:
        raise KeProtocolError(
            f"server sent unrecognised critical record type {unknown.type}",
            ErrorCode.UNRECOGNIZED_CRITICAL_RECORD,
        )

    once = _Once()
    protocols: list[int] | None = None
    aead_list: list[int] | None = None
    cookies: list[bytes] = []
    server: str | None = None
    port: int | None = None
    warnings: list[int] = []
    compliant = False
    for record in records[:-1]:
        rtype = record.type
        if rtype == RecordType.NEXT_PROTOCOL:
            once.see(record, "Next Protocol")
            protocols = _u16_list(record, "Next Protocol")
        elif rtype == RecordType.AEAD_ALGORITHM:
            once.see(record, "AEAD Algorithm")
            aead_list = _u16_list(record, "AEAD Algorithm")
        elif rtype == RecordType.NEW_COOKIE:
            if not record.body:
                raise KeProtocolError("server sent an empty cookie")
            cookies.append(record.body)
        elif rtype == RecordType.NTPV4_SERVER:
            once.see(record, "NTPv4 Server")
            server = _server_name(record.body)
        elif rtype == RecordType.NTPV4_PORT:
            once.see(record, "NTPv4 Port")
            port = _port(record)
        elif rtype == RecordType.WARNING:
            code = _u16(record, "Warning")
            if code not in KNOWN_WARNING_CODES:
                # s4.1.4: unrecognised warning codes MUST be treated as errors.
                raise KeProtocolError(f"server sent unrecognised warning code {code}")
            warnings.append(code)
        elif rtype == RecordType.COMPLIANT_128GCM_EXPORT:
            _check_compliant_flag(record)
            compliant = True
        # Unknown non-critical records are ignored (s4: critical bit clear).

    if protocols is None:
        raise KeProtocolError("response has no Next Protocol record")
    if not protocols:
        raise KeProtocolError("server supports none of the protocols we asked for")
    if protocols != [NextProtocol.NTPV4]:
        raise KeProtocolError(f"server chose next protocols {protocols}, we asked for NTPv4 only")
    if aead_list is None:
        raise KeProtocolError("response has no AEAD Algorithm record")
    if not aead_list:
        raise KeProtocolError("server supports none of the AEAD algorithms we offered")
    if len(aead_list) != 1:
        raise KeProtocolError(f"server chose {len(aead_list)} AEAD algorithms, not one")
    if aead_list[0] not in offered_aeads:
        raise KeProtocolError(f"server chose AEAD {aead_list[0]}, which we did not offer")
    if not cookies:
        raise KeProtocolError("response carries no cookies")
    return ServerResponse(
        next_protocol=NextProtocol.NTPV4,
        aead=aead_list[0],
        cookies=cookies,
        server=server,
        port=port,
        warnings=warnings,
        compliant_128gcm=compliant,
    )


# --------------------------------------------------------------------------
# server side


@dataclass(slots=True)
class ClientRequest:
    """A client's KE request, checked against RFC 8915 s4.1."""

    next_protocols: list[int]
    aeads: list[int]  # preference order; empty only when NTPv4 was not asked for
    server: str | None
    port: int | None
    compliant_128gcm: bool = False


def parse_client_request(records: Sequence[Record]) -> ClientRequest:
    """Check a client's KE request and extract what it asks for.

    Raises :class:`KeProtocolError` whose ``code`` is the Error code to send
    back (see :func:`build_error`): Unrecognized Critical Record for a
    critical record of unknown type (checked first, whatever else is wrong,
    like chrony), Bad Request for everything else.
    """
    unknown = _first_unknown_critical(records)
    if unknown is not None:
        raise KeProtocolError(
            f"client sent unrecognised critical record type {unknown.type}",
            ErrorCode.UNRECOGNIZED_CRITICAL_RECORD,
        )
    _check_framing(records)

    once = _Once()
    protocols: list[int] | None = None
    aeads: list[int] | None = None
    server: str | None = None
    port: int | None = None
    compliant = False
    for record in records[:-1]:
        rtype = record.type
        if rtype == RecordType.NEXT_PROTOCOL:
            once.see(record, "Next Protocol")
            protocols = _u16_list(record, "Next Protocol")
        elif rtype == RecordType.AEAD_ALGORITHM:
            once.see(record, "AEAD Algorithm")
            aeads = _u16_list(record, "AEAD Algorithm")
        elif rtype == RecordType.NTPV4_SERVER:
            once.see(record, "NTPv4 Server")  # s4.1.7: at most one from a client
            server = _server_name(record.body)
        elif rtype == RecordType.NTPV4_PORT:
            once.see(record, "NTPv4 Port")  # s4.1.8: at most one from a client
            port = _port(record)
        elif rtype in (RecordType.ERROR, RecordType.WARNING, RecordType.NEW_COOKIE):
            # s4.1.3, s4.1.4, s4.1.6: clients MUST NOT send these.
            raise KeProtocolError(f"client sent a {RecordType(rtype).name} record")
        elif rtype == RecordType.COMPLIANT_128GCM_EXPORT:
            _check_compliant_flag(record)
            compliant = True

    if protocols is None:
        raise KeProtocolError("request has no Next Protocol record")
    if not protocols:
        # s4.1.2: the request MUST list at least one protocol.
        raise KeProtocolError("request's Next Protocol record is empty")
    if NextProtocol.NTPV4 in protocols:
        # s4.1.5: exactly once, non-empty, whenever NTPv4 is offered.
        if aeads is None:
            raise KeProtocolError("request offers NTPv4 without an AEAD Algorithm record")
        if not aeads:
            raise KeProtocolError("request's AEAD Algorithm record is empty")
    return ClientRequest(
        next_protocols=protocols,
        aeads=aeads or [],
        server=server,
        port=port,
        compliant_128gcm=compliant,
    )


def choose_aead(client_aeads: Sequence[int], allowed: Sequence[int]) -> int | None:
    """The first algorithm in the client's preference order that we allow, or None."""
    for aead_id in client_aeads:
        if aead_id in allowed:
            return aead_id
    return None


def build_server_response(
    aead: int,
    cookies: Sequence[bytes],
    server: str | None = None,
    port: int | None = None,
    compliant_128gcm: bool = False,
) -> bytes:
    """A successful KE response: NTPv4, one AEAD, the cookies, End of Message.

    ``server`` / ``port`` tell the client where to send NTP when that is not
    the KE host / port 123.  They go critical: a client that ignored them
    would talk to the wrong server.  ``compliant_128gcm`` echoes chrony's
    record 1024; pass the request's flag (see :func:`exporter_context_for`).
    """
    if not cookies:
        raise ValueError("a KE response must carry at least one cookie (RFC 8915 s4.1.6)")
    if any(not cookie for cookie in cookies):
        raise ValueError("cookies must not be empty")
    parts = [
        encode_record(RecordType.NEXT_PROTOCOL, _U16.pack(NextProtocol.NTPV4), critical=True),
        encode_record(RecordType.AEAD_ALGORITHM, _U16.pack(aead), critical=True),
    ]
    # s4.1.6: the critical bit of New Cookie MUST NOT be set.
    parts.extend(encode_record(RecordType.NEW_COOKIE, cookie) for cookie in cookies)
    if server is not None:
        parts.append(encode_record(RecordType.NTPV4_SERVER, _encode_server(server), True))
    if port is not None:
        parts.append(encode_record(RecordType.NTPV4_PORT, _encode_port(port), True))
    if compliant_128gcm:
        parts.append(encode_record(RecordType.COMPLIANT_128GCM_EXPORT))
    parts.append(_END)
    message = b"".join(parts)
    if len(message) > MAX_MESSAGE_SIZE:
        raise ValueError(f"response of {len(message)} bytes exceeds {MAX_MESSAGE_SIZE}")
    return message


def build_error(code: int) -> bytes:
    """An Error record (critical, s4.1.3) followed by End of Message."""
    return encode_record(RecordType.ERROR, _encode_u16(code, "error code"), critical=True) + _END


def build_no_common_protocol_response() -> bytes:
    """Answer to a request naming no protocol we speak.

    RFC 8915 s4.1.2: the response's protocol list is a subset of the
    request's and MAY be empty, so it is an empty Next Protocol record.
    """
    return encode_record(RecordType.NEXT_PROTOCOL, b"", critical=True) + _END


def build_no_common_aead_response() -> bytes:
    """Answer to an NTPv4 request offering no AEAD algorithm we allow.

    RFC 8915 s4.1.5: the response's AEAD record "is empty if the server
    supports none of the algorithms offered".
    """
    return (
        encode_record(RecordType.NEXT_PROTOCOL, _U16.pack(NextProtocol.NTPV4), critical=True)
        + encode_record(RecordType.AEAD_ALGORITHM, b"", critical=True)
        + _END
    )


def _encode_u16(value: int, what: str) -> bytes:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{what} {value} does not fit in 16 bits")
    return _U16.pack(value)


def _pack_u16s(values: Sequence[int]) -> bytes:
    return b"".join(_encode_u16(v, "AEAD id") for v in values)


def _encode_server(server: str) -> bytes:
    body = server.encode("ascii", errors="replace")
    if not body or len(body) > _MAX_SERVER_NAME or not _SERVER_CHARS.issuperset(body):
        raise ValueError(f"invalid NTPv4 server name {server!r} (use A-labels or IP literals)")
    return body


def _encode_port(port: int) -> bytes:
    if not 1 <= port <= 0xFFFF:
        raise ValueError(f"invalid NTP port {port}")
    return _U16.pack(port)


_END = encode_record(RecordType.END_OF_MESSAGE, critical=True)
