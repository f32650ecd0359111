"""NTS-KE records and negotiation (RFC 8915 s4)."""

from __future__ import annotations

import struct

import pytest

from ntspy.errors import KeProtocolError, KeServerError
from ntspy.proto.ke import (
    MAX_MESSAGE_SIZE,
    ClientRequest,
    ErrorCode,
    NextProtocol,
    Record,
    RecordReader,
    RecordType,
    build_client_request,
    build_error,
    build_no_common_aead_response,
    build_no_common_protocol_response,
    build_server_response,
    choose_aead,
    encode_record,
    exporter_context,
    exporter_context_for,
    parse_client_request,
    parse_records,
    parse_server_response,
)

SIV256 = 15
SIV512 = 17
GCMSIV = 30
COOKIES = [bytes([i]) * 100 for i in range(8)]


def rec(rtype: int, body: bytes = b"", critical: bool = False) -> Record:
    return Record(critical=critical, type=rtype, body=body)


def u16s(*values: int) -> bytes:
    return b"".join(struct.pack("!H", v) for v in values)


END = rec(RecordType.END_OF_MESSAGE, critical=True)
NEXT_NTP = rec(RecordType.NEXT_PROTOCOL, u16s(0), critical=True)


def good_response(*extra: Record, aead: int = SIV256) -> list[Record]:
    return [
        NEXT_NTP,
        rec(RecordType.AEAD_ALGORITHM, u16s(aead), critical=True),
        rec(RecordType.NEW_COOKIE, b"c" * 64),
        *extra,
        END,
    ]


def good_request(*extra: Record) -> list[Record]:
    return [
        NEXT_NTP,
        rec(RecordType.AEAD_ALGORITHM, u16s(GCMSIV, SIV256), critical=True),
        *extra,
        END,
    ]


# --------------------------------------------------------------------------
# record codec


def test_constants_match_rfc() -> None:
    from ntspy.proto import ke

    assert ke.EXPORTER_LABEL == b"EXPORTER-network-time-security"
    assert ke.ALPN_NTSKE == b"ntske/1"
    assert ke.DEFAULT_KE_PORT == 4460
    assert [int(t) for t in RecordType] == [0, 1, 2, 3, 4, 5, 6, 7, 1024]
    assert [int(c) for c in ErrorCode] == [0, 1, 2]
    assert int(NextProtocol.NTPV4) == 0


def test_record_wire_layout() -> None:
    assert encode_record(RecordType.NEW_COOKIE, b"abc") == b"\x00\x05\x00\x03abc"
    assert encode_record(RecordType.END_OF_MESSAGE, critical=True) == b"\x80\x00\x00\x00"
    assert encode_record(0x7FFF, critical=True)[:2] == b"\xff\xff"
    assert encode_record(1024) == b"\x04\x00\x00\x00"


@pytest.mark.parametrize("rtype", [*list(RecordType), 8, 0x4000, 0x7FFF])
@pytest.mark.parametrize("critical", [False, True])
def test_record_round_trip(rtype: int, critical: bool) -> None:
    body = b"" if rtype == RecordType.END_OF_MESSAGE else bytes(range(7))
    wire = encode_record(rtype, body, critical)
    tail = b"" if rtype == RecordType.END_OF_MESSAGE else encode_record(0, critical=True)
    records = parse_records(wire + tail)
    assert records[0] == Record(critical=critical, type=int(rtype), body=body)
    assert records[0].encode() == wire


def test_encode_rejects_impossible_records() -> None:
    with pytest.raises(ValueError):
        encode_record(0x8000)
    with pytest.raises(ValueError):
        encode_record(-1)
    with pytest.raises(ValueError):
        encode_record(5, bytes(0x10000))
    assert len(encode_record(5, bytes(0xFFFF))) == 0xFFFF + 4


def test_parse_records_requires_end_of_message_last() -> None:
    cookie = encode_record(RecordType.NEW_COOKIE, b"x")
    end = encode_record(RecordType.END_OF_MESSAGE, critical=True)
    with pytest.raises(KeProtocolError, match="before End of Message"):
        parse_records(cookie)
    with pytest.raises(KeProtocolError, match="before End of Message"):
        parse_records(cookie + end[:3])
    with pytest.raises(KeProtocolError, match="after End of Message"):
        parse_records(end + cookie)
    with pytest.raises(KeProtocolError, match="after End of Message"):
        parse_records(end + b"\x00")
    with pytest.raises(KeProtocolError, match="has a body"):
        parse_records(encode_record(RecordType.END_OF_MESSAGE, b"x", critical=True))
    assert parse_records(end) == [END]


# --------------------------------------------------------------------------
# incremental reader


def test_reader_byte_at_a_time() -> None:
    wire = build_server_response(SIV256, COOKIES, server="ntp.example", port=1123)
    reader = RecordReader()
    got: list[Record] = []
    for i in range(len(wire)):
        assert not reader.done
        got.extend(reader.feed(wire[i : i + 1]))
    assert reader.done
    reader.eof()
    assert got == parse_records(wire)
    assert [r.body for r in got if r.type == RecordType.NEW_COOKIE] == COOKIES


def test_reader_returns_records_as_they_complete() -> None:
    first = encode_record(RecordType.NEXT_PROTOCOL, u16s(0), critical=True)
    second = encode_record(RecordType.NEW_COOKIE, b"cookie")
    reader = RecordReader()
    assert reader.feed(first + second[:5]) == [rec(RecordType.NEXT_PROTOCOL, u16s(0), True)]
    assert reader.feed(second[5:]) == [rec(RecordType.NEW_COOKIE, b"cookie")]
    assert reader.feed(b"") == []
    with pytest.raises(KeProtocolError):
        reader.eof()
    assert reader.feed(encode_record(0, critical=True)) == [END]
    assert reader.done


def test_reader_rejects_data_after_end_in_a_later_write() -> None:
    reader = RecordReader()
    reader.feed(encode_record(0, critical=True))
    with pytest.raises(KeProtocolError, match="after End of Message"):
        reader.feed(b"\x00")


def test_reader_accepts_message_of_exactly_the_cap() -> None:
    end = encode_record(0, critical=True)
    body_len = MAX_MESSAGE_SIZE - 4 - len(end)
    wire = encode_record(RecordType.NEW_COOKIE, bytes(body_len)) + end
    assert len(wire) == MAX_MESSAGE_SIZE
    assert len(parse_records(wire)) == 2


def test_reader_refuses_message_over_the_cap() -> None:
    cookie = encode_record(RecordType.NEW_COOKIE, bytes(1000))
    reader = RecordReader()
    with pytest.raises(KeProtocolError, match="larger than") as info:
        for _ in range(MAX_MESSAGE_SIZE // len(cookie) + 1):
            reader.feed(cookie)
    assert info.value.code == ErrorCode.BAD_REQUEST


def test_reader_refuses_oversized_record_from_its_header() -> None:
    # 40 KiB already read, then a header announcing a 64 KiB body: refused at once.
    reader = RecordReader()
    reader.feed(encode_record(RecordType.NEW_COOKIE, bytes(40_000)))
    with pytest.raises(KeProtocolError, match="larger than"):
        reader.feed(struct.pack("!HH", RecordType.NEW_COOKIE, 0xFFFF))


def test_reader_refuses_bytes_past_the_cap_before_a_header_completes() -> None:
    filler = encode_record(RecordType.NEW_COOKIE, bytes(MAX_MESSAGE_SIZE - 4))
    reader = RecordReader()
    assert len(reader.feed(filler)) == 1  # exactly at the cap: fine so far
    with pytest.raises(KeProtocolError, match="larger than"):
        reader.feed(b"\x80")


# --------------------------------------------------------------------------
# exporter context


def test_exporter_context_layout() -> None:
    assert exporter_context(SIV256, s2c=False) == b"\x00\x00\x00\x0f\x00"
    assert exporter_context(SIV256, s2c=True) == b"\x00\x00\x00\x0f\x01"
    assert exporter_context(GCMSIV, s2c=True, protocol=0x8001) == b"\x80\x01\x00\x1e\x01"


def test_exporter_context_chrony_gcm_siv_quirk() -> None:
    # Old chrony (no record 1024): GCM-SIV keys are exported with id 15.
    assert exporter_context_for(GCMSIV, False, compliant_128gcm=False) == exporter_context(
        SIV256, False
    )
    assert exporter_context_for(GCMSIV, True, compliant_128gcm=True) == exporter_context(
        GCMSIV, True
    )
    for aead in (SIV256, 16, SIV512):
        for compliant in (False, True):
            assert exporter_context_for(aead, True, compliant) == exporter_context(aead, True)


# --------------------------------------------------------------------------
# client request


def test_client_request_layout() -> None:
    wire = build_client_request([GCMSIV, SIV256])
    assert parse_records(wire) == [
        rec(RecordType.NEXT_PROTOCOL, u16s(0), critical=True),
        rec(RecordType.AEAD_ALGORITHM, u16s(GCMSIV, SIV256), critical=True),
        END,
    ]


def test_client_request_optional_records() -> None:
    wire = build_client_request([SIV256], server="192.0.2.1", port=1234, compliant_128gcm=True)
    records = parse_records(wire)
    by_type = {r.type: r for r in records}
    assert by_type[RecordType.NTPV4_SERVER] == rec(RecordType.NTPV4_SERVER, b"192.0.2.1")
    assert by_type[RecordType.NTPV4_PORT] == rec(RecordType.NTPV4_PORT, u16s(1234))
    assert by_type[RecordType.COMPLIANT_128GCM_EXPORT] == rec(1024)
    assert records[-1] == END


@pytest.mark.parametrize(
    "kwargs",
    [
        {"aeads": []},
        {"aeads": [0x10000]},
        {"aeads": [15], "server": ""},
        {"aeads": [15], "server": "bad name"},
        {"aeads": [15], "server": "fe80::1%eth0"},
        {"aeads": [15], "server": "bücher.example"},
        {"aeads": [15], "port": 0},
        {"aeads": [15], "port": 65536},
    ],
)
def test_client_request_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        build_client_request(**kwargs)  # type: ignore[arg-type]


def test_server_parses_client_request() -> None:
    wire = build_client_request(
        [GCMSIV, SIV256], server="2001:db8::1", port=123, compliant_128gcm=True
    )
    assert parse_client_request(parse_records(wire)) == ClientRequest(
        next_protocols=[0],
        aeads=[GCMSIV, SIV256],
        server="2001:db8::1",
        port=123,
        compliant_128gcm=True,
    )
    plain = parse_client_request(parse_records(build_client_request([SIV256])))
    assert (plain.server, plain.port, plain.compliant_128gcm) == (None, None, False)


def test_client_request_may_omit_aead_when_not_asking_for_ntpv4() -> None:
    request = parse_client_request([rec(RecordType.NEXT_PROTOCOL, u16s(0x8001), True), END])
    assert request.next_protocols == [0x8001]
    assert request.aeads == []


def test_client_request_ignores_unknown_non_critical_records() -> None:
    request = parse_client_request(good_request(rec(0x4321, b"whatever")))
    assert request.aeads == [GCMSIV, SIV256]


def test_client_request_accepts_known_records_without_critical_bit() -> None:
    records = [
        rec(RecordType.NEXT_PROTOCOL, u16s(0)),
        rec(RecordType.AEAD_ALGORITHM, u16s(15)),
        rec(RecordType.END_OF_MESSAGE),
    ]
    assert parse_client_request(records).aeads == [15]


@pytest.mark.parametrize(
    ("records", "code"),
    [
        # s4 critical bit: unknown critical record -> error 0, even before other faults
        (good_request(rec(0x4321, b"x", critical=True)), ErrorCode.UNRECOGNIZED_CRITICAL_RECORD),
        ([rec(0x10, critical=True), END], ErrorCode.UNRECOGNIZED_CRITICAL_RECORD),
        # s4.1.1 framing
        (good_request()[:-1], ErrorCode.BAD_REQUEST),
        ([], ErrorCode.BAD_REQUEST),
        (
            [NEXT_NTP, END, rec(RecordType.AEAD_ALGORITHM, u16s(15), True), END],
            ErrorCode.BAD_REQUEST,
        ),
        ([*good_request()[:-1], rec(RecordType.END_OF_MESSAGE, b"x", True)], ErrorCode.BAD_REQUEST),
        # s4.1.2 next protocol
        ([rec(RecordType.AEAD_ALGORITHM, u16s(15), True), END], ErrorCode.BAD_REQUEST),
        (good_request(NEXT_NTP), ErrorCode.BAD_REQUEST),
        ([rec(RecordType.NEXT_PROTOCOL, b"", True), END], ErrorCode.BAD_REQUEST),
        ([rec(RecordType.NEXT_PROTOCOL, b"\x00", True), END], ErrorCode.BAD_REQUEST),
        # s4.1.5 AEAD
        ([NEXT_NTP, END], ErrorCode.BAD_REQUEST),
        ([NEXT_NTP, rec(RecordType.AEAD_ALGORITHM, b"", True), END], ErrorCode.BAD_REQUEST),
        (
            [NEXT_NTP, rec(RecordType.AEAD_ALGORITHM, b"\x00\x0f\x00", True), END],
            ErrorCode.BAD_REQUEST,
        ),
        (good_request(rec(RecordType.AEAD_ALGORITHM, u16s(15), True)), ErrorCode.BAD_REQUEST),
        # s4.1.3 / s4.1.4 / s4.1.6: records only a server may send
        (good_request(rec(RecordType.ERROR, u16s(1), True)), ErrorCode.BAD_REQUEST),
        (good_request(rec(RecordType.WARNING, u16s(1), True)), ErrorCode.BAD_REQUEST),
        (good_request(rec(RecordType.NEW_COOKIE, b"c")), ErrorCode.BAD_REQUEST),
        # s4.1.7 / s4.1.8 server and port
        (good_request(rec(RecordType.NTPV4_SERVER, b"")), ErrorCode.BAD_REQUEST),
        (good_request(rec(RecordType.NTPV4_SERVER, "ü".encode())), ErrorCode.BAD_REQUEST),
        (good_request(rec(RecordType.NTPV4_SERVER, b"a\nb")), ErrorCode.BAD_REQUEST),
        (
            good_request(rec(RecordType.NTPV4_SERVER, b"a"), rec(RecordType.NTPV4_SERVER, b"b")),
            ErrorCode.BAD_REQUEST,
        ),
        (good_request(rec(RecordType.NTPV4_PORT, b"\x00\x7b\x00")), ErrorCode.BAD_REQUEST),
        (good_request(rec(RecordType.NTPV4_PORT, u16s(0))), ErrorCode.BAD_REQUEST),
        (
            good_request(rec(RecordType.NTPV4_PORT, u16s(1)), rec(RecordType.NTPV4_PORT, u16s(2))),
            ErrorCode.BAD_REQUEST,
        ),
        # chrony's record 1024 is empty
        (good_request(rec(1024, b"x")), ErrorCode.BAD_REQUEST),
    ],
)
def test_bad_client_requests(records: list[Record], code: ErrorCode) -> None:
    with pytest.raises(KeProtocolError) as info:
        parse_client_request(records)
    assert info.value.code == code


# --------------------------------------------------------------------------
# server response


def test_server_response_layout() -> None:
    wire = build_server_response(GCMSIV, COOKIES[:2])
    assert parse_records(wire) == [
        rec(RecordType.NEXT_PROTOCOL, u16s(0), critical=True),
        rec(RecordType.AEAD_ALGORITHM, u16s(GCMSIV), critical=True),
        rec(RecordType.NEW_COOKIE, COOKIES[0]),
        rec(RecordType.NEW_COOKIE, COOKIES[1]),
        END,
    ]


def test_server_response_optional_records() -> None:
    wire = build_server_response(
        SIV256, COOKIES[:1], server="ntp.example.com", port=4123, compliant_128gcm=True
    )
    by_type = {r.type: r for r in parse_records(wire)}
    assert by_type[RecordType.NTPV4_SERVER] == rec(6, b"ntp.example.com", critical=True)
    assert by_type[RecordType.NTPV4_PORT] == rec(7, u16s(4123), critical=True)
    assert by_type[RecordType.COMPLIANT_128GCM_EXPORT] == rec(1024)


def test_server_response_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        build_server_response(SIV256, [])
    with pytest.raises(ValueError):
        build_server_response(SIV256, [b""])
    with pytest.raises(ValueError):
        build_server_response(SIV256, [bytes(60_000), bytes(10_000)])
    with pytest.raises(ValueError):
        build_server_response(SIV256, COOKIES, server="no spaces")


def test_client_parses_server_response() -> None:
    records = parse_records(build_server_response(SIV256, COOKIES))
    response = parse_server_response(records, [GCMSIV, SIV256])
    assert response.next_protocol == NextProtocol.NTPV4
    assert response.aead == SIV256
    assert response.cookies == COOKIES
    assert (response.server, response.port) == (None, None)
    assert response.warnings == []
    assert response.compliant_128gcm is False


def test_client_ignores_unknown_non_critical_records() -> None:
    response = parse_server_response(good_response(rec(0x7000, b"?")), [SIV256])
    assert response.cookies == [b"c" * 64]


def test_client_sees_server_error_record() -> None:
    for code in (0, 1, 2, 0x8123):
        with pytest.raises(KeServerError) as info:
            parse_server_response(parse_records(build_error(code)), [SIV256])
        assert info.value.code == code
    # An Error record spoils a response that is otherwise fine.
    with pytest.raises(KeServerError):
        parse_server_response(good_response(rec(RecordType.ERROR, u16s(2), True)), [SIV256])


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (good_response()[:-1], "End of Message"),
        ([*good_response()[:-1], END, rec(RecordType.NEW_COOKIE, b"x"), END], "after End"),
        ([rec(RecordType.ERROR, u16s(1) + b"x", True), END], "2 bytes"),
        (good_response(rec(0x1234, critical=True)), "critical record type 4660"),
        # Next Protocol
        (good_response()[1:], "no Next Protocol"),
        (good_response(NEXT_NTP), "more than one Next Protocol"),
        (parse_records(build_no_common_protocol_response()), "none of the protocols"),
        ([rec(1, u16s(0, 0x8000), True), *good_response()[1:]], "next protocols"),
        ([rec(1, u16s(0x8000), True), *good_response()[1:]], "next protocols"),
        ([rec(1, b"\x00", True), *good_response()[1:]], "odd length"),
        # AEAD
        ([NEXT_NTP, rec(RecordType.NEW_COOKIE, b"c"), END], "no AEAD"),
        (parse_records(build_no_common_aead_response()), "none of the AEAD"),
        (good_response(rec(RecordType.AEAD_ALGORITHM, u16s(SIV256), True)), "more than one AEAD"),
        ([NEXT_NTP, rec(4, u16s(SIV256, GCMSIV), True), rec(5, b"c"), END], "2 AEAD"),
        (good_response(aead=SIV512), "did not offer"),
        # cookies
        ([NEXT_NTP, rec(4, u16s(SIV256), True), END], "no cookies"),
        (good_response(rec(RecordType.NEW_COOKIE, b"")), "empty cookie"),
        # warning: no code is known, so every warning fails (s4.1.4)
        (good_response(rec(RecordType.WARNING, u16s(0), True)), "warning code 0"),
        (good_response(rec(RecordType.WARNING, b"", True)), "2 bytes"),
        # server / port
        (good_response(rec(RecordType.NTPV4_SERVER, b"", True)), "server name"),
        (good_response(rec(RecordType.NTPV4_SERVER, b"caf\xc3\xa9", True)), "server name"),
        (good_response(rec(6, b"a", True), rec(6, b"b", True)), "more than one NTPv4 Server"),
        (good_response(rec(RecordType.NTPV4_PORT, b"\x01", True)), "2 bytes"),
        (good_response(rec(RecordType.NTPV4_PORT, u16s(0), True)), "port 0"),
        (good_response(rec(7, u16s(1), True), rec(7, u16s(2), True)), "more than one NTPv4 Port"),
        (good_response(rec(1024, b"\x00")), "has a body"),
    ],
)
def test_bad_server_responses(records: list[Record], message: str) -> None:
    with pytest.raises(KeProtocolError, match=message):
        parse_server_response(records, [GCMSIV, SIV256])


def test_error_builder_and_no_common_responses() -> None:
    assert parse_records(build_error(ErrorCode.BAD_REQUEST)) == [
        rec(RecordType.ERROR, u16s(1), critical=True),
        END,
    ]
    assert parse_records(build_no_common_protocol_response()) == [
        rec(RecordType.NEXT_PROTOCOL, b"", critical=True),
        END,
    ]
    assert parse_records(build_no_common_aead_response()) == [
        NEXT_NTP,
        rec(RecordType.AEAD_ALGORITHM, b"", critical=True),
        END,
    ]
    with pytest.raises(ValueError):
        build_error(0x10000)


def test_choose_aead_follows_client_preference() -> None:
    assert choose_aead([GCMSIV, SIV256], [SIV256, GCMSIV]) == GCMSIV
    assert choose_aead([SIV512, SIV256], [SIV256]) == SIV256
    assert choose_aead([SIV512], [SIV256, GCMSIV]) is None
    assert choose_aead([], [SIV256]) is None


# --------------------------------------------------------------------------
# whole exchange


def run_server(request_wire: bytes, allowed: list[int]) -> bytes:
    """A minimal KE server built from this module, as the real one will be."""
    reader = RecordReader()
    try:
        records = reader.feed(request_wire)
        reader.eof()
        request = parse_client_request(records)
    except KeProtocolError as exc:
        return build_error(exc.code)
    if NextProtocol.NTPV4 not in request.next_protocols:
        return build_no_common_protocol_response()
    aead = choose_aead(request.aeads, allowed)
    if aead is None:
        return build_no_common_aead_response()
    return build_server_response(
        aead, COOKIES, port=4123, compliant_128gcm=request.compliant_128gcm
    )


def test_full_exchange_compliant_gcm_siv() -> None:
    offered = [GCMSIV, SIV256]
    response_wire = run_server(
        build_client_request(offered, compliant_128gcm=True), [SIV256, GCMSIV]
    )
    reader = RecordReader()
    records: list[Record] = []
    for i in range(0, len(response_wire), 7):
        records += reader.feed(response_wire[i : i + 7])
    assert reader.done
    response = parse_server_response(records, offered)
    assert response.aead == GCMSIV
    assert response.cookies == COOKIES
    assert response.port == 4123
    assert response.compliant_128gcm
    # Both ends derive the same keys.
    server_ctx = exporter_context_for(GCMSIV, True, compliant_128gcm=True)
    assert exporter_context_for(response.aead, True, response.compliant_128gcm) == server_ctx
    assert server_ctx == exporter_context(GCMSIV, True)


def test_full_exchange_old_chrony_style_client() -> None:
    # No record 1024 offered: the server does not echo it, both use id 15 for GCM-SIV.
    response = parse_server_response(
        parse_records(run_server(build_client_request([GCMSIV]), [GCMSIV])), [GCMSIV]
    )
    assert response.aead == GCMSIV
    assert not response.compliant_128gcm
    assert exporter_context_for(GCMSIV, False, response.compliant_128gcm) == exporter_context(
        SIV256, False
    )


def test_full_exchange_no_common_aead() -> None:
    wire = run_server(build_client_request([SIV512]), [SIV256])
    with pytest.raises(KeProtocolError, match="none of the AEAD"):
        parse_server_response(parse_records(wire), [SIV512])


def test_full_exchange_server_reports_bad_request() -> None:
    bad = encode_record(RecordType.NEXT_PROTOCOL, b"", critical=True) + encode_record(
        0, critical=True
    )
    with pytest.raises(KeServerError) as info:
        parse_server_response(parse_records(run_server(bad, [SIV256])), [SIV256])
    assert info.value.code == ErrorCode.BAD_REQUEST


def test_full_exchange_server_reports_unknown_critical_record() -> None:
    wire = build_client_request([SIV256])
    wire = encode_record(0x2222, b"", critical=True) + wire
    with pytest.raises(KeServerError) as info:
        parse_server_response(parse_records(run_server(wire, [SIV256])), [SIV256])
    assert info.value.code == ErrorCode.UNRECOGNIZED_CRITICAL_RECORD


def test_full_exchange_no_common_protocol() -> None:
    wire = encode_record(RecordType.NEXT_PROTOCOL, u16s(0x8001), critical=True) + encode_record(
        0, critical=True
    )
    response_wire = run_server(wire, [SIV256])
    assert response_wire == build_no_common_protocol_response()
    with pytest.raises(KeProtocolError, match="none of the protocols"):
        parse_server_response(parse_records(response_wire), [SIV256])
