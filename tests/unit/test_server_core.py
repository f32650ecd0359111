"""The server's responder (sans-I/O): plain and NTS answers, NAKs, malformed input,
access and rate limiting as the responder applies them."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from ntspy.config import AccessRule as Rule
from ntspy.proto.aead import Aead, AeadId
from ntspy.proto.cookies import CookieKeys
from ntspy.proto.ntp import Mode, NtpHeader, SyncState, encode_ef, ntp_to_unix_ns, unix_ns_to_ntp
from ntspy.proto.nts import EfType, build_request, encode_authenticator, verify_response
from ntspy.server.access import AccessTable
from ntspy.server.keys import KeyStore
from ntspy.server.ratelimit import RateLimiter
from ntspy.server.responder import Responder
from ntspy.server.stats import StatsTable

NOW = 1_800_000_000 * 10**9
AEAD = AeadId.AES_SIV_CMAC_256
C2S, S2C = Aead(AEAD, os.urandom(32)), Aead(AEAD, os.urandom(32))


def make(tmp: Path | None = None, **kw: object) -> tuple[Responder, StatsTable, KeyStore]:
    store = KeyStore(tmp, 3600)
    store.load(NOW // 10**9)
    table = StatsTable()
    r = Responder(store.ring, table.row(), os.urandom, **kw)  # type: ignore[arg-type]
    r.state = SyncState.local(1, unix_ns_to_ntp(NOW))
    return r, table, store


def plain_request(xmt: int = 42, version: int = 4) -> bytes:
    return NtpHeader(version=version, mode=Mode.CLIENT, poll=6, transmit_ts=xmt).pack()


def nts_request(store: KeyStore, cookie: bytes | None = None, placeholders: int = 0) -> bytes:
    if cookie is None:
        cookie = store.ring.seal(CookieKeys(AEAD, C2S.key, S2C.key), os.urandom(16))
    return build_request(NtpHeader(mode=Mode.CLIENT, transmit_ts=99), b"i" * 32, cookie,
                         placeholders, C2S, os.urandom(16))


def test_plain_response_fields() -> None:
    r, table, _ = make()
    out = r.handle(plain_request(version=3), "127.0.0.1", NOW, lambda: NOW + 1000)
    assert out is not None and len(out) == 48
    h = NtpHeader.unpack(out)
    assert (h.mode, h.version, h.stratum, h.origin_ts, h.poll) == (Mode.SERVER, 3, 1, 42, 6)
    assert h.reference_id == bytes([127, 127, 1, 1])
    assert ntp_to_unix_ns(h.receive_ts, NOW) - NOW in (0, 1)
    assert abs(ntp_to_unix_ns(h.transmit_ts, NOW) - (NOW + 1000)) <= 1
    assert table.totals()["ntp_received"] == 1


def test_nts_response_is_authenticated_and_not_larger() -> None:
    r, table, store = make()
    req = nts_request(store, placeholders=7)
    out = r.handle(req, "127.0.0.1", NOW, lambda: NOW)
    assert out is not None and len(out) <= len(req)
    verified = verify_response(out, b"i" * 32, 99, S2C)
    assert len(verified.cookies) == 8
    assert table.totals()["nts_authenticated"] == 1


def test_encrypted_cookie_placeholders_count_like_the_others() -> None:
    """RFC 8915 s5.7: placeholders inside the encrypted part ask for one cookie each,
    as those outside do; the response is still never larger than the request.  Both
    the fast path and the general parser."""
    for fastpath in (True, False):
        r, table, store = make(fastpath=fastpath)
        cookie = store.ring.seal(CookieKeys(AEAD, C2S.key, S2C.key), os.urandom(16))
        for outside, inside in [(0, 1), (0, 3), (2, 2), (0, 7), (3, 9), (7, 0)]:
            req = build_request(NtpHeader(mode=Mode.CLIENT, transmit_ts=99), b"i" * 32,
                                cookie, outside, C2S, os.urandom(16),
                                encrypted_placeholders=inside)
            out = r.handle(req, "127.0.0.1", NOW, lambda: NOW)
            assert out is not None and len(out) <= len(req)
            verified = verify_response(out, b"i" * 32, 99, S2C)
            assert len(verified.cookies) == min(1 + outside + inside, 8), (outside, inside)
        # A decrypted part that is not placeholders of the cookie's size adds nothing.
        packet = (NtpHeader(mode=Mode.CLIENT, transmit_ts=99).pack()
                  + encode_ef(EfType.UNIQUE_IDENTIFIER, b"i" * 32)
                  + encode_ef(EfType.NTS_COOKIE, cookie)
                  + encode_ef(EfType.NTS_COOKIE_PLACEHOLDER, bytes(len(cookie))))
        hidden = (encode_ef(EfType.NTS_COOKIE_PLACEHOLDER, bytes(8))  # not the cookie's size
                  + encode_ef(0x7777, bytes(100)))  # not a placeholder
        nonce = os.urandom(16)
        odd = packet + encode_authenticator(nonce, C2S.seal(nonce, hidden, packet))
        out = r.handle(odd, "127.0.0.1", NOW, lambda: NOW)
        assert out is not None
        assert len(verify_response(out, b"i" * 32, 99, S2C).cookies) == 2
        assert table.totals()["nts_authenticated"] == 7


def test_unknown_cookie_gets_nak_and_counts() -> None:
    r, table, store = make()
    out = r.handle(nts_request(store, cookie=os.urandom(104)), "127.0.0.1", NOW, lambda: NOW)
    assert out is not None
    h = NtpHeader.unpack(out)
    assert (h.stratum, h.reference_id) == (0, b"NTSN")
    assert table.totals()["nts_naks"] == 1


def test_malformed_and_wrong_mode_dropped_and_counted() -> None:
    r, table, _store = make()
    assert r.handle(b"\x23" * 20, "127.0.0.1", NOW, lambda: NOW) is None
    server_mode = NtpHeader(mode=Mode.SERVER).pack()
    assert r.handle(server_mode, "127.0.0.1", NOW, lambda: NOW) is None
    broken_ef = plain_request() + b"\x01\x04\x00\x40" + bytes(12)
    assert r.handle(broken_ef, "127.0.0.1", NOW, lambda: NOW) is None
    assert table.totals()["ntp_malformed"] == 3
    # Still serves a good client after all that.
    assert r.handle(plain_request(), "127.0.0.1", NOW, lambda: NOW) is not None


def test_unknown_extension_fields_get_a_plain_answer() -> None:
    r, _, _ = make()
    req = plain_request() + encode_ef(0x7777, b"hello")
    out = r.handle(req, "127.0.0.1", NOW, lambda: NOW)
    assert out is not None and len(out) == 48




def test_denied_client_gets_nothing() -> None:
    r, table, _ = make(access=AccessTable([Rule(True, ipaddress.ip_network("127.0.0.2/32"))]))
    assert r.handle(plain_request(), "127.0.0.1", NOW, lambda: NOW) is None
    assert table.totals()["ntp_denied"] == 1


def test_a_rate_limited_client_gets_a_rate_kiss() -> None:
    r, table, _ = make(ratelimit=RateLimiter(interval=3, burst=1, leak=0))
    assert NtpHeader.unpack(r.handle(plain_request(), "c", NOW, lambda: NOW) or b"").stratum == 1
    kiss = r.handle(plain_request(), "c", NOW, lambda: NOW)
    assert kiss is not None and NtpHeader.unpack(kiss).reference_id == b"RATE"
    assert table.totals()["ntp_rate_kod"] == 1
