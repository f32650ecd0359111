"""Every compiled backend against its pure-Python twin, byte for byte (hypothesis).

- AES-SIV: ``ntspy._accel.AesSiv`` (behind ``proto.aead.Aead``) against
  ``cryptography``'s AESSIV, RFC 5297's vectors through both;
- the NTS response builder: ``proto.nts.ResponsePlan`` on ``ntspy._accel.NtsPlan``
  against the same plan in Python, and a plan against ``nts.build_response``;
- the whole responder, with and without the accelerator.

Where the accelerator is not built or NTSPY_NO_ACCEL=1, the Python side of
each comparison still runs and the compiled side is checked to be absent.
"""

from __future__ import annotations

import contextlib
import importlib
import random
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Protocol

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from hypothesis import given, settings
from hypothesis import strategies as st

from ntspy import _optional
from ntspy.errors import AuthenticationFailure
from ntspy.proto import aead as aead_module
from ntspy.proto import nts
from ntspy.proto.aead import ACCELERATED, Aead, AeadId
from ntspy.proto.cookies import CookieKeys, KeyRing, MasterKey
from ntspy.proto.ntp import HEADER_LEN, NtpHeader, SyncState, unix_ns_to_ntp
from ntspy.server.responder import Responder
from ntspy.server.stats import StatsTable
from tests.unit import siv_vectors as v
from tests.unit.test_responder import NOW, RING, nts_requests

SETTINGS = settings(max_examples=300, deadline=None)


def _load() -> ModuleType | None:
    try:
        return importlib.import_module("ntspy._accel")
    except ImportError:
        return None


accel = _load()


class Siv(Protocol):
    def encrypt(self, data: bytes, associated_data: list[bytes] | None) -> bytes: ...
    def decrypt(self, data: bytes, associated_data: list[bytes] | None) -> bytes: ...


# Every implementation the RFC vectors run through: cryptography always, the
# accelerator where it is built.
IMPLS: list[Callable[[bytes], Siv]] = [AESSIV]
if accel is not None:
    IMPLS.append(accel.AesSiv)
REJECTED = (InvalidTag, *((accel.InvalidTag,) if accel is not None else ()))



@pytest.mark.parametrize("impl", IMPLS)
def test_rfc5297_vectors(impl: Callable[[bytes], Siv]) -> None:
    # A.1: deterministic, one associated-data component
    assert impl(v.A1_KEY).encrypt(v.A1_PT, [v.A1_AD]) == v.A1_CT
    assert impl(v.A1_KEY).decrypt(v.A1_CT, [v.A1_AD]) == v.A1_PT
    # A.2: two components and a nonce, which NTS always puts last
    key, ad1, ad2, nonce, pt, ct = v.A2_KEY, v.A2_AD1, v.A2_AD2, v.A2_NONCE, v.A2_PT, v.A2_CT
    siv = impl(key)
    assert siv.encrypt(pt, [ad1, ad2, nonce]) == ct
    assert siv.decrypt(ct, [ad1, ad2, nonce]) == pt
    with pytest.raises(REJECTED):
        siv.decrypt(ct, [ad1, ad2])



keys = st.sampled_from([32, 48, 64]).flatmap(lambda n: st.binary(min_size=n, max_size=n))
# lengths around the block size matter most: S2V treats < 16, = 16 and > 16 differently
data = st.one_of(st.binary(max_size=40), st.binary(max_size=300))


@contextlib.contextmanager
def _no_accel() -> Iterator[None]:
    """New Aead objects use cryptography while this is active."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aead_module, "_FastSiv", None)
        yield


def _accelerated_aead(aead_id: int, key: bytes) -> Aead:
    a = Aead(aead_id, key)
    assert a.accelerated == ACCELERATED
    return a



@SETTINGS
@given(keys, st.lists(st.tuples(data, data, st.binary(max_size=40), st.integers(0, 3)),
                      min_size=1, max_size=6))
def test_seal_and_open_agree_with_cryptography(
    key: bytes, ops: list[tuple[bytes, bytes, bytes, int]]
) -> None:
    # One object for several calls of different sizes: the accelerator keeps
    # its cipher state between calls, which must not leak from one into the next.
    aead_id = {32: 15, 48: 16, 64: 17}[len(key)]
    fast = _accelerated_aead(aead_id, key)
    ref = AESSIV(key)
    for pt, ad, nonce, damage in ops:
        sealed = fast.seal(nonce, pt, ad)
        assert sealed == ref.encrypt(pt, [ad, nonce])
        assert fast.open(nonce, sealed, ad) == pt
        # damage one input: both must reject
        if damage == 0:
            bad_ct, bad_ad, bad_nonce = sealed[:-1] + bytes([sealed[-1] ^ 0x40]), ad, nonce
        elif damage == 1:
            bad_ct, bad_ad, bad_nonce = sealed, ad + b"\x00", nonce
        elif damage == 2:
            bad_nonce = bytes([nonce[0] ^ 1]) + nonce[1:] if nonce else b"\x00"
            bad_ct, bad_ad = sealed, ad
        else:
            bad_ct, bad_ad, bad_nonce = sealed[:15], ad, nonce
        with pytest.raises(AuthenticationFailure):
            fast.open(bad_nonce, bad_ct, bad_ad)
        with pytest.raises(InvalidTag):
            ref.decrypt(bad_ct, [bad_ad, bad_nonce])


@SETTINGS
@given(keys, st.lists(data, max_size=5), data, st.integers(0, 10_000))
def test_general_interface_agrees_with_cryptography(
    key: bytes, ads: list[bytes], pt: bytes, flip: int
) -> None:
    if accel is None:
        assert not ACCELERATED
        return
    ours, ref = accel.AesSiv(key), AESSIV(key)
    ct = ref.encrypt(pt, ads)
    assert ours.encrypt(pt, ads) == ct
    assert ours.decrypt(ct, ads) == pt
    at = flip % len(ct)
    bad = ct[:at] + bytes([ct[at] ^ (1 + flip % 255)]) + ct[at + 1:]
    with pytest.raises(accel.InvalidTag):
        ours.decrypt(bad, ads)
    with pytest.raises(InvalidTag):
        ref.decrypt(bad, ads)


def test_large_and_odd_buffers() -> None:
    key = bytes(range(64))
    big = random.Random(5).randbytes(1 << 20)
    a = _accelerated_aead(AeadId.AES_SIV_CMAC_512, key)
    sealed = a.seal(b"n" * 16, big, big[:70_000])
    assert sealed == AESSIV(key).encrypt(big, [big[:70_000], b"n" * 16])
    assert a.open(b"n" * 16, sealed, big[:70_000]) == big
    # memoryview and bytearray work like bytes
    if accel is not None:
        siv = accel.AesSiv(key)
        assert siv.open(memoryview(b"n" * 16), bytearray(sealed), memoryview(big)[:70_000]) == big



@settings(max_examples=200, deadline=None)
@given(nts_requests(), st.integers(0, 2**32), st.integers(0, 2**62))
def test_server_answers_are_the_same_without_the_accelerator(
    req: tuple[bytes, int, bytes, Aead], seed: int, tx: int
) -> None:
    tables = StatsTable(), StatsTable()
    fast = Responder(RING, tables[0].row(), random.Random(seed).randbytes)
    plain = Responder(RING, tables[1].row(), random.Random(seed).randbytes)
    fast.state = plain.state = SyncState.local(2, unix_ns_to_ntp(NOW))
    data = req[0]
    out_fast = fast.handle(data, "192.0.2.1", NOW, lambda: tx)
    with _no_accel():
        # the responder makes a session's AEADs and plan when a packet needs them
        out_plain = plain.handle(data, "192.0.2.1", NOW, lambda: tx)
        assert not any(p.compiled for p in plain._plans.values())
    assert out_fast == out_plain
    assert fast.reason == plain.reason
    assert tables[0].totals() == tables[1].totals()


# ---------------------------------------------------------------------------
# The NTS response builder: one plan, two backends


SIV_IDS = [AeadId.AES_SIV_CMAC_256, AeadId.AES_SIV_CMAC_384, AeadId.AES_SIV_CMAC_512]


def _plans(aead_id: int, keys: CookieKeys, ring: KeyRing) -> tuple[nts.ResponsePlan,
                                                                   nts.ResponsePlan]:
    """The same plan twice: on the compiled backend where there is one, and in Python."""
    sealer = ring.sealer(keys)
    fast = nts.ResponsePlan(Aead(aead_id, keys.c2s), Aead(aead_id, keys.s2c), sealer)
    with _no_accel():
        slow_ring = KeyRing(ring.keys)
        slow = nts.ResponsePlan(Aead(aead_id, keys.c2s), Aead(aead_id, keys.s2c),
                                slow_ring.sealer(keys))
    assert fast.compiled == nts.COMPILED_BUILDER
    assert not slow.compiled
    return fast, slow


sessions = st.sampled_from(SIV_IDS).flatmap(
    lambda aead_id: st.tuples(
        st.just(aead_id),
        st.binary(min_size=aead_module.info(aead_id).key_length,
                  max_size=aead_module.info(aead_id).key_length),
        st.binary(min_size=aead_module.info(aead_id).key_length,
                  max_size=aead_module.info(aead_id).key_length),
        st.binary(min_size=32, max_size=32),
    )
)


@SETTINGS
@given(sessions, st.integers(0, 8), st.binary(min_size=48, max_size=48),
       st.integers(8, 20).map(lambda n: 4 * n), st.randoms(use_true_random=False))
def test_both_backends_seal_the_same_response(
    session: tuple[int, bytes, bytes, bytes], count: int, header: bytes, uid_len: int,
    rng: random.Random,
) -> None:
    aead_id, c2s, s2c, master = session
    keys = CookieKeys(aead_id, c2s, s2c)
    fast, slow = _plans(aead_id, keys, KeyRing([MasterKey(7, master, 0)]))
    uid_field = nts.encode_ef(nts.EfType.UNIQUE_IDENTIFIER, rng.randbytes(uid_len - 4))
    rnd = rng.randbytes(fast.random_len[count])
    out = fast.seal(header, uid_field, count, rnd, 10_000)
    assert out == slow.seal(header, uid_field, count, rnd, 10_000)
    assert len(out) == nts.response_length(uid_len - 4, count, fast.cookie_len, fast.nonce_len)
    # the exact fit is allowed, one byte less is not, on both
    for plan in (fast, slow):
        assert plan.seal(header, uid_field, count, rnd, len(out)) == out
        with pytest.raises(ValueError):
            plan.seal(header, uid_field, count, rnd, len(out) - 1)
        with pytest.raises(ValueError):
            plan.seal(header, uid_field, count, rnd + b"x", 10_000)


@SETTINGS
@given(sessions, st.integers(0, 7), st.integers(32, 60), st.binary(min_size=48, max_size=48),
       st.integers(0, 400), st.randoms(use_true_random=False))
def test_both_backends_answer_the_same_request(
    session: tuple[int, bytes, bytes, bytes], placeholders: int, uid_len: int, header: bytes,
    flip: int, rng: random.Random,
) -> None:
    aead_id, c2s, s2c, master = session
    keys = CookieKeys(aead_id, c2s, s2c)
    ring = KeyRing([MasterKey(7, master, 0)])
    fast, slow = _plans(aead_id, keys, ring)
    request = nts.build_request(NtpHeader(transmit_ts=rng.getrandbits(64)), rng.randbytes(uid_len),
                                ring.seal(keys, rng.randbytes(16)), placeholders,
                                Aead(aead_id, c2s), rng.randbytes(16))
    layout = nts.scan_request(request)
    assert layout is not None and layout[2] == placeholders
    count = fast.cookie_count(placeholders, layout[3] - HEADER_LEN, len(request))
    rnd = rng.randbytes(fast.random_len[count])
    out = fast.answer(request, layout, header, count, rnd)
    assert out is not None and out == slow.answer(request, layout, header, count, rnd)
    assert len(out) <= len(request)
    # any flipped bit the authenticator covers: both refuse it
    at = flip % layout[4] if flip % 2 else layout[7] + flip % (layout[8] - layout[7])
    bad = request[:at] + bytes([request[at] ^ 0x10]) + request[at + 1:]
    assert fast.answer(bad, layout, header, count, rnd) is None
    assert slow.answer(bad, layout, header, count, rnd) is None


@SETTINGS
@given(sessions, st.integers(0, 8), st.randoms(use_true_random=False))
def test_a_plan_makes_what_build_response_makes(
    session: tuple[int, bytes, bytes, bytes], count: int, rng: random.Random
) -> None:
    # build_response (cookies sealed already, an NtpHeader) and the plan lay a
    # response out the same way: the plan's template is cut from the same codec.
    aead_id, c2s, s2c, master = session
    keys = CookieKeys(aead_id, c2s, s2c)
    ring = KeyRing([MasterKey(7, master, 0)])
    for plan in _plans(aead_id, keys, ring):
        header = NtpHeader(stratum=2, transmit_ts=rng.getrandbits(64))
        uid = rng.randbytes(32)
        rnd = rng.randbytes(plan.random_len[count])
        cookies = [ring.seal(keys, rnd[16 * i:16 * i + 16]) for i in range(count)]
        expected = nts.build_response(header, uid, cookies, Aead(aead_id, s2c), rnd[16 * count:])
        uid_field = nts.encode_ef(nts.EfType.UNIQUE_IDENTIFIER, uid)
        assert plan.seal(header.pack(), uid_field, count, rnd, 10_000) == expected


_EF_TYPES = st.sampled_from([0x0104, 0x0204, 0x0304, 0x0404, 0x0000, 0x0105, 0xFFFF])


@st.composite
def ef_chains(draw: st.DrawFn) -> bytes:
    """A header and extension fields whose types and lengths are near the usual
    layout's (right, off by a little, lying about the length, cut short)."""
    out = draw(st.binary(min_size=48, max_size=48))
    for _ in range(draw(st.integers(0, 6))):
        ef_type = draw(_EF_TYPES)
        body = draw(st.binary(max_size=120))
        length = draw(st.sampled_from([len(body) + 4, len(body) + 4, len(body), 0, 2, 65535,
                                       draw(st.integers(0, 65535))]))
        out += ef_type.to_bytes(2, "big") + length.to_bytes(2, "big") + body
    if draw(st.booleans()):
        out = out[:draw(st.integers(0, len(out)))]
    return out


@SETTINGS
@given(st.one_of(nts_requests().map(lambda r: r[0]), ef_chains(), st.binary(max_size=400)))
def test_both_scanners_find_the_same_layout(data: bytes) -> None:
    # The compiled scanner is made with proto/nts.py's numbers; it walks the
    # same fields to the same nine offsets, or refuses the same requests.
    assert nts.scan_request(data) == nts.scan_request_python(data)


def test_the_compiled_scanner_is_the_one_in_use() -> None:
    expected = accel is not None and not _optional.DISABLED
    assert (nts.scan_request is not nts.scan_request_python) is expected
    if accel is not None:
        scanner = accel.RequestScanner(0x0104, 0x0204, 0x0304, 0x0404, 36, 28, 16, 128)
        with pytest.raises(TypeError):
            scanner.scan(bytearray(200))
        assert scanner.scan(bytes(200)) is None
        with pytest.raises(ValueError):
            accel.RequestScanner(0x10000, 0, 0, 0, 0, 0, 0, 0)
