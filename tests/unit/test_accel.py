"""The optional compiled AES-SIV (``ntspy._accel``) against ``cryptography``.

Where the accelerator is built, it must give the same bytes as
``cryptography``'s AESSIV, accept exactly what that accepts, survive hostile
input with Python exceptions, and leave the server's answers unchanged.
Where it is not built (no compiler or OpenSSL headers at install time), the
same tests run against ``cryptography`` alone, and the first test checks
that this can only happen where the headers are missing.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Protocol

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from hypothesis import given, settings
from hypothesis import strategies as st

from ntspy.errors import AuthenticationFailure
from ntspy.proto import aead as aead_module
from ntspy.proto import nts
from ntspy.proto.aead import ACCELERATED, Aead, AeadId
from ntspy.proto.cookies import CookieKeys
from ntspy.proto.ntp import NtpHeader, SyncState, unix_ns_to_ntp
from ntspy.server import responder as responder_module
from ntspy.server.responder import Responder
from ntspy.server.stats import StatsTable
from tests.unit.test_server_fastpath import NOW, RING, nts_requests

h = bytes.fromhex
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


def _headers_present() -> bool:
    python_h = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return (python_h.exists() and Path("/usr/include/openssl/evp.h").exists()
            and shutil.which("cc") is not None)


def test_accelerator_is_built_where_it_can_be() -> None:
    # test.sh installs gcc, python3-dev and libssl-dev: there the build must
    # not have been skipped silently.
    if _headers_present():
        assert accel is not None, "ntspy._accel was not built although the headers are there"
    if os.environ.get("NTSPY_NO_ACCEL", "") in ("", "0"):
        assert (accel is not None) == ACCELERATED
        assert Aead(AeadId.AES_SIV_CMAC_256, bytes(32)).accelerated == ACCELERATED
    else:
        assert not ACCELERATED
    # GCM-SIV always stays on cryptography
    assert not Aead(AeadId.AES_128_GCM_SIV, bytes(16)).accelerated


def test_ke_engine_is_built_where_it_can_be() -> None:
    # Same for the NTS-KE engine: libssl comes with the same libssl-dev.
    from ntspy.net.tls.credentials import HAVE_NATIVE_KE

    built = importlib.util.find_spec("ntspy._ke") is not None
    if _headers_present() and Path("/usr/include/openssl/ssl.h").exists():
        assert built, "ntspy._ke was not built although the headers are there"
    wanted = built and os.environ.get("NTSPY_NO_ACCEL", "") in ("", "0")
    assert wanted == HAVE_NATIVE_KE


def test_env_var_forces_the_pure_python_path() -> None:
    code = ("from ntspy.proto.aead import ACCELERATED, Aead; "
            "print(ACCELERATED, Aead(17, bytes(64)).accelerated)")
    env = {**os.environ, "NTSPY_NO_ACCEL": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    env["NTSPY_NO_ACCEL"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [str(accel is not None)] * 2


@pytest.mark.parametrize("impl", IMPLS)
def test_rfc5297_vectors(impl: Callable[[bytes], Siv]) -> None:
    # A.1: deterministic, one associated-data component
    key = h("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    ad = h("101112131415161718191a1b1c1d1e1f2021222324252627")
    pt = h("112233445566778899aabbccddee")
    ct = h("85632d07c6e8f37f950acd320a2ecc93" "40c02b9690c4dc04daef7f6afe5c")
    assert impl(key).encrypt(pt, [ad]) == ct
    assert impl(key).decrypt(ct, [ad]) == pt
    # A.2: two components and a nonce, which NTS always puts last
    key = h("7f7e7d7c7b7a79787776757473727170404142434445464748494a4b4c4d4e4f")
    ad1 = h("00112233445566778899aabbccddeeffdeaddadadeaddadaffeeddccbbaa99887766554433221100")
    ad2 = h("102030405060708090a0")
    nonce = h("09f911029d74e35bd84156c5635688c0")
    pt = h("7468697320697320736f6d6520706c61696e7465787420746f20"
           "656e6372797074207573696e67205349562d414553")
    ct = h("7bdb6e3b432667eb06f4d14bff2fbd0f"
           "cb900f2fddbe404326601965c889bf17dba77ceb094fa663b7a3f748ba8af829ea64ad544a272e9c485b62a3fd5c0d")
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


@pytest.mark.parametrize("length", [0, 1, 15, 16])
def test_short_ciphertexts_are_rejected(length: int) -> None:
    a = _accelerated_aead(AeadId.AES_SIV_CMAC_256, bytes(32))
    expected = a.seal(b"", b"", b"")
    ct = expected[:length] if length < 16 else bytes(16)
    with pytest.raises(AuthenticationFailure):
        a.open(b"", ct, b"")


def test_hostile_arguments_raise_python_exceptions() -> None:
    if accel is None:
        assert not ACCELERATED
        return
    for bad_key in (b"", bytes(16), bytes(31), bytes(33), bytes(128)):
        with pytest.raises(ValueError):
            accel.AesSiv(bad_key)
    with pytest.raises(TypeError):
        accel.AesSiv("not bytes")
    siv = accel.AesSiv(bytes(32))
    with pytest.raises(TypeError):
        siv.seal(b"", b"")
    with pytest.raises(TypeError):
        siv.seal(b"", "text", b"")
    with pytest.raises(TypeError):
        siv.open(None, b"x" * 16, b"")
    with pytest.raises(ValueError):
        siv.encrypt(b"", [b""] * 127)
    with pytest.raises(TypeError):
        siv.encrypt(b"", [b"", 5])
    with pytest.raises(TypeError):
        siv.encrypt(b"", 5)
    assert siv.encrypt(b"x", [b""] * 126) == AESSIV(bytes(32)).encrypt(b"x", [b""] * 126)
    assert siv.key_length == 32
    # still usable after all those errors
    assert siv.seal(b"n", b"p", b"a") == AESSIV(bytes(32)).encrypt(b"p", [b"a", b"n"])


@settings(max_examples=200, deadline=None)
@given(nts_requests(), st.integers(0, 2**32), st.integers(0, 2**62))
def test_server_answers_are_the_same_without_the_accelerator(
    req: tuple[bytes, int, bytes, Aead], seed: int, tx: int
) -> None:
    # The compiled path draws a response's random bytes in one call, the Python
    # paths one call per nonce; Random.randbytes gives the same bytes either way
    # for lengths that are multiples of 4 (all of ours).
    tables = StatsTable(), StatsTable()
    fast = Responder(RING, tables[0].row(), random.Random(seed).randbytes)
    plain = Responder(RING, tables[1].row(), random.Random(seed).randbytes)
    fast.state = plain.state = SyncState.local(2, unix_ns_to_ntp(NOW))
    data = req[0]
    out_fast = fast.handle(data, "192.0.2.1", NOW, lambda: tx)
    with _no_accel():
        # the responder makes its AEAD objects when a packet needs them
        out_plain = plain.handle(data, "192.0.2.1", NOW, lambda: tx)
        assert not any(a.accelerated for a in plain._masters.values())
    assert out_fast == out_plain
    assert tables[0].totals() == tables[1].totals()


def _verified_request() -> tuple[bytes, tuple[int, ...], tuple[object, ...] | None]:
    """A real NTS request, its layout, and the session tuple the responder
    packed for it (None without the accelerator)."""
    keys = CookieKeys(AeadId.AES_SIV_CMAC_256, bytes(range(32)), bytes(range(32, 64)))
    cookie = RING.seal(keys, bytes(16))
    request = nts.build_request(NtpHeader(transmit_ts=7), b"u" * 32, cookie, 0,
                                Aead(AeadId.AES_SIV_CMAC_256, keys.c2s), bytes(16))
    r = Responder(RING, StatsTable().row(), random.randbytes)
    assert r.handle(request, "192.0.2.1", NOW, lambda: NOW) is not None
    (session,) = r._sessions.values()
    layout = responder_module._parse_nts(request, len(request))
    assert layout is not None
    return request, layout, session.packed


def test_nts_reply_refuses_what_does_not_fit() -> None:
    request, layout, packed = _verified_request()
    if not ACCELERATED:  # not built, or NTSPY_NO_ACCEL: the responder does it in Python
        assert packed is None
        return
    assert accel is not None and packed is not None
    head, rnd = bytes(48), bytes(32)
    reply = accel.nts_reply(request, head, layout, packed, 1, rnd)
    assert reply is not None and len(reply) == len(request)
    # A request that does not verify, or whose ciphertext is shorter than a
    # SIV, gets None (the responder answers it with a NAK).
    tampered = request[:-1] + bytes([request[-1] ^ 1])
    assert accel.nts_reply(tampered, head, layout, packed, 1, rnd) is None
    short = (*layout[:7], layout[6] + 8)
    assert accel.nts_reply(request, head, short, packed, 1, rnd) is None
    n = len(request)
    bad_calls: list[tuple[type[Exception], tuple[object, ...]]] = [
        (TypeError, (request, head, layout, packed, 1)),
        (TypeError, (request.decode("latin-1"), head, layout, packed, 1, rnd)),
        (ValueError, (request, head[:47], layout, packed, 1, rnd)),
        (TypeError, (request, head, list(layout), packed, 1, rnd)),
        (ValueError, (request, head, (*layout[:7], n + 1), packed, 1, rnd)),
        (ValueError, (request, head, (*layout[:6], layout[7], layout[6]), packed, 1, rnd)),
        (ValueError, (request, head, (20, *layout[1:]), packed, 1, rnd)),
        (TypeError, (request, head, layout, packed[:9], 1, rnd)),
        (TypeError, (request, head, layout, (b"k", *packed[1:]), 1, rnd)),
        (ValueError, (request, head, layout, packed, 1, rnd[:31])),
        (ValueError, (request, head, layout, packed, 9, bytes(9 * 16 + 16))),
        (ValueError, (request, head, layout, packed, -1, rnd)),
        # two cookies do not fit in a request that carries one and no placeholder:
        # the answer would be longer than the question
        (ValueError, (request, head, layout, packed, 2, bytes(48))),
    ]
    for error, args in bad_calls:
        with pytest.raises(error):
            accel.nts_reply(*args)
    assert accel.nts_reply(request, head, layout, packed, 1, rnd) == reply
