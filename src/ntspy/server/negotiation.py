"""NTS-KE server negotiation (RFC 8915 s4), sans-I/O.

Records in, response bytes out. The TLS exporter is handed in as a function
so this runs the same under a real TLS session, in tests and in benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import KeProtocolError
from ..proto import ke
from ..proto.aead import info
from ..proto.cookies import COOKIE_NONCE_LEN, CookieKeys, KeyRing
from ..proto.ntp import NTP_PORT

COOKIES_PER_KE = 8
Exporter = Callable[[bytes, int, bytes], bytes]


@dataclass(slots=True)
class KePolicy:
    """What the operator configured for NTS-KE answers."""

    aeads: Sequence[int]  # allowed, in the server's order (``ntsaeads``)
    ntp_server: str | None = None  # ``ntsntpserver``
    ntp_port: int = NTP_PORT  # ``port``; announced only when not 123


@dataclass(slots=True)
class KeOutcome:
    response: bytes
    error_code: int | None = None  # set when we answered with an Error record
    aead_id: int | None = None
    reason: str = ""


def negotiate(
    records: Sequence[ke.Record],
    policy: KePolicy,
    keyring: KeyRing,
    export: Exporter,
    random_bytes: Callable[[int], bytes],
) -> KeOutcome:
    try:
        request = ke.parse_client_request(records)
    except KeProtocolError as exc:
        return KeOutcome(ke.build_error(exc.code), exc.code, reason=str(exc))
    if ke.NextProtocol.NTPV4 not in request.next_protocols:
        return KeOutcome(ke.build_no_common_protocol_response(), reason="no common protocol")
    aead_id = ke.choose_aead(request.aeads, policy.aeads)
    if aead_id is None:
        return KeOutcome(ke.build_no_common_aead_response(), reason="no common AEAD")
    key_len = info(aead_id).key_length
    compliant = request.compliant_128gcm
    c2s = export(ke.EXPORTER_LABEL, key_len, ke.exporter_context_for(aead_id, False, compliant))
    s2c = export(ke.EXPORTER_LABEL, key_len, ke.exporter_context_for(aead_id, True, compliant))
    keys = CookieKeys(aead_id, c2s, s2c)
    # One call for all the nonces: each call of os.urandom is a system call.
    cookies = keyring.seal_many(keys, random_bytes(COOKIE_NONCE_LEN * COOKIES_PER_KE))
    response = ke.build_server_response(
        aead_id,
        cookies,
        server=policy.ntp_server,
        port=policy.ntp_port if policy.ntp_port != NTP_PORT else None,
        compliant_128gcm=compliant,
    )
    return KeOutcome(response, aead_id=aead_id)
