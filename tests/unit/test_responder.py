"""The responder (server/responder.py): its decisions, each packet's Reason and
the counters that moves, and its two ways of reading a request.

Reading: two responders share one key ring, one scanning the usual layout
first (the default), one with ``fastpath=False`` reading everything with the
general parser. Given the same datagram, the same random bytes and the same
transmit time, both must return the same bytes (or both nothing), give the
same reason and move the same counters.
"""

from __future__ import annotations

import ipaddress
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntspy.config import AccessRule
from ntspy.config import AccessRule as Rule
from ntspy.proto import nts
from ntspy.proto.aead import Aead, AeadId, gcm_siv_available
from ntspy.proto.cookies import CookieKeys, KeyRing, MasterKey
from ntspy.proto.ntp import (
    Leap,
    Mode,
    NtpHeader,
    SyncState,
    encode_ef,
    iter_efs,
    ntp_to_unix_ns,
    unix_ns_to_ntp,
)
from ntspy.proto.nts import EfType, build_request, encode_authenticator, verify_response
from ntspy.server.access import AccessTable
from ntspy.server.keys import KeyStore
from ntspy.server.ratelimit import RateLimiter
from ntspy.server.responder import REASON_COUNTERS, RandomPool, Reason, Responder, _ntp_ts
from ntspy.server.stats import StatsTable

NOW = 1_800_000_000 * 10**9
_rng = random.Random(8915)
RING = KeyRing([MasterKey(1, _rng.randbytes(32), 0), MasterKey(2, _rng.randbytes(32), 10)])
OTHER_RING = KeyRing([MasterKey(2, _rng.randbytes(32), 10)])  # same key id, other key
AEADS = [AeadId.AES_SIV_CMAC_256, AeadId.AES_SIV_CMAC_512]
if gcm_siv_available():
    AEADS.append(AeadId.AES_128_GCM_SIV)
KEY_LEN = {AeadId.AES_SIV_CMAC_256: 32, AeadId.AES_SIV_CMAC_512: 64, AeadId.AES_128_GCM_SIV: 16}
NONCE_LEN = {AeadId.AES_SIV_CMAC_256: 16, AeadId.AES_SIV_CMAC_512: 16, AeadId.AES_128_GCM_SIV: 12}
SETTINGS = settings(max_examples=300, deadline=None)
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


def pair(**kw: object) -> tuple[Responder, Responder, StatsTable, StatsTable]:
    fast_table, slow_table = StatsTable(), StatsTable()
    fast = Responder(RING, fast_table.row(), random.randbytes, **kw)  # type: ignore[arg-type]
    slow = Responder(RING, slow_table.row(), random.randbytes, fastpath=False,
                     **kw)  # type: ignore[arg-type]
    return fast, slow, fast_table, slow_table


def same_answer(fast: Responder, slow: Responder, data: bytes, seed: int, tx: int,
                address: str = "192.0.2.1") -> bytes | None:
    fast.random_bytes = random.Random(seed).randbytes
    slow.random_bytes = random.Random(seed).randbytes
    clock: Callable[[], int] = lambda: tx  # noqa: E731
    out_fast = fast.handle(data, address, NOW, clock)
    out_slow = slow.handle(data, address, NOW, clock)
    assert out_fast == out_slow
    assert fast.reason == slow.reason
    return out_fast


@st.composite
def nts_requests(draw: st.DrawFn) -> tuple[bytes, int, bytes, Aead]:
    """A client's request, valid or damaged in one of the ways that matter."""
    aead_id = draw(st.sampled_from(AEADS))
    keys = CookieKeys(aead_id, draw(st.binary(min_size=KEY_LEN[aead_id],
                                              max_size=KEY_LEN[aead_id])),
                      draw(st.binary(min_size=KEY_LEN[aead_id], max_size=KEY_LEN[aead_id])))
    ring = draw(st.sampled_from([RING, RING, RING, OTHER_RING]))
    cookie = ring.seal(keys, draw(st.binary(min_size=16, max_size=16)))
    if draw(st.booleans()) and draw(st.booleans()):
        cookie = draw(st.binary(min_size=0, max_size=120))  # junk, maybe too short
    header = NtpHeader(
        leap=draw(st.sampled_from(list(Leap))),
        mode=Mode.CLIENT,
        poll=draw(st.integers(-128, 127)),
        transmit_ts=draw(st.integers(0, 2**64 - 1)),
    )
    uid_len = draw(st.sampled_from([32] * 6 + [28, 31, 33, 36, 45, 70]))
    uid = draw(st.binary(min_size=uid_len, max_size=uid_len))
    c2s = Aead(aead_id, keys.c2s)
    # SIV takes any nonce length (the fast path must cope); GCM-SIV only 12 bytes.
    gcm = aead_id == AeadId.AES_128_GCM_SIV
    nonce = draw(st.binary(min_size=12 if gcm else 1, max_size=12 if gcm else 24))
    data = nts.build_request(header, uid, cookie, draw(st.integers(0, 9)), c2s, nonce)
    auth_at = list(iter_efs(data))[-1].offset
    damage = draw(st.sampled_from(
        ["none"] * 6 + ["flip", "cut", "append", "first", "insert", "auth_lengths"]
    ))
    if damage == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    elif damage == "cut":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif damage == "append":
        data += draw(st.binary(min_size=1, max_size=40))
    elif damage == "first":
        data = bytes([draw(st.integers(0, 255))]) + data[1:]
    elif damage == "insert":
        # an unknown or a repeated EF between the cookie and the authenticator
        efs = [encode_ef(draw(st.sampled_from([0x7777, 0x0104, 0x0204, 0x0304])),
                         draw(st.binary(max_size=40)))]
        data = data[:auth_at] + efs[0] + data[auth_at:]
    elif damage == "auth_lengths":
        # the authenticator's nonce or ciphertext length: zero, off by a bit, huge
        at = auth_at + draw(st.sampled_from([4, 6]))
        value = draw(st.sampled_from([0, 1, 12, 15, 17, 100, 0xFFFF]))
        data = data[:at] + value.to_bytes(2, "big") + data[at + 2:]
    return data, header.transmit_ts, uid, Aead(aead_id, keys.s2c)


@SETTINGS
@given(nts_requests(), st.integers(0, 2**32), st.integers(0, 2**62))
def test_nts_requests_get_the_same_answer(
    req: tuple[bytes, int, bytes, Aead], seed: int, tx: int
) -> None:
    fast, slow, fast_table, slow_table = pair()
    fast.state = slow.state = SyncState.local(2, unix_ns_to_ntp(NOW))
    data, _, _, _ = req
    same_answer(fast, slow, data, seed, tx)
    assert fast_table.totals() == slow_table.totals()


@SETTINGS
@given(st.binary(min_size=0, max_size=100), st.integers(0, 255), st.integers(0, 2**62),
       st.sampled_from([SyncState(), SyncState.local(1, 5),
                        SyncState(Leap.INSERT_SECOND, 3, -23, 0.0123, 1.5, b"GPS\x00", 7)]))
def test_plain_and_odd_packets_get_the_same_answer(
    data: bytes, first: int, tx: int, state: SyncState
) -> None:
    fast, slow, fast_table, slow_table = pair()
    fast.state = slow.state = state
    packet = bytes([first]) + data
    same_answer(fast, slow, packet, 1, tx)
    if len(packet) >= 48:
        same_answer(fast, slow, bytes([0x23]) + data, 1, tx)
    assert fast_table.totals() == slow_table.totals()


def test_rate_limited_and_denied_clients_are_treated_alike() -> None:
    rules = [AccessRule(True, ipaddress.ip_network("192.0.2.0/24"))]
    fast, slow, fast_table, slow_table = pair(access=AccessTable(rules))
    fast.ratelimit = RateLimiter(interval=3, burst=2, leak=1)
    slow.ratelimit = RateLimiter(interval=3, burst=2, leak=1)
    fast.state = slow.state = SyncState.local(1, 5)
    c2s, s2c = Aead(15, bytes(range(32))), Aead(15, bytes(range(32, 64)))
    cookie = RING.seal(CookieKeys(15, c2s.key, s2c.key), bytes(16))
    nts_req = nts.build_request(NtpHeader(transmit_ts=77), b"u" * 32, cookie, 1, c2s, bytes(16))
    plain = NtpHeader(transmit_ts=78).pack()
    kisses = 0
    for i in range(12):
        out = same_answer(fast, slow, nts_req if i % 2 else plain, i, NOW + i)
        if out is not None and NtpHeader.unpack(out).reference_id == b"RATE":
            kisses += 1
            if len(out) > 48:  # a RATE kiss to an NTS client is still authenticated
                nts_resp = nts.verify_response
                try:
                    nts_resp(out, b"u" * 32, 77, s2c)
                except Exception as exc:  # KissOfDeath after authentication
                    assert type(exc).__name__ == "KissOfDeath"
    assert same_answer(fast, slow, plain, 0, NOW, address="198.51.100.1") is None
    assert kisses >= 2
    totals = fast_table.totals()
    assert totals == slow_table.totals()
    assert totals["ntp_denied"] == 1 and totals["ntp_dropped"] >= 2


def test_valid_request_takes_the_fast_path_and_verifies() -> None:
    # Guards against a fast path that silently always falls back.
    fast, _, table, _ = pair()
    fast.state = SyncState.local(1, 5)
    calls: list[bytes] = []
    general = fast._handle_general
    fast._handle_general = lambda d, *a: calls.append(d) or general(d, *a)  # type: ignore[method-assign]
    c2s, s2c = Aead(15, bytes(32)), Aead(15, bytes(range(32)))
    cookie = RING.seal(CookieKeys(15, c2s.key, s2c.key), bytes(16))
    req = nts.build_request(NtpHeader(transmit_ts=5), b"x" * 32, cookie, 3, c2s, bytes(16))
    out = fast.handle(req, "a", NOW, lambda: NOW)
    assert out is not None and len(out) <= len(req)
    assert len(nts.verify_response(out, b"x" * 32, 5, s2c).cookies) == 4
    assert fast.handle(NtpHeader(transmit_ts=9).pack(), "a", NOW, lambda: NOW) is not None
    assert calls == []
    assert table.totals()["nts_authenticated"] == 1 and table.totals()["ntp_received"] == 2
    # New cookies work in the next request: sealed under the current key.
    new_cookie = nts.verify_response(out, b"x" * 32, 5, s2c).cookies[0]
    assert RING.open(new_cookie) == CookieKeys(15, c2s.key, s2c.key)


def test_key_ring_changes_reach_the_fast_path() -> None:
    ring = KeyRing([MasterKey(7, bytes(32), 0)], kept=1)
    table = StatsTable()
    r = Responder(ring, table.row(), random.randbytes)
    r.state = SyncState.local(1, 5)
    c2s, s2c = Aead(15, bytes(32)), Aead(15, bytes(range(32)))
    cookie = ring.seal(CookieKeys(15, c2s.key, s2c.key), bytes(16))
    req = nts.build_request(NtpHeader(transmit_ts=5), b"x" * 32, cookie, 0, c2s, bytes(16))
    assert NtpHeader.unpack(r.handle(req, "a", NOW, lambda: NOW) or b"").stratum == 1
    ring.add(MasterKey(8, bytes(range(32)), 1))  # key 7 forgotten (kept=1)
    nak = r.handle(req, "a", NOW, lambda: NOW)
    assert nak is not None and NtpHeader.unpack(nak).reference_id == b"NTSN"
    ring.replace([])
    nak = r.handle(req, "a", NOW, lambda: NOW)
    assert nak is not None and NtpHeader.unpack(nak).reference_id == b"NTSN"
    assert table.totals()["nts_naks"] == 2


def test_every_length_field_edge_gets_the_same_answer() -> None:
    """Each EF length and each authenticator length set to edge values, one at a time."""
    fast, slow, fast_table, slow_table = pair()
    fast.state = slow.state = SyncState.local(1, 5)
    c2s = Aead(15, bytes(32))
    cookie = RING.seal(CookieKeys(15, c2s.key, bytes(32)), bytes(16))
    for placeholders, tail in ((0, b""), (2, b""), (1, bytes(20)), (0, bytes(24))):
        base = nts.build_request(NtpHeader(transmit_ts=3), b"q" * 32, cookie, placeholders, c2s,
                                 bytes(16)) + tail
        efs = list(iter_efs(base[:len(base) - len(tail)]))
        fields = [ef.offset + 2 for ef in efs] + [efs[-1].offset + 4, efs[-1].offset + 6]
        for at in fields:
            old = int.from_bytes(base[at:at + 2], "big")
            for value in {0, 1, 4, 12, 16, 20, 24, 27, 28, 32, old - 4, old - 1, old + 1, old + 4,
                          0xFFFF}:
                if 0 <= value <= 0xFFFF:
                    data = base[:at] + value.to_bytes(2, "big") + base[at + 2:]
                    same_answer(fast, slow, data, value, NOW)
    assert fast_table.totals() == slow_table.totals()
    assert fast_table.totals()["ntp_malformed"] > 0


# ---------------------------------------------------------------------------
# Answers and decisions, request by request


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


def test_rate_limited_client_gets_a_rate_kiss() -> None:
    r, table, _ = make(ratelimit=RateLimiter(interval=3, burst=1, leak=0))
    assert NtpHeader.unpack(r.handle(plain_request(), "c", NOW, lambda: NOW) or b"").stratum == 1
    kiss = r.handle(plain_request(), "c", NOW, lambda: NOW)
    assert kiss is not None and NtpHeader.unpack(kiss).reference_id == b"RATE"
    assert table.totals()["ntp_rate_kod"] == 1


# ---------------------------------------------------------------------------
# Each packet's fate: one Reason, exactly its counters


def _reason_and_counts(r: Responder, table: StatsTable, data: bytes,
                       address: str = "127.0.0.1") -> tuple[Reason | None, dict[str, int]]:
    before = table.totals()
    r.handle(data, address, NOW, lambda: NOW)
    after = table.totals()
    return r.reason, {k: after[k] - before[k] for k in after if after[k] != before[k]}


def _expected(reason: Reason, cookies: int = 0) -> dict[str, int]:
    counts = dict.fromkeys(REASON_COUNTERS[reason], 1)
    if cookies:
        counts["nts_cookies"] = cookies
    return counts


def test_every_reason_names_its_counters() -> None:
    assert set(REASON_COUNTERS) == set(Reason)
    for reason, names in REASON_COUNTERS.items():
        assert len(set(names)) == len(names), reason


@pytest.mark.parametrize("fastpath", [True, False])
def test_each_kind_of_packet_gets_its_reason_and_counters(fastpath: bool) -> None:
    r, table, store = make(fastpath=fastpath)
    good = nts_request(store, placeholders=1)
    tampered = good[:-1] + bytes([good[-1] ^ 1])
    cases: list[tuple[bytes, Reason, int]] = [
        (plain_request(), Reason.ANSWERED, 0),
        (plain_request(version=3), Reason.ANSWERED, 0),
        (good, Reason.NTS_ANSWERED, 2),
        (nts_request(store, cookie=os.urandom(104)), Reason.NAK, 0),  # unknown cookie
        (nts_request(store, cookie=os.urandom(10)), Reason.NAK, 0),  # too short for one
        (tampered, Reason.NAK, 0),  # does not authenticate
        (b"\x23" * 20, Reason.MALFORMED, 0),
        (NtpHeader(mode=Mode.SERVER).pack(), Reason.MALFORMED, 0),
        (plain_request() + b"\x01\x04\x00\x40" + bytes(12), Reason.MALFORMED, 0),
    ]
    for data, reason, cookies in cases:
        assert _reason_and_counts(r, table, data) == (reason, _expected(reason, cookies)), reason


@pytest.mark.parametrize("fastpath", [True, False])
def test_denied_and_rate_limited_packets_get_their_reasons(fastpath: bool) -> None:
    r, table, store = make(fastpath=fastpath,
                           access=AccessTable([Rule(True, ipaddress.ip_network("10.0.0.0/8"))]))
    good, plain = nts_request(store), plain_request()
    assert _reason_and_counts(r, table, plain, "192.0.2.1") == (Reason.DENIED,
                                                                _expected(Reason.DENIED))
    assert _reason_and_counts(r, table, good, "192.0.2.1") == (Reason.DENIED,
                                                               _expected(Reason.DENIED))
    # burst 1, every request over it answered with a kiss (leak 0) ...
    r, table, store = make(fastpath=fastpath, ratelimit=RateLimiter(interval=3, burst=1, leak=0))
    good = nts_request(store)
    assert _reason_and_counts(r, table, plain, "c")[0] is Reason.ANSWERED
    assert _reason_and_counts(r, table, plain, "c") == (Reason.RATE_KOD,
                                                        _expected(Reason.RATE_KOD))
    assert _reason_and_counts(r, table, good, "c") == (Reason.NTS_RATE_KOD,
                                                       _expected(Reason.NTS_RATE_KOD, 1))
    bad = nts_request(store, cookie=os.urandom(104))
    assert _reason_and_counts(r, table, bad, "c") == (Reason.RATE_NAK,
                                                      _expected(Reason.RATE_NAK))
    # ... or, with leak 8, almost all dropped
    r, table, store = make(fastpath=fastpath, ratelimit=RateLimiter(interval=3, burst=1, leak=8))
    assert _reason_and_counts(r, table, plain, "c")[0] is Reason.ANSWERED
    drops = [_reason_and_counts(r, table, plain, "c") for _ in range(3)]
    assert drops == [(Reason.RATE_DROP, _expected(Reason.RATE_DROP))] * 3


def test_an_authenticated_rate_kiss_is_a_verified_kiss() -> None:
    r, _, store = make(ratelimit=RateLimiter(interval=3, burst=1, leak=0))
    assert r.handle(nts_request(store), "c", NOW, lambda: NOW) is not None
    kiss = r.handle(nts_request(store), "c", NOW, lambda: NOW)
    assert kiss is not None and r.reason is Reason.NTS_RATE_KOD
    with pytest.raises(Exception, match="RATE"):
        verify_response(kiss, b"i" * 32, 99, S2C)


def test_a_ring_without_a_current_key_naks_instead_of_failing() -> None:
    # a fleet's pending key opens cookies but seals none: no new cookies, a NAK
    ring = KeyRing([MasterKey(1, bytes(32), 0)])
    cookie = ring.seal(CookieKeys(AEAD, C2S.key, S2C.key), bytes(16))
    for fastpath in (True, False):
        pending_only = KeyRing()
        pending_only.replace([], pending=[MasterKey(1, bytes(32), 0)])
        r = Responder(pending_only, StatsTable().row(), os.urandom, fastpath=fastpath)
        out = r.handle(build_request(NtpHeader(transmit_ts=99), b"i" * 32, cookie, 0, C2S,
                                     bytes(16)), "c", NOW, lambda: NOW)
        assert r.reason is Reason.NAK and out is not None


@given(st.integers(-2**66, 2**66))
def test_the_inlined_timestamp_conversion_is_unix_ns_to_ntp(ns: int) -> None:
    assert _ntp_ts(ns) == unix_ns_to_ntp(ns)


# ---------------------------------------------------------------------------
# The random pool the responder draws its nonces from


def test_random_pool_hands_out_fresh_bytes_in_slices() -> None:
    drawn: list[int] = []

    def source(n: int) -> bytes:
        drawn.append(n)
        return os.urandom(n)

    pool = RandomPool(block=64, source=source)
    parts = [pool(16) for _ in range(8)]
    assert all(len(p) == 16 for p in parts) and len(set(parts)) == 8
    assert drawn == [64, 64]  # two blocks for 128 bytes
    assert len(pool(12)) == 12 and len(pool(100)) == 100  # bigger than a block: direct
    assert drawn[-1] == 100


def test_random_pool_is_not_shared_with_a_forked_child() -> None:
    pool = RandomPool()
    pool(16)  # fill the block before forking
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it would use next, then leave at once
        try:
            os.write(write, pool(16))
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 16 and child != pool(16)


def test_the_responder_draws_from_a_pool_without_its_call_slot() -> None:
    drawn: list[int] = []

    def source(n: int) -> bytes:
        drawn.append(n)
        return os.urandom(n)

    r, _, store = make()
    r.random_bytes = pool = RandomPool(block=4096, source=source)
    assert r.random_bytes is pool
    out = r.handle(nts_request(store, placeholders=1), "127.0.0.1", NOW, lambda: NOW)
    assert out is not None and r.reason is Reason.NTS_ANSWERED
    assert len(verify_response(out, b"i" * 32, 99, S2C).cookies) == 2
    assert drawn == [4096] and pool._pos == 2 * 16 + 16  # two cookie nonces and the nonce
    assert len(pool.take(16)) == 16 and pool._pos == 64
