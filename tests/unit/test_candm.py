"""ntspy.control.candm: chrony's command protocol, version 6 (chrony 4.3)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntspy.control import candm
from ntspy.control.candm import (
    Activity,
    AddressArg,
    AddressFloat,
    AddressInt,
    AddSource,
    AddSourceFlag,
    AllowDenyArgs,
    AuthData,
    BurstArgs,
    CandmError,
    ClientAccess,
    ClientAccesses,
    ClientAccessesQuery,
    Command,
    CommandFailed,
    FloatArg,
    IntArg,
    JsonChunk,
    JsonPager,
    JsonQuery,
    LocalArgs,
    MakestepArgs,
    ManualList,
    ManualSample,
    ManualTimestamp,
    MaskAddress,
    NoArgs,
    NSources,
    NtpData,
    NtpSourceName,
    Permission,
    Reply,
    ReplyCode,
    ReplyError,
    ReplyTooLong,
    Request,
    RequestError,
    RtcReport,
    SelectData,
    SelectOption,
    ServerStats,
    Smoothing,
    SourceData,
    SourceId,
    SourceIndex,
    SourceStats,
    Status,
    TimeArg,
    Tracking,
    float_from_wire,
    float_to_wire,
    wire_round,
)
from ntspy.errors import MalformedPacket

IP4 = ipaddress.IPv4Address("192.0.2.1")
IP6 = ipaddress.IPv6Address("2001:db8::1")
SEQ = 0xDEADBEEF

# ---------------------------------------------------------------------------
# Float


@pytest.mark.parametrize(
    ("value", "bits"),
    [
        (0.0, 0),
        (-0.0, 0),
        (math.nan, 0),  # NaN is sent as zero
        (1e-101, 0),  # below 1e-100: zero
        (1.0, 0x04800000),  # exponent 2, coefficient 2**23
        (-1.0, 0x03000000),  # exponent 1, coefficient -2**24 (25-bit two's complement)
        (math.inf, 0x7EFFFFFF),  # largest exponent and coefficient
        (-math.inf, 0x7F000000),  # largest exponent, most negative coefficient
        (1e101, 0x7EFFFFFF),
    ],
)
def test_float_known_encodings(value: float, bits: int) -> None:
    assert float_to_wire(value) == bits


def test_float_decodes_edges() -> None:
    assert float_from_wire(0) == 0.0
    assert float_from_wire(0x04800000) == 1.0
    assert float_from_wire(0x03000000) == -1.0
    assert float_from_wire(0x05800000) == -1.0  # same value, unnormalised
    assert float_from_wire(0x7EFFFFFF) == (2**24 - 1) * 2.0 ** (63 - 25)
    assert float_from_wire(0x7F000000) == -(2.0**24) * 2.0 ** (63 - 25)
    # the smallest magnitude: coefficient 1, exponent -64
    assert float_from_wire(0x80 << 24 | 1) == 2.0 ** (-64 - 25)


@pytest.mark.parametrize(
    "value", [0.1, -0.1, 1e-9, -1e-9, 123.456, 2.0**40, 3.0, 1e-19, 4e18, -12.345, 0.75]
)
def test_float_relative_precision(value: float) -> None:
    assert math.isclose(wire_round(value), value, rel_tol=2.0**-22)


def test_float_tiny_values_underflow_towards_zero() -> None:
    assert wire_round(1e-40) == 0.0 or abs(wire_round(1e-40)) <= 2.0**-89
    assert wire_round(2.0**-89) == 2.0**-89
    # below 2**-65 the coefficient loses bits, below 2**-89 everything
    assert 0 < abs(wire_round(-1e-26)) < 2e-26
    assert wire_round(-1e-27) == 0.0


def test_float_huge_values_saturate() -> None:
    top = float_from_wire(0x7EFFFFFF)  # just under 2**62
    assert wire_round(1e20) == top
    assert wire_round(1e30) == top
    assert wire_round(-1e30) == float_from_wire(0x7F000000)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_float_any_value_encodes(value: float) -> None:
    bits = float_to_wire(value)
    assert 0 <= bits <= 0xFFFFFFFF
    decoded = float_from_wire(bits)
    assert math.isfinite(decoded)
    if math.isfinite(value) and 1e-15 < abs(value) < 1e15:
        assert math.isclose(decoded, value, rel_tol=2.0**-22)
        assert math.copysign(1.0, decoded) == math.copysign(1.0, value)


@given(st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_float_decoded_values_survive_a_second_trip(bits: int) -> None:
    value = float_from_wire(bits)
    assert wire_round(value) == value


# ---------------------------------------------------------------------------
# Timespec, IPAddr


@pytest.mark.parametrize("t", [0.0, 1_700_000_000.5, 1_700_000_000.0, 2.0**40 + 0.25, -1.5])
def test_timespec_round_trip(t: float) -> None:
    assert candm.unpack_timespec(candm.pack_timespec(t)) == t


def test_timespec_fields() -> None:
    raw = candm.pack_timespec(2.0**32 + 7.25)
    assert struct.unpack("!III", raw) == (1, 7, 250_000_000)
    assert candm.pack_timespec(math.nan) == bytes(12)
    assert candm.pack_timespec(math.inf) == bytes(12)
    # 32-bit senders mark the high word as absent; nanoseconds are clamped.
    assert candm.unpack_timespec(struct.pack("!III", 0x7FFFFFFF, 10, 2_000_000_000)) == (
        10 + 999_999_999 / 1e9
    )
    assert candm.unpack_timespec(candm.pack_timespec(1.9999999999)) == 2.0


@given(st.floats(min_value=-1e12, max_value=1e12))
def test_timespec_any_time(t: float) -> None:
    assert abs(candm.unpack_timespec(candm.pack_timespec(t)) - t) <= 1e-9 + abs(t) * 1e-15


@pytest.mark.parametrize("address", [IP4, IP6, SourceId(7), None])
def test_address_round_trip(address: candm.Address) -> None:
    raw = candm.pack_address(address)
    assert len(raw) == 20
    assert candm.unpack_address(raw) == address


def test_address_layout() -> None:
    # Address bytes first, then the family, then a zero pad.
    assert candm.pack_address(IP4) == IP4.packed + bytes(12) + b"\x00\x01\x00\x00"
    assert candm.pack_address(SourceId(1)) == b"\0\0\0\1" + bytes(12) + b"\x00\x03\x00\x00"
    assert candm.pack_address(None) == bytes(20)
    assert candm.unpack_address(bytes(16) + b"\x00\x09\x00\x00") is None  # unknown family


def test_address_strings() -> None:
    assert candm.parse_address("ID#0000000001") == SourceId(1)
    assert str(SourceId(1)) == "ID#0000000001"
    assert candm.parse_address("") is None
    assert candm.parse_address("2001:db8::1") == IP6
    assert candm.address_to_string(None) == "[UNSPEC]"
    with pytest.raises(ValueError):
        candm.parse_address("ID#x")
    assert candm.refid_to_string(0x47505300) == "GPS"
    assert candm.mask_for(IP4) == ipaddress.IPv4Address("255.255.255.255")
    assert candm.mask_for(IP4, 24) == ipaddress.IPv4Address("255.255.255.0")
    assert candm.mask_for(IP6, 64) == ipaddress.IPv6Address("ffff:ffff:ffff:ffff::")
    assert candm.mask_for(None) is None


# ---------------------------------------------------------------------------
# Lengths


def test_request_lengths_match_chrony() -> None:
    # header 20, then the fields, padded up to the reply's length
    expected = {
        Command.NULL: 28, Command.ONLINE: 60, Command.BURST: 68, Command.DUMP: 28,
        Command.MAKESTEP: 28, Command.MODIFY_MAKESTEP: 28, Command.N_SOURCES: 32,
        Command.SOURCE_DATA: 76, Command.TRACKING: 104, Command.SOURCESTATS: 84,
        Command.ACTIVITY: 48, Command.SERVER_STATS: 72, Command.NTP_DATA: 152,
        Command.NTP_SOURCE_NAME: 284, Command.AUTH_DATA: 52,
        Command.CLIENT_ACCESSES_BY_INDEX3: 520, Command.SELECT_DATA: 76,
        Command.ADD_SOURCE: 372, Command.DEL_SOURCE: 40, Command.SETTIME: 40,
        Command.MANUAL_LIST: 416, Command.RTCREPORT: 56, Command.SMOOTHING: 52,
        Command.LOCAL2: 36, Command.ALLOW: 44, Command.NTSPY_JSON: 860,
    }  # fmt: skip
    for command, length in expected.items():
        assert candm.request_length(command) == length, command.name
    assert candm.padding_length(Command.CLIENT_ACCESSES_BY_INDEX3) == candm.MAX_PADDING_LENGTH
    for obsolete in (Command.LOCAL, Command.ADD_SERVER, Command.DOFFSET, 72, 999):
        assert candm.request_length(obsolete) == 0
    assert max(candm.request_length(c) for c in range(72)) <= candm.MAX_REQUEST_LENGTH


def test_reply_lengths_match_chrony() -> None:
    expected = {
        ReplyCode.NULL: 28, ReplyCode.N_SOURCES: 32, ReplyCode.SOURCE_DATA: 76,
        ReplyCode.TRACKING: 104, ReplyCode.SOURCESTATS: 84, ReplyCode.RTC: 56,
        ReplyCode.ACTIVITY: 48, ReplyCode.SMOOTHING: 52, ReplyCode.NTP_DATA: 152,
        ReplyCode.MANUAL_TIMESTAMP2: 40, ReplyCode.MANUAL_LIST2: 416,
        ReplyCode.NTP_SOURCE_NAME: 284, ReplyCode.AUTH_DATA: 52,
        ReplyCode.CLIENT_ACCESSES_BY_INDEX3: 520, ReplyCode.SELECT_DATA: 76,
        ReplyCode.SERVER_STATS3: 72,
    }  # fmt: skip
    for code, length in expected.items():
        assert candm.reply_length(code) == length, code.name
    for obsolete in (ReplyCode.SERVER_STATS, ReplyCode.SERVER_STATS2, ReplyCode.MANUAL_LIST, 99):
        assert candm.reply_length(obsolete) == 0


def test_expected_replies() -> None:
    assert candm.expected_reply(Command.SERVER_STATS) == ReplyCode.SERVER_STATS3
    assert candm.expected_reply(Command.CLIENT_ACCESSES_BY_INDEX3) == (
        ReplyCode.CLIENT_ACCESSES_BY_INDEX3
    )
    assert candm.expected_reply(Command.BURST) == ReplyCode.NULL
    assert candm.expected_reply(Command.LOCAL) is None


def test_request_header_layout() -> None:
    raw = candm.build_request(Command.TRACKING, sequence=0x01020304, attempt=2)
    assert raw == bytes([6, 1, 0, 0, 0, 33, 0, 2, 1, 2, 3, 4]) + bytes(104 - 12)


# ---------------------------------------------------------------------------
# Requests: client build -> server parse

REQUEST_SAMPLES: dict[type[Any], Any] = {
    NoArgs: NoArgs(),
    MaskAddress: MaskAddress(ipaddress.IPv4Address("255.255.255.0"), IP4),
    BurstArgs: BurstArgs(candm.mask_for(IP6), IP6, 2, 4),
    AddressInt: AddressInt(IP4, -3),
    AddressFloat: AddressFloat(IP6, wire_round(0.25)),
    FloatArg: FloatArg(wire_round(-1.5e-3)),
    IntArg: IntArg(2),
    MakestepArgs: MakestepArgs(3, wire_round(0.1)),
    TimeArg: TimeArg(1_700_000_000.5),
    LocalArgs: LocalArgs(True, 10, wire_round(1.0), True),
    SourceIndex: SourceIndex(5),
    AllowDenyArgs: AllowDenyArgs(ipaddress.IPv4Address("10.0.0.0"), 8),
    AddressArg: AddressArg(SourceId(3)),
    AddSource: AddSource(
        source_type=candm.SourceType.POOL, name="pool.example.net", port=1123, minpoll=-2,
        maxpoll=12, presend_minpoll=9, min_stratum=2, poll_target=20, version=3,
        max_sources=6, min_samples=3, max_samples=30, authkey=9, nts_port=4461,
        max_delay=wire_round(0.3), max_delay_ratio=2.0, max_delay_dev_ratio=5.0,
        min_delay=wire_round(1e-4), asymmetry=-0.5, offset=wire_round(-0.002),
        flags=AddSourceFlag.NTS | AddSourceFlag.IBURST | AddSourceFlag.EF_EXP1,
        filter_length=4, cert_set=2, max_delay_quant=wire_round(0.7),
    ),
    ClientAccessesQuery: ClientAccessesQuery(16, 8, 2, True),
    JsonQuery: JsonQuery("serverkeys", ("--all", 3, {"x": [1, None]}), 1640),
}  # fmt: skip

SERVED = sorted(c for c in Command if candm.request_length(c))


@pytest.mark.parametrize("command", SERVED, ids=[Command(c).name for c in SERVED])
def test_every_request_round_trips(command: int) -> None:
    body_type = candm.body_type(command)
    assert body_type is not None
    body = REQUEST_SAMPLES[body_type]
    raw = candm.build_request(command, body, sequence=SEQ, attempt=1)
    assert len(raw) == candm.request_length(command)
    request = candm.parse_request(raw)
    assert request == Request(command, body, SEQ, 1, len(raw))
    # What the server builds from that parse is what the client sent.
    assert candm.build_request(command, request.body, sequence=SEQ, attempt=1) == raw


def test_request_padding_is_zero_and_body_type_is_checked() -> None:
    raw = candm.build_request(Command.SOURCE_DATA, SourceIndex(1), sequence=1)
    assert raw[20:24] == b"\0\0\0\1" and raw[24:] == bytes(len(raw) - 24)
    with pytest.raises(TypeError):
        candm.build_request(Command.SOURCE_DATA, AddressArg(IP4), sequence=1)
    with pytest.raises(ValueError):
        candm.build_request(Command.LOCAL, sequence=1)
    with pytest.raises(ValueError):
        candm.build_request(Command.NULL, sequence=1 << 32)
    with pytest.raises(ValueError):
        candm.build_request(Command.ADD_SOURCE, AddSource(name="x" * 256), sequence=1)
    with pytest.raises(ValueError):
        candm.build_request(Command.BURST, BurstArgs(n_good_samples=1 << 31), sequence=1)


def test_add_source_defaults_are_chronyc_defaults() -> None:
    raw = candm.build_request(Command.ADD_SOURCE, AddSource(name="192.0.2.7"), sequence=1)
    request = candm.parse_request(raw)
    assert isinstance(request, Request)
    body = request.body
    assert isinstance(body, AddSource)
    assert (body.port, body.minpoll, body.maxpoll, body.presend_minpoll) == (123, 6, 10, 100)
    assert (body.max_sources, body.min_samples, body.max_samples) == (4, -1, -1)
    assert body.nts_port == 4460
    assert (body.max_delay, body.max_delay_dev_ratio, body.asymmetry) == (3.0, 10.0, 1.0)
    assert body.flags == AddSourceFlag.ONLINE
    assert body.check() == Status.SUCCESS
    assert not body.pool


def test_add_source_check() -> None:
    raw = bytearray(candm.build_request(Command.ADD_SOURCE, AddSource(name="a"), sequence=1))
    raw[24 : 24 + 256] = b"n" * 256  # no terminating NUL
    request = candm.parse_request(bytes(raw))
    assert isinstance(request, Request) and isinstance(request.body, AddSource)
    assert request.body.check() == Status.INVALIDNAME
    raw[20:24] = struct.pack("!I", 9)  # no such source type
    request = candm.parse_request(bytes(raw))
    assert isinstance(request, Request) and isinstance(request.body, AddSource)
    assert request.body.check() == Status.INVALID
    assert AddSource(name="bad name").check() == Status.INVALIDNAME
    assert AddSource(name="").check() == Status.INVALIDNAME


# ---------------------------------------------------------------------------
# Request validation (chronyd's order and answers)


def _header(command: int, *, version: int = 6, pkt_type: int = 1, res: int = 0) -> bytes:
    return struct.pack("!BBBBHHIII", version, pkt_type, res, 0, command, 0, SEQ, 0, 0)


def _error(data: bytes) -> RequestError:
    result = candm.parse_request(data)
    assert isinstance(result, RequestError), result
    assert isinstance(result, MalformedPacket)
    if result.reply is not None:
        assert len(result.reply) <= len(data)
    return result


def _reply_status(error: RequestError) -> int:
    assert error.reply is not None
    reply = candm.parse_reply(error.reply, SEQ)
    assert reply.reply_code == ReplyCode.NULL and reply.body is None
    assert reply.status == error.status
    return reply.status


@pytest.mark.parametrize("length", [0, 1, 19, 20, 27])
def test_too_short_for_any_answer_is_dropped(length: int) -> None:
    error = _error(candm.build_request(Command.NULL, sequence=SEQ)[:length])
    assert error.reply is None and error.status is None


def test_too_long_is_dropped() -> None:
    raw = candm.build_request(Command.TRACKING, sequence=SEQ)
    assert _error(raw.ljust(861, b"\0")).reply is None
    # ... but anything up to the largest request is fine (chronyd accepts it)
    assert isinstance(candm.parse_request(raw.ljust(860, b"\0")), Request)


def test_short_for_its_command_gets_badpktlength() -> None:
    raw = candm.build_request(Command.TRACKING, sequence=SEQ)
    error = _error(raw[:103])
    assert error.command == Command.TRACKING and error.sequence == SEQ
    assert _reply_status(error) == Status.BADPKTLENGTH
    # an unpadded version-6 request (what a padding-less client would send)
    assert _reply_status(_error(raw[:28])) == Status.BADPKTLENGTH


def test_not_a_request_is_dropped() -> None:
    tail = bytes(84)
    assert _error(_header(Command.TRACKING, pkt_type=2) + tail).reply is None
    assert _error(_header(Command.TRACKING, res=1) + tail).reply is None


def test_versions() -> None:
    tail = bytes(84)
    assert _reply_status(_error(_header(Command.TRACKING, version=5) + tail)) == (
        Status.BADPKTVERSION
    )
    assert _reply_status(_error(_header(Command.TRACKING, version=7) + tail)) == (
        Status.BADPKTVERSION
    )
    assert _error(_header(Command.TRACKING, version=4) + tail).reply is None


@pytest.mark.parametrize("command", [Command.LOCAL, Command.ADD_SERVER3, 72, 0x6FFF, 0xFFFF])
def test_unknown_or_obsolete_commands_get_invalid(command: int) -> None:
    error = _error(_header(command) + bytes(100))
    assert _reply_status(error) == Status.INVALID


@pytest.mark.parametrize(
    "text", [b"{", b"[1]", b'{"args": []}', b'{"command": 1}', b'{"command": "x", "args": 3}',
             b"\xff\xfe"]
)  # fmt: skip
def test_bad_json_query_gets_invalid(text: bytes) -> None:
    body = struct.pack("!IHH", 0, len(text), 0) + text
    raw = (_header(Command.NTSPY_JSON) + body).ljust(860, b"\0")
    assert _reply_status(_error(raw)) == Status.INVALID


def test_json_length_beyond_packet_is_invalid() -> None:
    body = struct.pack("!IHH", 0, 5000, 0)
    raw = (_header(Command.NTSPY_JSON) + body).ljust(860, b"\0")
    assert _reply_status(_error(raw)) == Status.INVALID


# ---------------------------------------------------------------------------
# Replies: server build -> client parse

REPLY_SAMPLES: list[tuple[int, Any]] = [
    (Command.N_SOURCES, NSources(7)),
    (Command.SOURCE_DATA, SourceData(
        IP6, poll=-4, stratum=2, state=candm.SourceState.JITTERY, mode=candm.SourceMode.PEER,
        flags=0, reachability=0o377, since_sample=0xFFFFFFFF,
        orig_latest_meas=wire_round(1.25e-5), latest_meas=wire_round(-3e-6),
        latest_meas_err=wire_round(2e-5))),
    (Command.TRACKING, Tracking(
        0x47505300, None, 1, 0, 1_700_000_000.5, wire_round(1e-6), wire_round(-2e-6),
        wire_round(3e-6), wire_round(-12.5), wire_round(0.01), wire_round(0.2),
        wire_round(1e-3), wire_round(2e-4), 64.0)),
    (Command.SOURCESTATS, SourceStats(
        0xC0000201, IP4, 10, 5, 1000, wire_round(1e-5), wire_round(0.5), wire_round(0.25),
        wire_round(-1e-6), wire_round(2e-6))),
    (Command.RTCREPORT, RtcReport(1_600_000_000.0, 5, 3, 600, wire_round(0.5), wire_round(-3.0))),
    (Command.SETTIME, ManualTimestamp(wire_round(0.5), wire_round(1.5), wire_round(-2.5))),
    (Command.CLIENT_ACCESSES_BY_INDEX3, ClientAccesses(20, 8, tuple(
        ClientAccess(ipaddress.IPv4Address(f"10.0.0.{i}"), i, 2 * i, 3 * i, 4, 5, 6, -1, 2, 127,
                     4, 10, 20, 0xFFFFFFFF)
        for i in range(8)))),
    (Command.CLIENT_ACCESSES_BY_INDEX3, ClientAccesses(3, 3, (ClientAccess(IP6),))),
    (Command.SERVER_STATS, ServerStats(*range(1, 12))),
    (Command.MANUAL_LIST, ManualList(tuple(
        ManualSample(1_700_000_000.0 + i, wire_round(0.5 * i), wire_round(-0.25), 0.0)
        for i in range(3)))),
    (Command.ACTIVITY, Activity(1, 2, 3, 4, 5)),
    (Command.SMOOTHING, Smoothing(True, True, wire_round(0.1), wire_round(0.2), wire_round(0.3),
                                  12.0, 34.0)),
    (Command.NTP_DATA, NtpData(
        IP4, ipaddress.IPv4Address("127.0.0.1"), 123, 1, 4, 4, 1, -6, -20, wire_round(1e-5),
        wire_round(2e-5), 0x47505300, 1_700_000_000.25, wire_round(-1e-6), wire_round(3e-5),
        wire_round(1e-6), wire_round(5e-5), wire_round(0.125), 0b1010101010, True, True, "K",
        "H", 1, 2, 3, 4)),
    (Command.NTP_SOURCE_NAME, NtpSourceName("time.example.net")),
    (Command.AUTH_DATA, AuthData(candm.AuthMode.NTS, 15, 0, 256, 2, 300, 8, 104, True)),
    (Command.SELECT_DATA, SelectData(
        0xC0000201, IP4, "*", True, 0, SelectOption.PREFER | SelectOption.TRUST,
        SelectOption.PREFER, 12, 1.5, wire_round(-1e-4), wire_round(2e-4))),
]  # fmt: skip


def _request(command: int, body: Any = None) -> Request:
    raw = candm.build_request(command, body, sequence=SEQ, attempt=0)
    request = candm.parse_request(raw)
    assert isinstance(request, Request)
    return request


@pytest.mark.parametrize(
    ("command", "body"), REPLY_SAMPLES, ids=[type(b).__name__ for _, b in REPLY_SAMPLES]
)
def test_every_reply_round_trips(command: int, body: Any) -> None:
    request = _request(command)
    raw = candm.build_reply(request, Status.SUCCESS, body)
    assert len(raw) == candm.reply_length(candm.expected_reply(command) or 0)
    assert len(raw) <= request.length
    reply = candm.parse_reply(raw, SEQ, command)
    assert reply == Reply(command, candm.expected_reply(command) or 0, Status.SUCCESS, SEQ, body)
    assert reply.ok


def test_every_reply_class_is_covered() -> None:
    covered = {type(body) for _, body in REPLY_SAMPLES} | {JsonChunk}
    assert covered == set(candm._REPLY_CLASSES.values())


def test_reply_header_layout() -> None:
    raw = candm.build_reply(_request(Command.ACTIVITY), Status.SUCCESS, Activity(1, 2, 3, 4, 5))
    assert raw[:28] == struct.pack(
        "!BBBBHHHHHHIII", 6, 2, 0, 0, Command.ACTIVITY, ReplyCode.ACTIVITY, 0, 0, 0, 0, SEQ, 0, 0
    )
    assert raw[28:] == struct.pack("!5i", 1, 2, 3, 4, 5)


def test_ntp_data_reserved_words_are_all_ones() -> None:
    raw = candm.build_reply(_request(Command.NTP_DATA), Status.SUCCESS, NtpData(IP4))
    assert raw[-12:] == b"\xff" * 12


def test_status_replies() -> None:
    request = _request(Command.SOURCE_DATA, SourceIndex(9))
    raw = candm.build_reply(request, Status.NOSUCHSOURCE)
    assert len(raw) == 28
    reply = candm.parse_reply(raw, SEQ)
    assert (reply.status, reply.reply_code, reply.body, reply.ok) == (
        Status.NOSUCHSOURCE, ReplyCode.NULL, None, False,
    )  # fmt: skip
    assert candm.status_text(reply.status) == "503 No such source"
    assert candm.status_text(99) == "520 Got unexpected error from daemon"
    ok = candm.parse_reply(candm.build_reply(_request(Command.BURST)), SEQ)
    assert (ok.status, ok.reply_code) == (Status.SUCCESS, ReplyCode.NULL)


def test_reply_body_must_fit_the_command() -> None:
    request = _request(Command.TRACKING)
    with pytest.raises(ValueError):
        candm.build_reply(request, Status.SUCCESS, Activity())
    with pytest.raises(ValueError):
        candm.build_reply(request, Status.FAILED, Tracking())
    with pytest.raises(ValueError):
        too_many = ClientAccesses(9, 9, tuple(ClientAccess() for _ in range(9)))
        candm.build_reply(_request(Command.CLIENT_ACCESSES_BY_INDEX3), Status.SUCCESS, too_many)


def test_reply_never_longer_than_request() -> None:
    short = Request(Command.TRACKING, NoArgs(), SEQ, 0, length=60)
    assert not candm.reply_fits(short, ReplyCode.TRACKING)
    assert candm.reply_fits(short, ReplyCode.NULL)
    with pytest.raises(ReplyTooLong):
        candm.build_reply(short, Status.SUCCESS, Tracking())
    assert len(candm.build_reply(short, Status.FAILED)) == 28


def test_parse_reply_rejects_what_chronyc_ignores() -> None:
    good = candm.build_reply(_request(Command.TRACKING), Status.SUCCESS, Tracking())
    with pytest.raises(ReplyError):
        candm.parse_reply(good, SEQ + 1)
    with pytest.raises(ReplyError):
        candm.parse_reply(good, SEQ, Command.ACTIVITY)
    with pytest.raises(ReplyError):
        candm.parse_reply(good[:103], SEQ)
    with pytest.raises(ReplyError):
        candm.parse_reply(good[:27], SEQ)
    for offset, value in ((0, 5), (1, 1), (2, 1), (3, 1)):
        bad = bytearray(good)
        bad[offset] = value
        with pytest.raises(ReplyError):
            candm.parse_reply(bytes(bad), SEQ)
    # A version-5 server's "version mismatch" is understood.
    old = bytearray(candm.build_reply(_request(Command.TRACKING), Status.BADPKTVERSION))
    old[0] = 5
    assert candm.parse_reply(bytes(old), SEQ).status == Status.BADPKTVERSION
    # Unknown reply codes decode to no body (chronyc then says "508 Bad reply").
    odd = bytearray(good)
    odd[6:8] = struct.pack("!H", 99)
    assert candm.parse_reply(bytes(odd), SEQ).body is None


# ---------------------------------------------------------------------------
# Permissions

OPEN = {
    Command.NULL, Command.LOGON, Command.N_SOURCES, Command.SOURCE_DATA, Command.TRACKING,
    Command.SOURCESTATS, Command.RTCREPORT, Command.MANUAL_LIST, Command.ACTIVITY,
    Command.SMOOTHING, Command.NTP_SOURCE_NAME,
}  # fmt: skip


def test_permissions_follow_chrony_43() -> None:
    for command in range(72):
        assert candm.is_monitoring(command) == (command in OPEN), Command(command).name
        assert candm.is_allowed(command, unix_socket=True)
        assert candm.is_allowed(command, unix_socket=False) == (command in OPEN)
    for command in (Command.NTSPY_JSON, 72, 0xFFFF, -1):
        assert candm.permission(command) == Permission.AUTH
        assert not candm.is_monitoring(command)
    for command in (Command.SERVER_STATS, Command.NTP_DATA, Command.AUTH_DATA,
                    Command.SELECT_DATA, Command.CLIENT_ACCESSES_BY_INDEX3):  # fmt: skip
        assert candm.is_read_only(command) and not candm.is_monitoring(command)
    for command in (Command.BURST, Command.ADD_SOURCE, Command.SHUTDOWN, Command.MAKESTEP):
        assert not candm.is_read_only(command)


# ---------------------------------------------------------------------------
# ntspy's JSON extension


def _json_server(document: bytes) -> Any:
    def serve(raw: bytes) -> bytes:
        request = candm.parse_request(raw)
        assert isinstance(request, Request) and isinstance(request.body, JsonQuery)
        reply = candm.build_json_reply(request, document)
        assert len(reply) <= len(raw)
        return reply

    return serve


def test_json_codes_are_outside_chrony() -> None:
    assert Command.NTSPY_JSON > 1000 and ReplyCode.NTSPY_JSON > 1000
    assert candm.expected_reply(Command.NTSPY_JSON) == ReplyCode.NTSPY_JSON


@pytest.mark.parametrize("size", [0, 1, candm.NTSPY_JSON_MAX_CHUNK, 5000])
def test_json_pager_assembles_a_document(size: int) -> None:
    result = {"keys": ["k" * 10] * (size // 13 + 1), "n": size}
    document = json.dumps(result).encode()
    serve = _json_server(document)
    pager = JsonPager("serverkeys", ["--json"])
    sequence = 100
    while not pager.done:
        sequence += 1
        pager.feed(serve(pager.next_request(sequence)))
    assert pager.result() == result
    assert pager.document() == document
    assert pager.requests_sent == max(1, math.ceil(len(document) / candm.NTSPY_JSON_MAX_CHUNK))
    with pytest.raises(RuntimeError):
        pager.next_request(1)


def test_json_pager_ignores_foreign_datagrams_and_restarts_on_change() -> None:
    first = json.dumps({"v": 1, "pad": "x" * 2000}).encode()
    second = json.dumps({"v": 2, "pad": "y" * 2100}).encode()
    pager = JsonPager("status")
    raw = pager.next_request(1)
    with pytest.raises(ReplyError):
        pager.feed(_json_server(first)(candm.build_request(
            Command.NTSPY_JSON, JsonQuery("status"), sequence=2)))  # fmt: skip
    pager.feed(_json_server(first)(raw))
    assert 0 < pager.offset < len(first)
    # The document changes between pages: the pager starts over...
    assert not pager.feed(_json_server(second)(pager.next_request(3)))
    assert pager.offset == 0 and pager.restarts == 1
    seq = 3
    while not pager.done:
        seq += 1
        pager.feed(_json_server(second)(pager.next_request(seq)))
    assert pager.result()["v"] == 2


def test_json_pager_gives_up_on_a_document_that_keeps_changing() -> None:
    pager = JsonPager("status", max_restarts=1)
    docs = [json.dumps({"n": i, "pad": "z" * 1000}).encode() for i in range(5)]
    with pytest.raises(CandmError):
        for i, doc in enumerate(docs):
            pager.feed(_json_server(doc)(pager.next_request(i + 1)))


def test_json_pager_reports_refusal_and_bad_crc() -> None:
    pager = JsonPager("serverkeys")
    request = candm.parse_request(pager.next_request(5))
    assert isinstance(request, Request)
    with pytest.raises(CommandFailed) as info:
        pager.feed(candm.build_reply(request, Status.UNAUTH))
    assert info.value.status == Status.UNAUTH and "501" in str(info.value)
    pager = JsonPager("x", max_restarts=0)
    request = candm.parse_request(pager.next_request(6))
    assert isinstance(request, Request)
    bad = candm.build_reply(request, Status.SUCCESS, JsonChunk(2, 0, 12345, b"{}"))
    with pytest.raises(CandmError):
        pager.feed(bad)


def test_json_query_limits() -> None:
    with pytest.raises(ValueError):
        JsonPager("x", ["y" * 1000])
    query = JsonQuery("é", ("ü",), 7)
    raw = candm.build_request(Command.NTSPY_JSON, query, sequence=1)
    parsed = candm.parse_request(raw)
    assert isinstance(parsed, Request) and parsed.body == query
    with pytest.raises(ValueError):
        JsonChunk(0, 0, 0, bytes(candm.NTSPY_JSON_MAX_CHUNK + 1)).pack()


# ---------------------------------------------------------------------------
# Fuzz: nothing but the declared errors


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=1000))
def test_fuzz_parse_request_random_bytes(data: bytes) -> None:
    result = candm.parse_request(data)
    assert isinstance(result, Request | RequestError)
    if isinstance(result, RequestError) and result.reply is not None:
        assert len(result.reply) <= len(data)


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from([*SERVED, 72, 0x7001]),
    st.integers(min_value=4, max_value=7),
    st.binary(max_size=900),
)
def test_fuzz_parse_request_valid_headers(command: int, version: int, tail: bytes) -> None:
    data = struct.pack("!BBBBHHIII", version, 1, 0, 0, command, 0, SEQ, 0, 0) + tail
    result = candm.parse_request(data)
    assert isinstance(result, Request | RequestError)
    if isinstance(result, Request):
        assert len(data) >= candm.request_length(command)
        # Whatever parsed can be answered without breaking the length rule.
        reply = candm.build_reply(result, Status.FAILED)
        assert len(reply) <= len(data)


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=700))
def test_fuzz_parse_reply_random_bytes(data: bytes) -> None:
    with contextlib.suppress(ReplyError):
        candm.parse_reply(data, SEQ)


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from([*sorted(ReplyCode), 0, 99]),
    st.integers(min_value=0, max_value=25),
    st.binary(max_size=700),
)
def test_fuzz_parse_reply_valid_headers(code: int, status: int, tail: bytes) -> None:
    data = struct.pack("!BBBBHHHHHHIII", 6, 2, 0, 0, 33, code, status, 0, 0, 0, SEQ, 0, 0) + tail
    try:
        reply = candm.parse_reply(data, SEQ)
    except ReplyError:
        return
    assert reply.reply_code == code


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=900))
def test_fuzz_json_pager_feed(data: bytes) -> None:
    pager = JsonPager("x")
    pager.next_request(SEQ)
    with contextlib.suppress(CandmError):
        pager.feed(data)
