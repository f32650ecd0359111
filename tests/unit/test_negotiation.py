"""NTS-KE negotiation: the remembering Negotiator answers exactly what negotiate() answers."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from ntspy.errors import KeProtocolError
from ntspy.proto import ke
from ntspy.proto.aead import AeadId
from ntspy.proto.cookies import MASTER_KEY_LEN, KeyRing, MasterKey
from ntspy.server.negotiation import COOKIES_PER_KE, KePolicy, Negotiator, negotiate

RING = KeyRing([MasterKey(7, bytes(range(MASTER_KEY_LEN)), 0)])
ALL = [AeadId.AES_SIV_CMAC_256, AeadId.AES_128_GCM_SIV, AeadId.AES_SIV_CMAC_512]


def export(label: bytes, length: int, context: bytes) -> bytes:
    """A stand-in for the TLS exporter: distinct keys per context."""
    return hashlib.shake_256(label + context).digest(length)


REQUESTS = {
    "siv": ke.build_client_request([AeadId.AES_SIV_CMAC_256]),
    "preference": ke.build_client_request([AeadId.AES_SIV_CMAC_512, AeadId.AES_SIV_CMAC_256]),
    "gcm-siv-compliant": ke.build_client_request([AeadId.AES_128_GCM_SIV], compliant_128gcm=True),
    "gcm-siv-old-chrony": ke.build_client_request([AeadId.AES_128_GCM_SIV]),
    "asks-server-port": ke.build_client_request([15], server="ntp.example", port=4123),
    "unknown-critical": ke.encode_record(0x1234, b"x", critical=True)
    + ke.build_client_request([15]),
    "no-ntpv4": ke.encode_record(ke.RecordType.NEXT_PROTOCOL, b"\x80\x00", critical=True)
    + ke.encode_record(ke.RecordType.AEAD_ALGORITHM, b"\x00\x0f", critical=True)
    + ke.encode_record(ke.RecordType.END_OF_MESSAGE, critical=True),
    "no-common-aead": ke.build_client_request([AeadId.AES_128_GCM_SIV]),
}
POLICIES = [
    KePolicy(ALL),
    KePolicy([AeadId.AES_SIV_CMAC_256], ntp_server="time.example", ntp_port=11123),
]


@pytest.mark.parametrize("policy", POLICIES, ids=["defaults", "server-and-port"])
@pytest.mark.parametrize("name", list(REQUESTS))
def test_negotiator_answers_what_negotiate_answers(name: str, policy: KePolicy) -> None:
    request = REQUESTS[name]
    negotiator = Negotiator(policy, RING, random.Random(1).randbytes)
    expected_random = random.Random(1).randbytes
    records = ke.parse_records(request)
    for _ in range(3):  # planned once, then remembered
        got = negotiator.answer(request, export)
        want = negotiate(records, policy, RING, export, expected_random)
        assert got == want
    if want.aead_id is None:
        assert want.error_code is not None or want.reason
        return
    # The answer is a well-formed response carrying keys the client derives too.
    response = ke.parse_server_response(ke.parse_records(got.response), list(ALL))
    assert response.aead == want.aead_id
    assert len(response.cookies) == COOKIES_PER_KE
    compliant = response.compliant_128gcm
    c2s = export(ke.EXPORTER_LABEL, len(RING.open(response.cookies[0]).c2s),
                 ke.exporter_context_for(response.aead, False, compliant))
    assert all(RING.open(c).c2s == c2s for c in response.cookies)
    # ...byte for byte what build_server_response makes of those cookies.
    assert got.response == ke.build_server_response(
        response.aead, response.cookies,
        server=policy.ntp_server,
        port=policy.ntp_port if policy.ntp_port != 123 else None,
        compliant_128gcm=compliant,
    )


def test_each_answer_has_fresh_cookies_for_its_own_keys() -> None:
    negotiator = Negotiator(KePolicy(ALL), RING, os.urandom)
    request = REQUESTS["siv"]
    first = ke.parse_server_response(
        ke.parse_records(negotiator.answer(request, export).response), ALL)

    def other(label: bytes, length: int, context: bytes) -> bytes:
        return export(label + b"!", length, context)

    second = ke.parse_server_response(
        ke.parse_records(negotiator.answer(request, other).response), ALL)
    assert not set(first.cookies) & set(second.cookies)
    assert RING.open(first.cookies[0]).c2s != RING.open(second.cookies[0]).c2s


def test_incomplete_or_oversized_messages_are_refused_not_remembered() -> None:
    negotiator = Negotiator(KePolicy(ALL), RING, os.urandom)
    request = REQUESTS["siv"]
    for bad in (b"", request[:-4], request + b"\x00", request[:-4] + bytes(70000)):
        with pytest.raises(KeProtocolError):
            negotiator.answer(bad, export)
    assert not negotiator._plans


def test_memory_is_bounded() -> None:
    negotiator = Negotiator(KePolicy(ALL), RING, os.urandom, max_plans=16)
    for port in range(1, 200):  # 199 different requests
        negotiator.answer(ke.build_client_request([15], port=port), export)
        assert len(negotiator._plans) <= 16
    huge = ke.encode_record(0x0123, bytes(1500)) + REQUESTS["siv"]  # non-critical filler
    negotiator.answer(huge, export)
    assert huge not in negotiator._plans
