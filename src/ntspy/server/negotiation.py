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
from ..proto.cookies import COOKIE_NONCE_LEN, CookieKeys, KeyRing, cookie_length
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
    cookies: int = 0  # New Cookie records in ``response``


def negotiate(
    records: Sequence[ke.Record],
    policy: KePolicy,
    keyring: KeyRing,
    export: Exporter,
    random_bytes: Callable[[int], bytes],
) -> KeOutcome:
    """The answer to one KE request: cookies, or the Error / refusal to send."""
    plan = plan_answer(records, policy)
    if isinstance(plan, KeOutcome):
        return plan
    return plan.answer(keyring, export, random_bytes)


@dataclass(frozen=True, slots=True)
class AnswerPlan:
    """Everything about a successful answer that follows from the request alone.

    Per exchange only the TLS-exported keys and the cookies are new; the
    records around the cookies are the same for every identical request.
    """

    aead_id: int
    key_length: int
    c2s_context: bytes
    s2c_context: bytes
    head: bytes  # Next Protocol and AEAD Algorithm records
    cookie_header: bytes  # the header of each New Cookie record (one length for all)
    tail: bytes  # Server, Port, record 1024 as needed, End of Message

    def answer(
        self, keyring: KeyRing, export: Exporter, random_bytes: Callable[[int], bytes]
    ) -> KeOutcome:
        c2s = export(ke.EXPORTER_LABEL, self.key_length, self.c2s_context)
        s2c = export(ke.EXPORTER_LABEL, self.key_length, self.s2c_context)
        # One call for all the nonces: each call of os.urandom is a system call.
        nonces = random_bytes(COOKIE_NONCE_LEN * COOKIES_PER_KE)
        cookies = keyring.seal_many(CookieKeys(self.aead_id, c2s, s2c), nonces)
        header = self.cookie_header
        body = b"".join([header + cookie for cookie in cookies])
        return KeOutcome(self.head + body + self.tail, aead_id=self.aead_id,
                         cookies=len(cookies))


def plan_answer(records: Sequence[ke.Record], policy: KePolicy) -> AnswerPlan | KeOutcome:
    """What to answer ``records``: a plan for cookies, or the final refusal."""
    try:
        request = ke.parse_client_request(records)
    except KeProtocolError as exc:
        return KeOutcome(ke.build_error(exc.code), exc.code, reason=str(exc))
    if ke.NextProtocol.NTPV4 not in request.next_protocols:
        return KeOutcome(ke.build_no_common_protocol_response(), reason="no common protocol")
    aead_id = ke.choose_aead(request.aeads, policy.aeads)
    if aead_id is None:
        return KeOutcome(ke.build_no_common_aead_response(), reason="no common AEAD")
    compliant = request.compliant_128gcm
    # The fixed records, cut from a response built around placeholder cookies
    # of the right length: the same bytes build_server_response makes.
    length = cookie_length(aead_id)
    template = ke.build_server_response(
        aead_id,
        [bytes(length)] * COOKIES_PER_KE,
        server=policy.ntp_server,
        port=policy.ntp_port if policy.ntp_port != NTP_PORT else None,
        compliant_128gcm=compliant,
    )
    record = ke.RECORD_HEADER_LEN + length
    head = 2 * (ke.RECORD_HEADER_LEN + 2)  # Next Protocol and AEAD, one u16 each
    if template[head : head + ke.RECORD_HEADER_LEN] != ke.record_header(
        ke.RecordType.NEW_COOKIE, length
    ):  # pragma: no cover - build_server_response puts the cookies third
        raise AssertionError("unexpected KE response layout")
    return AnswerPlan(
        aead_id=aead_id,
        key_length=info(aead_id).key_length,
        c2s_context=ke.exporter_context_for(aead_id, False, compliant),
        s2c_context=ke.exporter_context_for(aead_id, True, compliant),
        head=template[:head],
        cookie_header=template[head : head + ke.RECORD_HEADER_LEN],
        tail=template[head + record * COOKIES_PER_KE :],
    )


class Negotiator:
    """:func:`negotiate` for whole request messages, remembering its decisions.

    Clients of one kind send byte for byte the same request every time, so
    the plan (or refusal) for a request is kept, keyed by its bytes: a
    repeated request skips parsing and record building.  At most
    ``max_plans`` requests are remembered; when full the memory starts over,
    so clients sending many different requests only make it slower.
    """

    MAX_CACHED_REQUEST = 1024  # bytes; longer requests are planned every time

    def __init__(
        self,
        policy: KePolicy,
        keyring: KeyRing,
        random_bytes: Callable[[int], bytes],
        max_plans: int = 64,
    ) -> None:
        self.policy = policy
        self.keyring = keyring
        self.random_bytes = random_bytes
        self.max_plans = max_plans
        self._plans: dict[bytes, AnswerPlan | KeOutcome] = {}

    def answer(self, message: bytes, export: Exporter) -> KeOutcome:
        """The answer to one whole request message (it must end with End of Message).

        Raises :class:`KeProtocolError` when ``message`` is not a well-formed
        KE message (truncated, oversized, bytes after End of Message): the
        caller answers with that Error code.
        """
        plans = self._plans
        plan = plans.get(message)
        if plan is None:
            reader = ke.RecordReader()
            records = reader.feed(message)
            reader.eof()  # raises unless the message was complete
            plan = plan_answer(records, self.policy)
            if len(message) <= self.MAX_CACHED_REQUEST:
                if len(plans) >= self.max_plans:
                    plans.clear()
                plans[message] = plan
        if isinstance(plan, KeOutcome):
            return plan
        return plan.answer(self.keyring, export, self.random_bytes)
