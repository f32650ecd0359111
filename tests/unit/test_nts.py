"""NTS extension fields: a full client/server exchange in memory, and every rejection."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntspy.errors import AuthenticationFailure, KissOfDeath, MalformedPacket, NtsNakReceived
from ntspy.proto.aead import Aead, AeadId
from ntspy.proto.cookies import CookieKeys, KeyRing, MasterKey, cookie_length
from ntspy.proto.ntp import Mode, NtpHeader, NtpPacket, encode_ef
from ntspy.proto.nts import (
    EfType,
    ResponsePlan,
    authenticate_request,
    build_nak,
    build_request,
    build_response,
    cookies_that_fit,
    encode_authenticator,
    parse_request,
    response_cookie_count,
    verify_response,
)

AEAD = AeadId.AES_SIV_CMAC_256
C2S = Aead(AEAD, bytes(range(32)))
S2C = Aead(AEAD, bytes(range(32, 64)))
XMT = 0x1234_5678_9ABC_DEF0


def ring() -> KeyRing:
    return KeyRing([MasterKey(7, os.urandom(32), 0)])


def client_request(cookie: bytes, placeholders: int = 7, uid: bytes = b"u" * 32) -> bytes:
    return build_request(NtpHeader(mode=Mode.CLIENT, transmit_ts=XMT), uid, cookie,
                         placeholders, C2S, os.urandom(16))


def serve(request: bytes, keyring: KeyRing) -> bytes:
    """What an NTS server does with a request (the server module wraps exactly this)."""
    pkt = NtpPacket.parse(request)
    req = parse_request(request, pkt.header, pkt.extensions)
    keys = keyring.open(req.cookie)
    c2s, s2c = Aead(keys.aead_id, keys.c2s), Aead(keys.aead_id, keys.s2c)
    authenticate_request(request, req, c2s)
    n = response_cookie_count(req, len(request), cookie_length(keys.aead_id), 16)
    cookies = [keyring.seal(keys, os.urandom(16)) for _ in range(n)]
    header = NtpHeader(mode=Mode.SERVER, stratum=1, origin_ts=req.header.transmit_ts,
                       reference_id=b"GPS\0")
    return build_response(header, req.unique_id, cookies, s2c, os.urandom(16))


def test_full_exchange_refills_eight_cookies_without_growing() -> None:
    kr = ring()
    cookie = kr.seal(CookieKeys(AEAD, C2S.key, S2C.key), os.urandom(16))
    assert len(cookie) == cookie_length(AEAD) == 104
    request = client_request(cookie)
    response = serve(request, kr)
    assert len(response) <= len(request)
    verified = verify_response(response, b"u" * 32, XMT, S2C)
    assert verified.header.stratum == 1
    assert len(verified.cookies) == 8
    assert len(set(verified.cookies)) == 8 and cookie not in verified.cookies
    # Each new cookie opens to the same keys.
    assert all(kr.open(c) == CookieKeys(AEAD, C2S.key, S2C.key) for c in verified.cookies)


def test_response_never_larger_than_request_for_any_placeholder_count() -> None:
    kr = ring()
    cookie = kr.seal(CookieKeys(AEAD, C2S.key, S2C.key), os.urandom(16))
    for placeholders in range(0, 12):
        request = client_request(cookie, placeholders)
        response = serve(request, kr)
        assert len(response) <= len(request)
        got = verify_response(response, b"u" * 32, XMT, S2C).cookies
        assert len(got) == min(1 + placeholders, 8)


def test_every_flipped_byte_of_a_response_is_rejected() -> None:
    kr = ring()
    cookie = kr.seal(CookieKeys(AEAD, C2S.key, S2C.key), os.urandom(16))
    response = serve(client_request(cookie, 1), kr)
    accepted = 0
    for i in range(len(response)):
        tampered = bytearray(response)
        tampered[i] ^= 0x01
        try:
            verify_response(bytes(tampered), b"u" * 32, XMT, S2C)
        except (AuthenticationFailure, MalformedPacket, NtsNakReceived, KissOfDeath):
            continue
        accepted += 1
    assert accepted == 0


def test_wrong_uid_wrong_origin_wrong_key_rejected() -> None:
    kr = ring()
    cookie = kr.seal(CookieKeys(AEAD, C2S.key, S2C.key), os.urandom(16))
    response = serve(client_request(cookie), kr)
    with pytest.raises(AuthenticationFailure, match="unique identifier"):
        verify_response(response, b"v" * 32, XMT, S2C)
    with pytest.raises(AuthenticationFailure, match="origin"):
        verify_response(response, b"u" * 32, XMT + 1, S2C)
    with pytest.raises(AuthenticationFailure):
        verify_response(response, b"u" * 32, XMT, C2S)


def test_unauthenticated_response_is_rejected() -> None:
    plain = NtpHeader(mode=Mode.SERVER, stratum=1, origin_ts=XMT).pack()
    with pytest.raises(MalformedPacket):
        verify_response(plain, b"u" * 32, XMT, S2C)
    with_uid = plain + encode_ef(EfType.UNIQUE_IDENTIFIER, b"u" * 32)
    with pytest.raises(AuthenticationFailure, match="no NTS authenticator"):
        verify_response(with_uid, b"u" * 32, XMT, S2C)


def test_cookies_outside_the_encrypted_part_are_never_taken() -> None:
    kr = ring()
    cookie = kr.seal(CookieKeys(AEAD, C2S.key, S2C.key), os.urandom(16))
    response = serve(client_request(cookie, 0), kr)
    pkt = NtpPacket.parse(response)
    # Insert a cleartext cookie before the authenticator: the AEAD covers it, so it fails.
    auth_at = pkt.extensions[-1].offset
    injected = response[:auth_at] + encode_ef(EfType.NTS_COOKIE, b"x" * 100) + response[auth_at:]
    with pytest.raises(AuthenticationFailure):
        verify_response(injected, b"u" * 32, XMT, S2C)
    # Append one after the authenticator: refused outright.
    appended = response + encode_ef(EfType.NTS_COOKIE, b"x" * 100)
    with pytest.raises(MalformedPacket):
        verify_response(appended, b"u" * 32, XMT, S2C)


def test_nak_with_our_uid_is_reported_and_forged_nak_is_not() -> None:
    header = NtpHeader(mode=Mode.SERVER, origin_ts=XMT)
    nak = build_nak(header, b"u" * 32)
    with pytest.raises(NtsNakReceived):
        verify_response(nak, b"u" * 32, XMT, S2C)
    with pytest.raises(AuthenticationFailure):
        verify_response(nak, b"z" * 32, XMT, S2C)


def test_unauthenticated_rate_kiss_is_not_obeyed() -> None:
    kod = NtpHeader(mode=Mode.SERVER, stratum=0, reference_id=b"RATE", origin_ts=XMT).pack()
    kod += encode_ef(EfType.UNIQUE_IDENTIFIER, b"u" * 32)
    with pytest.raises(AuthenticationFailure):
        verify_response(kod, b"u" * 32, XMT, S2C)


def test_authenticated_rate_kiss_is_reported() -> None:
    header = NtpHeader(mode=Mode.SERVER, stratum=0, reference_id=b"RATE", origin_ts=XMT)
    kod = build_response(header, b"u" * 32, [], S2C, os.urandom(16))
    with pytest.raises(KissOfDeath) as info:
        verify_response(kod, b"u" * 32, XMT, S2C)
    assert info.value.code == "RATE"


def test_server_rejects_forged_cookie_and_tampered_request() -> None:
    kr = ring()
    with pytest.raises(AuthenticationFailure):
        kr.open(b"\x00\x00\x00\x07" + os.urandom(100))
    with pytest.raises(AuthenticationFailure, match="unknown master key"):
        kr.open(b"\x00\x00\x00\x08" + os.urandom(100))
    cookie = kr.seal(CookieKeys(AEAD, C2S.key, S2C.key), os.urandom(16))
    request = bytearray(client_request(cookie))
    request[40] ^= 1  # transmit timestamp: covered by the authenticator
    with pytest.raises(AuthenticationFailure):
        serve(bytes(request), kr)


@pytest.mark.parametrize("mutation", ["no_uid", "two_cookies", "short_uid", "bad_placeholder"])
def test_server_rejects_malformed_nts_requests(mutation: str) -> None:
    cookie = os.urandom(104)
    header = NtpHeader(mode=Mode.CLIENT, transmit_ts=XMT).pack()
    uid = encode_ef(EfType.UNIQUE_IDENTIFIER, (b"u" * 16) if mutation == "short_uid" else b"u" * 32)
    fields = [] if mutation == "no_uid" else [uid]
    fields.append(encode_ef(EfType.NTS_COOKIE, cookie))
    if mutation == "two_cookies":
        fields.append(encode_ef(EfType.NTS_COOKIE, cookie))
    if mutation == "bad_placeholder":
        fields.append(encode_ef(EfType.NTS_COOKIE_PLACEHOLDER, bytes(50)))
    packet = header + b"".join(fields)
    packet += encode_authenticator(bytes(16), C2S.seal(bytes(16), b"", packet))
    pkt = NtpPacket.parse(packet)
    with pytest.raises(MalformedPacket):
        parse_request(packet, pkt.header, pkt.extensions)


def test_gcm_siv_nonce_padding() -> None:
    ef = encode_authenticator(bytes(12), bytes(16))
    nonce_len, ct_len = struct.unpack_from("!HH", ef, 4)
    assert (nonce_len, ct_len) == (12, 16)
    assert len(ef) == 4 + 4 + 16 + 16  # 12-byte nonce padded out to 16 (RFC 8915 s5.6)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([AeadId.AES_SIV_CMAC_256, AeadId.AES_SIV_CMAC_384,
                        AeadId.AES_SIV_CMAC_512]),
       st.integers(0, 12), st.integers(32, 90), st.integers(0, 1600))
def test_a_plans_cookie_count_is_cookies_that_fit(
    aead_id: AeadId, placeholders: int, uid_len: int, request_len: int
) -> None:
    # the plan's closed form against the rule spelled out (the response_length loop)
    key_len = {15: 32, 16: 48, 17: 64}[aead_id]
    keys = CookieKeys(aead_id, bytes(key_len), bytes(key_len))
    ring = KeyRing([MasterKey(1, bytes(32), 0)])
    plan = ResponsePlan(Aead(aead_id, keys.c2s), Aead(aead_id, keys.s2c), ring.sealer(keys))
    uid_field = encode_ef(0x0104, bytes(uid_len))
    assert plan.cookie_count(placeholders, len(uid_field), request_len) == cookies_that_fit(
        placeholders, uid_len, cookie_length(aead_id), 16, request_len)
