"""RFC 5297 appendix A's AES-SIV test vectors, shared by the AEAD and backend tests."""

from __future__ import annotations

h = bytes.fromhex

# A.1: deterministic, one associated-data component
A1_KEY = h("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
A1_AD = h("101112131415161718191a1b1c1d1e1f2021222324252627")
A1_PT = h("112233445566778899aabbccddee")
A1_CT = h("85632d07c6e8f37f950acd320a2ecc93" "40c02b9690c4dc04daef7f6afe5c")

# A.2: two components and a nonce, which NTS always puts last
A2_KEY = h("7f7e7d7c7b7a79787776757473727170404142434445464748494a4b4c4d4e4f")
A2_AD1 = h("00112233445566778899aabbccddeeffdeaddadadeaddadaffeeddccbbaa99887766554433221100")
A2_AD2 = h("102030405060708090a0")
A2_NONCE = h("09f911029d74e35bd84156c5635688c0")
A2_PT = h("7468697320697320736f6d6520706c61696e7465787420746f20"
          "656e6372797074207573696e67205349562d414553")
A2_CT = h("7bdb6e3b432667eb06f4d14bff2fbd0f"
          "cb900f2fddbe404326601965c889bf17dba77ceb094fa663b7a3f748ba8af829ea64ad544a272e9c485b62a3fd5c0d")
