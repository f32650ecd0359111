"""AEAD registry: published test vectors and the properties NTS relies on."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from ntspy.errors import AuthenticationFailure
from ntspy.proto.aead import AEADS, Aead, AeadId, gcm_siv_available, info, supported

h = bytes.fromhex


def test_rfc5297_a1_deterministic_siv() -> None:
    key = h("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    out = AESSIV(key).encrypt(h("112233445566778899aabbccddee"),
                              [h("101112131415161718191a1b1c1d1e1f2021222324252627")])
    assert out == h("85632d07c6e8f37f950acd320a2ecc93" "40c02b9690c4dc04daef7f6afe5c")


def test_rfc5297_a2_nonce_is_the_last_associated_data() -> None:
    key = h("7f7e7d7c7b7a79787776757473727170404142434445464748494a4b4c4d4e4f")
    ad1 = h("00112233445566778899aabbccddeeffdeaddadadeaddadaffeeddccbbaa99887766554433221100")
    ad2 = h("102030405060708090a0")
    nonce = h("09f911029d74e35bd84156c5635688c0")
    pt = h("7468697320697320736f6d6520706c61696e7465787420746f20"
           "656e6372797074207573696e67205349562d414553")
    expected = h("7bdb6e3b432667eb06f4d14bff2fbd0f"
                 "cb900f2fddbe404326601965c889bf17dba77ceb094fa663b7a3f748ba8af829ea64ad544a272e9c485b62a3fd5c0d")
    assert AESSIV(key).encrypt(pt, [ad1, ad2, nonce]) == expected
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
