"""Server master keys and stateless cookies."""

from __future__ import annotations

import os

import pytest

from ntspy.errors import AuthenticationFailure, MalformedPacket
from ntspy.proto.aead import AeadId
from ntspy.proto.cookies import CookieKeys, KeyRing, MasterKey, cookie_length

KEYS = CookieKeys(AeadId.AES_SIV_CMAC_256, bytes(32), bytes(range(32)))


def key(i: int, created: int) -> MasterKey:
    return MasterKey(i, os.urandom(32), created)


def test_cookie_lengths_are_multiples_of_four() -> None:
    for aead_id in AeadId:
        assert cookie_length(aead_id) % 4 == 0
    assert cookie_length(AeadId.AES_SIV_CMAC_256) == 104
    assert cookie_length(AeadId.AES_128_GCM_SIV) == 72


def test_cookies_survive_rotations_up_to_the_ring_size() -> None:
    ring = KeyRing([key(1, 0)], kept=3)
    old = ring.seal(KEYS, os.urandom(16))
    ring.add(key(2, 10))
    ring.add(key(3, 20))
    assert ring.open(old) == KEYS
    ring.add(key(4, 30))
    with pytest.raises(AuthenticationFailure, match="unknown master key"):
        ring.open(old)
    assert [k.key_id for k in ring.keys] == [4, 3, 2]


def test_same_keys_make_unlinkable_cookies() -> None:
    ring = KeyRing([key(1, 0)])
    a, b = ring.seal(KEYS, os.urandom(16)), ring.seal(KEYS, os.urandom(16))
    assert a != b and a[4:] != b[4:]


def test_seal_many_makes_the_cookies_seal_makes() -> None:
    ring = KeyRing([key(1, 0)])
    nonces = os.urandom(16 * 8)
    many = ring.seal_many(KEYS, nonces)
    assert many == [ring.seal(KEYS, nonces[i : i + 16]) for i in range(0, 128, 16)]
    assert all(ring.open(c) == KEYS for c in many) and len(set(many)) == 8
    for bad in (b"", os.urandom(15), os.urandom(33)):
        with pytest.raises(ValueError, match="16 bytes each"):
            ring.seal_many(KEYS, bad)


def test_due_for_rotation() -> None:
    ring = KeyRing([key(1, 100)])
    assert not ring.due(150, 100)
    assert ring.due(200, 100)
    assert not ring.due(10**9, 0)  # 0 = never rotate
    assert KeyRing().due(0, 0)  # an empty ring always needs a key


def test_garbage_cookies() -> None:
    ring = KeyRing([key(1, 0)])
    with pytest.raises(MalformedPacket):
        ring.open(b"\x00\x00\x00\x01")
    cookie = bytearray(ring.seal(KEYS, os.urandom(16)))
    for i in range(len(cookie)):
        cookie[i] ^= 0x80
        with pytest.raises(AuthenticationFailure):
            ring.open(bytes(cookie))
        cookie[i] ^= 0x80


def test_duplicate_key_id_refused() -> None:
    ring = KeyRing([key(1, 0)])
    with pytest.raises(ValueError):
        ring.add(key(1, 5))
