"""The responder's fast path answers exactly as the general parser does.

Two responders share one key ring: one with the fast path (the default), one
with ``fastpath=False``. Given the same datagram, the same random bytes and
the same transmit time, both must return the same bytes (or both nothing) and
move the same counters.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from ntspy.config import AccessRule
from ntspy.proto import nts
from ntspy.proto.aead import Aead, AeadId, gcm_siv_available
from ntspy.proto.cookies import CookieKeys, KeyRing, MasterKey
from ntspy.proto.ntp import Leap, Mode, NtpHeader, SyncState, encode_ef, iter_efs, unix_ns_to_ntp
from ntspy.server.access import AccessTable
from ntspy.server.ratelimit import RateLimiter
from ntspy.server.responder import Responder
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
