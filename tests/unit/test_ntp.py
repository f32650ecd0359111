"""NTPv4 header, timestamps and extension fields."""

from __future__ import annotations

import datetime as dt
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntspy.errors import MalformedPacket
from ntspy.proto.ntp import (
    HEADER_LEN,
    NTP_UNIX_OFFSET,
    ExtensionField,
    Leap,
    Mode,
    NtpHeader,
    NtpPacket,
    encode_ef,
    iter_efs,
    ntp_to_unix_ns,
    offset_delay_ns,
    seconds_to_short,
    short_to_seconds,
    unix_ns_to_ntp,
)

NS = 1_000_000_000


def unix_ns(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp()) * NS


def test_unix_epoch_is_ntp_2208988800() -> None:
    assert unix_ns_to_ntp(0) == NTP_UNIX_OFFSET << 32


def test_half_second_fraction() -> None:
    assert unix_ns_to_ntp(NS // 2) & 0xFFFFFFFF == 1 << 31


def test_era_wrap_2036() -> None:
    # 2036-02-07 06:28:16 UTC is NTP second 2**32, which wraps to 0 on the wire.
    wrap = unix_ns(2036, 2, 7, 6, 28, 16)
    assert unix_ns_to_ntp(wrap) >> 32 == 0
    # A timestamp just after the wrap, read with a pivot just before it, lands after it.
    after = wrap + 10 * NS
    assert ntp_to_unix_ns(unix_ns_to_ntp(after), wrap - 3600 * NS) == after
    before = wrap - 10 * NS
    assert ntp_to_unix_ns(unix_ns_to_ntp(before), wrap + 3600 * NS) == before


@given(st.integers(min_value=unix_ns(1970, 1, 1), max_value=unix_ns(2100, 1, 1)),
       st.integers(min_value=-60 * 365 * 86400, max_value=60 * 365 * 86400))
@settings(max_examples=300, deadline=None)
def test_timestamp_round_trip_within_a_nanosecond(t: int, pivot_shift_s: int) -> None:
    back = ntp_to_unix_ns(unix_ns_to_ntp(t), t + pivot_shift_s * NS)
    assert abs(back - t) <= 1


def test_offset_and_delay_follow_rfc5905() -> None:
    # Server 5 ms ahead, 10 ms each way, 1 ms processing.
    t1 = 1_000 * NS
    t2 = t1 + 10_000_000 + 5_000_000
    t3 = t2 + 1_000_000
    t4 = t1 + 21_000_000
    offset, delay = offset_delay_ns(t1, t2, t3, t4)
    assert offset == 5_000_000
    assert delay == 20_000_000


def test_header_round_trip_every_field() -> None:
    h = NtpHeader(leap=Leap.INSERT_SECOND, version=4, mode=Mode.SERVER, stratum=2, poll=-3,
                  precision=-24, root_delay=0x12345, root_dispersion=0x6789, reference_id=b"GPS\0",
                  reference_ts=1, origin_ts=2, receive_ts=3, transmit_ts=(1 << 64) - 1)
    raw = h.pack()
    assert len(raw) == HEADER_LEN
    assert raw[0] == (1 << 6) | (4 << 3) | 4
    assert NtpHeader.unpack(raw) == h


def test_short_format() -> None:
    assert short_to_seconds(seconds_to_short(0.0153)) == pytest.approx(0.0153, abs=1 / 65536)
    assert seconds_to_short(-1) == 0
    assert seconds_to_short(1e9) == 0xFFFFFFFF


def test_kiss_code() -> None:
    h = NtpHeader(mode=Mode.SERVER, stratum=0, reference_id=b"RATE")
    assert h.kiss_code == "RATE"
    assert NtpHeader(mode=Mode.SERVER, stratum=1, reference_id=b"GPS\0").kiss_code is None


def test_short_packet_is_malformed() -> None:
    with pytest.raises(MalformedPacket):
        NtpHeader.unpack(bytes(47))


def test_ef_padding_and_minimum_length() -> None:
    assert encode_ef(0x1234, b"") == struct.pack("!HH", 0x1234, 16) + bytes(12)
    raw = encode_ef(0x0104, bytes(range(33)))
    assert len(raw) == 40 and len(raw) % 4 == 0
    (ef,) = iter_efs(bytes(48) + raw)
    assert ef.type == 0x0104 and ef.body[:33] == bytes(range(33)) and ef.offset == 48


@pytest.mark.parametrize("tail", [
    struct.pack("!HH", 0x0104, 40) + bytes(28),   # claims more than is there
    struct.pack("!HH", 0x0104, 18) + bytes(14),   # not a multiple of 4
    struct.pack("!HH", 0x0104, 8) + bytes(12),    # shorter than 16
    struct.pack("!HH", 0x0104, 16) + bytes(12) + bytes(12),  # 12 stray bytes
])
def test_bad_extension_fields_raise_malformed(tail: bytes) -> None:
    with pytest.raises(MalformedPacket):
        list(iter_efs(bytes(48) + tail))


def test_legacy_mac_is_not_an_extension_field() -> None:
    assert list(iter_efs(bytes(48) + bytes(20))) == []
    assert list(iter_efs(bytes(48) + bytes(24))) == []


def test_packet_round_trip() -> None:
    fields = [ExtensionField(0x0104, bytes(32)), ExtensionField(0x0204, bytes(100))]
    parsed = NtpPacket.parse(NtpPacket(NtpHeader(), fields).pack())
    assert [(e.type, e.body) for e in parsed.extensions] == [(f.type, f.body) for f in fields]


@given(st.integers(-2**70, 2**70))
def test_unix_ns_to_ntp_is_seconds_and_fraction_folded_to_the_era(ns: int) -> None:
    # the one-expression form against the definition: seconds since 1900 modulo
    # 2**32, then the nanoseconds as a binary fraction, floored
    seconds, nanos = divmod(ns, 10**9)
    assert unix_ns_to_ntp(ns) == ((seconds + 2_208_988_800) % 2**32) << 32 | (nanos << 32) // 10**9
