"""AEAD registry: published test vectors and the properties NTS relies on."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from ntspy.errors import AuthenticationFailure
from ntspy.proto.aead import AEADS, Aead, AeadId, gcm_siv_available, info, supported
from tests.unit import siv_vectors as v

h = bytes.fromhex


def test_rfc5297_a2_nonce_is_the_last_associated_data() -> None:
    # (tests/unit/test_backends.py runs the vectors themselves through every AES-SIV)
    key, ad1, nonce, pt = v.A2_KEY, v.A2_AD1, v.A2_NONCE, v.A2_PT
    assert AESSIV(key).encrypt(pt, [ad1, v.A2_AD2, nonce]) == v.A2_CT
    # Our wrapper puts the nonce last after the (single) associated data, as RFC 8915 s5.6 says.
    ours = Aead(AeadId.AES_SIV_CMAC_256, key)
    assert ours.seal(nonce, pt, ad1) == AESSIV(key).encrypt(pt, [ad1, nonce])


def test_rfc8452_gcm_siv_vector() -> None:
    if not gcm_siv_available():
        assert AeadId.AES_128_GCM_SIV not in supported()
        return
    a = Aead(AeadId.AES_128_GCM_SIV, h("01000000000000000000000000000000"))
    out = a.seal(h("030000000000000000000000"), h("0200000000000000"), h("01"))
    assert out == h("1e6daba35669f427" "3b0a1a2560969cdf790d99759abd1508")
    assert a.open(h("030000000000000000000000"), out, h("01")) == h("0200000000000000")


def test_key_lengths_match_the_registry() -> None:
    assert {i: m.key_length for i, m in AEADS.items()} == {15: 32, 16: 48, 17: 64, 30: 16}


@pytest.mark.parametrize("aead_id", list(AeadId))
def test_empty_plaintext_seals_and_opens(aead_id: AeadId) -> None:
    # An NTS client request encrypts nothing: the AEAD must accept that.
    if aead_id == AeadId.AES_128_GCM_SIV and not gcm_siv_available():
        return
    meta = info(aead_id)
    a = Aead(aead_id, bytes(range(meta.key_length)))
    nonce = bytes(meta.nonce_length)
    sealed = a.seal(nonce, b"", b"header")
    assert len(sealed) == meta.tag_length
    assert a.open(nonce, sealed, b"header") == b""
    for bad_ad in (b"headeR", b""):
        with pytest.raises(AuthenticationFailure):
            a.open(nonce, sealed, bad_ad)
    flipped = bytes([sealed[0] ^ 1]) + sealed[1:]
    with pytest.raises(AuthenticationFailure):
        a.open(nonce, flipped, b"header")


def test_wrong_key_length_is_refused() -> None:
    with pytest.raises(ValueError):
        Aead(AeadId.AES_SIV_CMAC_256, bytes(16))


def test_mandatory_algorithm_always_supported() -> None:
    assert AeadId.AES_SIV_CMAC_256 in supported()
