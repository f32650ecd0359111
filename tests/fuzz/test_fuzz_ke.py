"""Hostile input to the NTS-KE codec raises only NtsError subclasses."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from ntspy.errors import KeProtocolError, KeServerError, NtsError
from ntspy.proto.ke import (
    MAX_MESSAGE_SIZE,
    Record,
    RecordReader,
    RecordType,
    build_client_request,
    parse_client_request,
    parse_records,
    parse_server_response,
)

FUZZ = settings(max_examples=300, deadline=None)

# Mostly the types the parsers know, so the generated messages get past framing
# and exercise the per-record checks, plus some unknown types.
record_types = st.one_of(
    st.sampled_from([int(t) for t in RecordType]),
    st.integers(min_value=0, max_value=0x7FFF),
)
bodies = st.one_of(
    st.sampled_from([b"", b"\x00\x00", b"\x00\x0f", b"\x00\x1e", b"\x00\x0f\x00\x1e", b"\x00"]),
    st.binary(max_size=40),
)
records = st.builds(Record, critical=st.booleans(), type=record_types, body=bodies)
END = Record(critical=True, type=RecordType.END_OF_MESSAGE, body=b"")
messages = st.one_of(
    st.lists(records, max_size=12).map(lambda rs: [*rs, END]),
    st.lists(records, max_size=12),
)


@FUZZ
@given(st.binary(max_size=300))
def test_parse_records_random_bytes(data: bytes) -> None:
    try:
        parsed = parse_records(data)
    except NtsError:
        return
    # Whatever parses re-encodes to exactly the input.
    assert b"".join(r.encode() for r in parsed) == data
    assert parsed[-1].type == RecordType.END_OF_MESSAGE


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(min_value=1, max_value=20), max_size=30))
def test_reader_random_bytes_random_chunking(data: bytes, cuts: list[int]) -> None:
    reader = RecordReader()
    pos = 0
    got: list[Record] = []
    try:
        for size in [*cuts, len(data)]:
            got += reader.feed(data[pos : pos + size])
            pos += size
    except NtsError:
        return
    total = sum(4 + len(r.body) for r in got)
    assert total <= MAX_MESSAGE_SIZE
    assert reader.done == bool(got and got[-1].type == RecordType.END_OF_MESSAGE)


@FUZZ
@given(st.lists(records.filter(lambda r: r.type != RecordType.END_OF_MESSAGE), max_size=12))
def test_record_sequences_round_trip(rs: list[Record]) -> None:
    wire = b"".join(r.encode() for r in rs) + END.encode()
    assert parse_records(wire) == [*rs, END]


@FUZZ
@given(messages)
def test_parse_client_request_random_records(rs: list[Record]) -> None:
    try:
        request = parse_client_request(rs)
    except KeProtocolError as exc:
        assert exc.code in (0, 1)
        return
    assert request.next_protocols


@FUZZ
@given(messages, st.lists(st.sampled_from([15, 16, 17, 30]), min_size=1, max_size=4))
def test_parse_server_response_random_records(rs: list[Record], offered: list[int]) -> None:
    try:
        response = parse_server_response(rs, offered)
    except (KeProtocolError, KeServerError):
        return
    assert response.aead in offered
    assert response.cookies


@FUZZ
@given(
    st.lists(st.integers(min_value=0, max_value=0xFFFF), min_size=1, max_size=10),
    st.integers(min_value=0, max_value=11),
    st.binary(min_size=1, max_size=3),
)
def test_mutated_client_request(aeads: list[int], at: int, junk: bytes) -> None:
    """A real request with bytes overwritten still parses or fails cleanly."""
    wire = bytearray(build_client_request(aeads))
    at %= len(wire)
    wire[at : at + len(junk)] = junk
    with contextlib.suppress(NtsError):
        parse_client_request(parse_records(bytes(wire)))
