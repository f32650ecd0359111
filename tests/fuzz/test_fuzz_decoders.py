"""Fuzzing every decoder that sees bytes from the network or the disk.

The rule (h11's): whatever the input, the only exceptions that may escape are
:class:`ntspy.errors.NtsError` subclasses, and the server's request handler
raises nothing at all. Inputs are random bytes and mutations of real packets
and files, so the fuzzing gets past the first length check.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ntspy.errors import NtsError
from ntspy.proto import nts
from ntspy.proto.aead import Aead, AeadId
from ntspy.proto.cookies import CookieKeys, KeyRing, MasterKey
from ntspy.proto.ntp import (
    HEADER_LEN,
    Mode,
    NtpHeader,
    NtpPacket,
    SyncState,
    iter_efs,
    unix_ns_to_ntp,
)
from ntspy.server.keys import KEY_FILE_NAME, STATE_KIND, STATE_VERSION, KeyStore
from ntspy.server.responder import Responder
from ntspy.server.stats import StatsTable
from ntspy.state import b64, decode_state, encode_state

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
NOW_NS = 1_800_000_000 * 10**9
NOW_S = NOW_NS // 10**9
UID = bytes(range(32))
XMT = 0x0123456789ABCDEF

# One server key ring and one client session, shared by every example.
RING = KeyRing([MasterKey(7, os.urandom(32), NOW_S)])
AEAD_ID = AeadId.AES_SIV_CMAC_256
C2S = Aead(AEAD_ID, os.urandom(32))
S2C = Aead(AEAD_ID, os.urandom(32))
KEYS = CookieKeys(AEAD_ID, C2S.key, S2C.key)


def cookie() -> bytes:
    return RING.seal(KEYS, os.urandom(16))


def real_request(placeholders: int = 2) -> bytes:
    header = NtpHeader(mode=Mode.CLIENT, poll=6, transmit_ts=XMT)
    return nts.build_request(header, UID, cookie(), placeholders, C2S, os.urandom(16))


def real_response() -> bytes:
    header = NtpHeader(
        mode=Mode.SERVER, stratum=1, origin_ts=XMT,
        receive_ts=unix_ns_to_ntp(NOW_NS), transmit_ts=unix_ns_to_ntp(NOW_NS),
    )
    return nts.build_response(header, UID, [cookie(), cookie()], S2C, os.urandom(16))


REQUEST = real_request()
RESPONSE = real_response()
PLAIN_REQUEST = NtpHeader(mode=Mode.CLIENT, transmit_ts=XMT).pack()


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few random edits: flips, overwrites, cuts, insertions."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "truncate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "set" and data:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos:pos + len(chunk)] = chunk
        elif op == "cut":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        else:
            del data[pos:]
    return bytes(data)


def packets(base: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=1200), mutated(base))


# --- NTP codec -------------------------------------------------------------------


@FUZZ
@given(packets(RESPONSE))
def test_header_and_packet_parsers(data: bytes) -> None:
    try:
        header = NtpHeader.unpack(data)
    except NtsError:
        assert len(data) < HEADER_LEN
        return
    assert header.pack() == bytes(data[:HEADER_LEN])
    try:
        packet = NtpPacket.parse(data)
    except NtsError:
        return
    assert packet.header == header


@FUZZ
@given(packets(RESPONSE), st.integers(0, 64))
def test_iter_efs(data: bytes, start: int) -> None:
    try:
        efs = list(iter_efs(data, start))
    except NtsError:
        return
    for ef in efs:
        assert data[ef.offset + 4:ef.offset + 4 + len(ef.body)] == ef.body


# --- client: response verification -------------------------------------------------


@FUZZ
@given(packets(RESPONSE))
def test_verify_response_accepts_nothing_but_the_original(data: bytes) -> None:
    try:
        verified = nts.verify_response(data, UID, XMT, S2C)
    except NtsError:
        return
    # Anything that verifies is byte for byte what the server sent.
    assert data == RESPONSE
    assert len(verified.cookies) == 2


def test_the_real_response_verifies() -> None:
    # Without this the property above would hold for a verifier that rejects everything.
    assert len(nts.verify_response(RESPONSE, UID, XMT, S2C).cookies) == 2


# --- server: request parsing and the responder ----------------------------------------


def responder() -> tuple[Responder, StatsTable]:
    table = StatsTable()
    r = Responder(RING, table.row(), os.urandom)
    r.state = SyncState.local(1, unix_ns_to_ntp(NOW_NS))
    return r, table


RESPONDER, TABLE = responder()
COUNTED = ("ntp_received", "ntp_malformed", "ntp_denied", "ntp_dropped")


def check_handle(data: bytes) -> bytes | None:
    """The responder raises nothing, never amplifies, and counts the packet once."""
    before = TABLE.totals()
    out = RESPONDER.handle(data, "127.0.0.1", NOW_NS, lambda: NOW_NS)
    after = TABLE.totals()
    assert out is None or isinstance(out, bytes)
    if out is not None:
        assert len(out) <= len(data)
    assert sum(after[n] - before[n] for n in COUNTED) == 1, {
        n: after[n] - before[n] for n in COUNTED
    }
    return out


SHORT_UID = nts.build_request(NtpHeader(mode=Mode.CLIENT, transmit_ts=XMT), UID[:16], cookie(), 0,
                              C2S, bytes(16))


@FUZZ
@given(st.one_of(packets(REQUEST), packets(PLAIN_REQUEST)))
@example(SHORT_UID)  # an NTS request that fails parse_request: counted once, as malformed
def test_parse_request_and_handle(data: bytes) -> None:
    try:
        packet = NtpPacket.parse(data)
        nts.parse_request(data, packet.header, packet.extensions)
    except NtsError:
        pass
    check_handle(data)


def test_the_real_requests_are_answered() -> None:
    out = check_handle(real_request())
    assert out is not None
    assert len(nts.verify_response(out, UID, XMT, S2C).cookies) == 3
    assert check_handle(PLAIN_REQUEST) is not None


# --- server: cookies -----------------------------------------------------------------


@FUZZ
@given(st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: (7).to_bytes(4, "big") + b),  # a known key id
    mutated(cookie()),
))
def test_keyring_open(data: bytes) -> None:
    try:
        keys = RING.open(data)
    except NtsError:
        return
    assert keys == KEYS  # only a real cookie opens (the base of the mutations)


# --- state files ---------------------------------------------------------------------


def key_file(keys: list[dict[str, Any]]) -> bytes:
    return encode_state(STATE_KIND, STATE_VERSION, {"kept": 3, "keys": keys})


def raw_key_file(body: bytes) -> bytes:
    """A key file around ``body`` as is, with a correct checksum."""
    signed = b"ntspy-state 1 %s %d\n%s\n" % (STATE_KIND.encode(), STATE_VERSION, body)
    return signed + b"sha256 %s\n" % hashlib.sha256(signed).hexdigest().encode()


GOOD_KEY_FILE = key_file([{"id": 1, "key": b64(bytes(32)), "created": NOW_S}])

scalars = (
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
key_entries = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.integers(-1, 2**33), st.sampled_from([1, 2]), json_values),
        "key": st.one_of(st.just(b64(bytes(32))), st.binary(max_size=40).map(b64), json_values),
        "created": st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                              json_values),
    },
)
# Files with a good checksum but odd content: what a buggy or hostile writer leaves.
well_formed_key_files = st.one_of(
    st.lists(key_entries, max_size=4).map(key_file),
    json_values.map(lambda keys: encode_state(STATE_KIND, STATE_VERSION, {"keys": keys})),
)
# (JSON that only a hand-written file holds, like 1e400 reading back as infinity, is
# among the explicit examples below.)
state_files = st.one_of(
    st.binary(max_size=300), mutated(GOOD_KEY_FILE), well_formed_key_files
)


@FUZZ
@given(state_files)
def test_decode_state(data: bytes) -> None:
    try:
        payload = decode_state(data, STATE_KIND, STATE_VERSION)
    except NtsError:
        return
    assert isinstance(payload, dict)
    json.dumps(payload)


def entry(key_id: object, created: object = NOW_S, key: object = None) -> dict[str, Any]:
    return {"id": key_id, "key": b64(bytes(32)) if key is None else key, "created": created}


@settings(max_examples=200, deadline=None)
@given(state_files)
@example(raw_key_file(b'{"keys":[{"created":1e400,"id":1,"key":"%s"}]}' % b64(bytes(32)).encode()))
@example(key_file([entry(1), entry(1)]))  # duplicate key ids
@example(key_file([entry(1, key="not base64!")]))
@example(key_file([entry(0, created=0), entry(1, created=0)]))  # same second: order kept
def test_key_store_survives_any_key_file(data: bytes) -> None:
    """Loading never raises; a file it cannot use is kept aside intact and replaced."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / KEY_FILE_NAME
        path.write_bytes(data)
        path.chmod(0o600)
        store = KeyStore(Path(tmp), 3600)
        ring = store.load(NOW_S)
        assert ring.keys, "the server must always end up with a key"
        aside = sorted(Path(tmp).glob(KEY_FILE_NAME + ".corrupt-*"))
        kept = [p.read_bytes() for p in aside]
        assert len(aside) <= 1
        if kept:
            assert kept == [data]  # the bad file, byte for byte
        else:
            # Not kept aside, so it was a sound key file (a damaged one is never overwritten).
            decode_state(data, STATE_KIND, STATE_VERSION)
        # What is on disk now loads cleanly in a fresh store, with the same keys.
        again = KeyStore(Path(tmp), 3600).load(NOW_S)
        assert [k.key_id for k in again.keys] == [k.key_id for k in ring.keys]
        sealed = ring.seal(KEYS, bytes(16))
        assert again.open(sealed) == KEYS


def test_key_store_keeps_a_good_file() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / KEY_FILE_NAME
        path.write_bytes(GOOD_KEY_FILE)
        ring = KeyStore(Path(tmp), 0).load(NOW_S)
        assert [k.key_id for k in ring.keys] == [1]
        assert not list(Path(tmp).glob("*.corrupt-*"))

