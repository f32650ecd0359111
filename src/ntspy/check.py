"""``ntspy check HOST``: an NTS server's health as its clients see it, one line per check.

Two halves, as everywhere in ntspy.  The verdicts are pure functions: facts
(certificates, what NTS-KE returned, packet sizes, round trips) and the current
time go in, a :class:`Check` (OK, WARN, FAIL; INFO and SKIP for lines that
judge nothing) comes out, so the thresholds are tested without a network.
:func:`gather` is the thin runner that collects the facts with the client's
own code: one TLS handshake that records every certificate problem instead of
stopping at the first, :func:`~ntspy.client.ke.key_exchange` once with our
usual offer and once per AEAD alone, then NTS requests built and verified by
:mod:`ntspy.proto.nts` (one cookie; one cookie and seven placeholders; a bogus
cookie, which must earn a NAK).

Exit status, Nagios-style: 0 all OK, 1 some WARN, 2 some FAIL.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from cryptography import x509
from OpenSSL import SSL, crypto

from .client.ke import KeResult, key_exchange
from .client.session import PlainSession
from .errors import (
    KeError,
    KeProtocolError,
    KeServerError,
    NtsError,
    NtsNakReceived,
    format_duration,
)
from .net.dns import is_ip_address
from .net.tls.names import certificate_matches
from .net.tls.ntske import TLS13_NAME
from .net.tls.trust import TrustConfig, VerifyError, client_context
from .net.udp import UdpClient
from .proto import aead as aead_mod
from .proto import nts
from .proto.ke import DEFAULT_KE_PORT
from .proto.ntp import (
    NS_PER_SECOND,
    Leap,
    Mode,
    NtpHeader,
    ntp_to_unix_ns,
    offset_delay_ns,
)

PROG = "ntspy"

EXPIRY_WARN_DAYS = 14
"""Fewer days left than this on a certificate is a warning: time to renew."""
PACKET_LIMIT = 200
"""Octets an NTS request with one cookie should stay within (chrony's aim): some
networks drop or rate-limit longer NTP packets."""
KE_SLOW = 1.0
"""Seconds of NTS-KE beyond which clients start to notice (a warning)."""
FULL_JAR = 8
"""Cookies a client keeps (chrony, ntpd-rs, ntspy): what a server should hand out."""
CHECKED_AEADS = (
    aead_mod.AeadId.AES_SIV_CMAC_256,
    aead_mod.AeadId.AES_SIV_CMAC_384,
    aead_mod.AeadId.AES_SIV_CMAC_512,
    aead_mod.AeadId.AES_128_GCM_SIV,
)
MANDATORY_AEAD = aead_mod.AeadId.AES_SIV_CMAC_256  # RFC 8915 s5.1
_PLACEHOLDERS = 7  # a client refilling its jar after spending one cookie
_DAY = timedelta(days=1)


class Status(enum.Enum):
    OK = "OK"
    INFO = "INFO"  # a fact, no judgement
    SKIP = "SKIP"  # not tested (and why)
    WARN = "WARN"
    FAIL = "FAIL"

    @property
    def severity(self) -> int:
        """What this line adds to the exit status."""
        return {Status.WARN: 1, Status.FAIL: 2}.get(self, 0)


@dataclass(slots=True)
class Check:
    """One line of the report: ``name`` is a stable id for scripts."""

    name: str
    status: Status
    text: str
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.value, "text": self.text, **self.data}


def exit_code(checks: Sequence[Check]) -> int:
    """0 healthy, 1 warnings, 2 failures."""
    return max((c.status.severity for c in checks), default=0)


# ---------------------------------------------------------------------------
# facts


@dataclass(slots=True)
class VerifyProblem:
    """One X509_V_ERR_* OpenSSL reported while verifying the server's chain."""

    code: int
    depth: int
    subject: str
    issuer: str


@dataclass(slots=True)
class TlsFacts:
    """The TLS handshake as a client saw it, every verification problem included."""

    version: str = ""
    chain: list[x509.Certificate] = field(default_factory=list)  # as sent, leaf first
    verified_root: str = ""  # the trust anchor the chain was verified up to, if any
    problems: list[VerifyProblem] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""  # the handshake failed (then nothing else here is known)


@dataclass(slots=True)
class KeOutcome:
    """One NTS-KE: its result or why it failed, and how long it took."""

    result: KeResult | None = None
    error: KeError | None = None
    seconds: float = 0.0


@dataclass(slots=True)
class Exchange:
    """One authenticated NTP exchange (or its failure)."""

    placeholders: int
    request_len: int
    response_len: int = 0
    delay: float = 0.0
    offset: float = 0.0
    stratum: int = 0
    cookies: int = 0  # new cookies the response carried
    error: str = ""


@dataclass(slots=True)
class Facts:
    """Everything :func:`gather` learnt about one server."""

    host: str
    ke_port: int
    server_name: str
    tls: TlsFacts
    ke: KeOutcome
    aeads: dict[int, KeOutcome | None] = field(default_factory=dict)  # None: not tested
    exchanges: list[Exchange] = field(default_factory=list)
    nak: str = ""  # "nak", "authenticated", "silent", "skipped" or an error
    plain_ntp: str = ""  # when NTS got no answer: how plain NTP fared ("" untried)
    skipped: str = ""  # why the NTS-KE and NTP checks were not run, if they were not
    relaxed_time: bool = False  # NTS-KE ran ignoring certificate dates (to test the rest)


# ---------------------------------------------------------------------------
# verdicts (pure)

_CHAIN_CODES = frozenset({
    VerifyError.UNABLE_TO_GET_ISSUER_CERT,
    VerifyError.UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
    VerifyError.UNABLE_TO_VERIFY_LEAF_SIGNATURE,
})
_UNTRUSTED_CODES = frozenset({
    VerifyError.DEPTH_ZERO_SELF_SIGNED_CERT,
    VerifyError.SELF_SIGNED_CERT_IN_CHAIN,
    VerifyError.CERT_UNTRUSTED,
    VerifyError.CERT_REJECTED,
})
_TIME_CODES = frozenset({VerifyError.CERT_HAS_EXPIRED, VerifyError.CERT_NOT_YET_VALID})
_NAME_CODES = frozenset({VerifyError.HOSTNAME_MISMATCH, VerifyError.IP_ADDRESS_MISMATCH})


def _short(seconds: float) -> str:
    """A measured duration: ``1.24 s``, ``12.3 ms``, ``41 us``."""
    for scale, unit in ((1.0, "s"), (1e-3, "ms")):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-6:.0f} us"


def _when(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def check_tls_version(tls: TlsFacts) -> Check:
    if tls.error:
        return Check("tls-version", Status.FAIL, f"TLS handshake failed: {tls.error}")
    if tls.version != TLS13_NAME:
        return Check("tls-version", Status.FAIL,
                     f"TLS version {tls.version}: NTS-KE requires TLS 1.3 (RFC 8915 s4)")
    return Check("tls-version", Status.OK, f"TLS version {tls.version}",
                 {"version": tls.version})


def check_subject(chain: Sequence[x509.Certificate]) -> Check:
    if not chain:
        return Check("cert-subject", Status.FAIL, "the server sent no certificate")
    leaf = chain[0]
    subject, issuer = leaf.subject.rfc4514_string(), leaf.issuer.rfc4514_string()
    return Check("cert-subject", Status.INFO,
                 f"certificate subject {subject or '(empty)'}, issued by {issuer}",
                 {"subject": subject, "issuer": issuer})


def check_chain(tls: TlsFacts) -> Check:
    """Whether the chain the server sends leads to a trusted root on its own."""
    sent = len(tls.chain)
    what = f"{sent} certificate{'s' if sent != 1 else ''} sent"
    for p in tls.problems:
        if p.code in _CHAIN_CODES:
            return Check(
                "cert-chain", Status.FAIL,
                f"certificate chain incomplete ({what}): {p.subject} is issued by "
                f"{p.issuer}, which the server does not send and the trust store does "
                "not hold (missing intermediate certificate? serve the full chain)",
                {"sent": sent, "missing_issuer": p.issuer})
        if p.code in _UNTRUSTED_CODES:
            return Check(
                "cert-chain", Status.FAIL,
                f"certificate chain not trusted ({what}): it ends in {p.subject}, which "
                "is not a trusted CA (system store, or --ca)",
                {"sent": sent})
    others = [p for p in tls.problems if p.code not in _TIME_CODES | _NAME_CODES]
    if others:
        p = others[0]
        return Check("cert-chain", Status.FAIL,
                     f"certificate chain does not verify ({what}): OpenSSL error {p.code} "
                     f"at depth {p.depth} ({p.subject})", {"sent": sent, "code": p.code})
    root = f" up to {tls.verified_root}" if tls.verified_root else ""
    return Check("cert-chain", Status.OK, f"certificate chain complete ({what}, verified{root})",
                 {"sent": sent})


def check_expiry(chain: Sequence[x509.Certificate], now: datetime) -> Check:
    """Days until the first certificate of the chain expires."""
    if not chain:
        return Check("cert-expiry", Status.SKIP, "certificate dates not known")
    for cert in chain:
        if now < cert.not_valid_before_utc:
            return Check("cert-expiry", Status.FAIL,
                         f"certificate {cert.subject.rfc4514_string()} is not valid until "
                         f"{_when(cert.not_valid_before_utc)} (wrong clock on the server's CA?)",
                         {"days_left": None})
    first = min(chain, key=lambda c: c.not_valid_after_utc)
    after = first.not_valid_after_utc
    whose = "" if first is chain[0] else f" (CA certificate {first.subject.rfc4514_string()})"
    if after <= now:
        ago = (now - after) // _DAY
        return Check("cert-expiry", Status.FAIL,
                     f"certificate expired {ago} day{'s' if ago != 1 else ''} ago, "
                     f"on {_when(after)}{whose}", {"days_left": -ago - 1})
    days = (after - now) // _DAY
    text = f"certificate expires in {days} day{'s' if days != 1 else ''}, on {_when(after)}{whose}"
    if days < EXPIRY_WARN_DAYS:
        return Check("cert-expiry", Status.WARN, f"{text}: renew it",
                     {"days_left": days})
    return Check("cert-expiry", Status.OK, text, {"days_left": days})


def check_name(chain: Sequence[x509.Certificate], server_name: str) -> Check:
    if not chain:
        return Check("cert-name", Status.SKIP, "certificate name not known")
    names = _names(chain[0])
    listed = ", ".join(names) or "no subjectAltName"
    if certificate_matches(chain[0], server_name):
        return Check("cert-name", Status.OK, f"certificate matches {server_name} ({listed})",
                     {"names": names})
    return Check("cert-name", Status.FAIL,
                 f"certificate does not match {server_name}: it is for {listed}",
                 {"names": names})


def check_aead(aead_id: int, outcome: KeOutcome | None, why_not: str = "") -> Check:
    """Whether the server accepts ``aead_id`` offered alone."""
    name = f"aead-{aead_id}"
    label = f"AEAD {aead_id} {aead_mod.info(aead_id).name}"
    if outcome is None:
        return Check(name, Status.SKIP, f"{label}: not tested ({why_not})")
    if outcome.result is not None:
        lengths = sorted({len(c) for c in outcome.result.cookies})
        return Check(name, Status.OK,
                     f"{label}: accepted ({len(outcome.result.cookies)} cookies of "
                     f"{'/'.join(map(str, lengths))} octets)",
                     {"accepted": True, "cookie_lengths": lengths})
    error = outcome.error
    refused = isinstance(error, KeServerError) or (
        isinstance(error, KeProtocolError) and "none of the AEAD" in str(error)
    )
    if not refused:
        return Check(name, Status.FAIL, f"{label}: NTS-KE failed: {error}", {"accepted": None})
    if aead_id == MANDATORY_AEAD:
        return Check(name, Status.FAIL,
                     f"{label}: not accepted, but every NTS server must (RFC 8915 s5.1)",
                     {"accepted": False})
    return Check(name, Status.INFO, f"{label}: not accepted (optional)", {"accepted": False})


def request_size(aead_id: int, cookie_len: int) -> int:
    """Octets of an NTS request carrying one cookie and no placeholder (RFC 8915 s5)."""
    key = aead_mod.Aead(aead_id, bytes(aead_mod.info(aead_id).key_length))
    nonce = bytes(key.nonce_length)
    return len(nts.build_request(NtpHeader(), bytes(nts.UNIQUE_ID_LEN), bytes(cookie_len), 0,
                                 key, nonce))


def check_cookies(ke: KeResult) -> Check:
    lengths = sorted({len(c) for c in ke.cookies})
    count = len(ke.cookies)
    text = (f"{count} cookie{'s' if count != 1 else ''} of {'/'.join(map(str, lengths))} "
            f"octets with {ke.aead_name} ({ke.aead_id}), chosen from our usual offer")
    data = {"count": count, "lengths": lengths, "aead": ke.aead_id}
    if count < FULL_JAR:
        return Check("cookies", Status.WARN,
                     f"{text}: clients keep {FULL_JAR}, fewer mean more NTS-KE", data)
    return Check("cookies", Status.OK, text, data)


def check_packet_size(ke: KeResult) -> Check:
    size = request_size(ke.aead_id, max(len(c) for c in ke.cookies))
    text = f"NTS request with one cookie: {size} octets"
    if size > PACKET_LIMIT:
        hint = (" (AES-128-GCM-SIV gives shorter cookies)"
                if ke.aead_id != aead_mod.AeadId.AES_128_GCM_SIV else "")
        return Check("packet-size", Status.WARN,
                     f"{text}, over {PACKET_LIMIT}: some networks drop long NTP packets{hint}",
                     {"octets": size})
    return Check("packet-size", Status.OK, f"{text}, within {PACKET_LIMIT}", {"octets": size})


def _target(ke: KeResult) -> str:
    return f"{ke.ntp_server} port {ke.ntp_port}"


def check_ntp(ke: KeResult, exchanges: Sequence[Exchange], plain_ntp: str = "") -> Check:
    """The first authenticated round trip, and its delay."""
    if not exchanges:
        return Check("ntp", Status.SKIP, "authenticated NTP not tested")
    first = exchanges[0]
    if first.error:
        tail = f"; plain NTP: {plain_ntp}" if plain_ntp else ""
        return Check("ntp", Status.FAIL,
                     f"authenticated NTP with {_target(ke)} failed: {first.error}{tail}")
    delay = _short(first.delay)
    return Check("ntp", Status.OK,
                 f"authenticated NTP with {_target(ke)}: delay {delay}, offset "
                 f"{'-' if first.offset < 0 else '+'}{_short(abs(first.offset))}, "
                 f"stratum {first.stratum}",
                 {"delay": first.delay, "offset": first.offset, "stratum": first.stratum})


def check_response_size(exchanges: Sequence[Exchange]) -> Check:
    """RFC 8915 s5.7: a response must never be longer than its request (no amplification)."""
    done = [e for e in exchanges if not e.error]
    if not done:
        return Check("response-size", Status.SKIP, "response sizes not known (no response)")
    sizes = ", ".join(f"{e.request_len} -> {e.response_len}" for e in done)
    data = {"exchanges": [[e.request_len, e.response_len] for e in done]}
    if any(e.response_len > e.request_len for e in done):
        return Check("response-size", Status.FAIL,
                     f"responses longer than requests (octets {sizes}): traffic amplification",
                     data)
    return Check("response-size", Status.OK,
                 f"responses never longer than requests (octets {sizes})", data)


def check_nak(outcome: str) -> Check:
    """A bogus cookie must earn an NTS NAK (RFC 8915 s5.7)."""
    if outcome == "nak":
        return Check("nak", Status.OK, "bogus cookie answered with an NTS NAK")
    if outcome == "authenticated":
        return Check("nak", Status.FAIL, "bogus cookie ACCEPTED: an authenticated answer came")
    if outcome == "silent":
        return Check("nak", Status.WARN,
                     "bogus cookie got no answer; an NTS NAK tells clients to run NTS-KE again")
    if outcome in ("", "skipped"):
        return Check("nak", Status.SKIP, "NAK not tested (no NTP answer to compare with)")
    return Check("nak", Status.FAIL, f"bogus cookie: {outcome}")


def check_records(ke: KeResult, exchanges: Sequence[Exchange]) -> Check:
    """What the Server/Port records say, and whether the NTP server they name answers."""
    parts = []
    if ke.server_record is not None:
        parts.append(f"Server {ke.server_record}")
    if ke.port_record is not None:
        parts.append(f"Port {ke.port_record}")
    said = (f"Server/Port records: {', '.join(parts)}" if parts
            else "no Server/Port records: NTP goes to the NTS-KE address, port 123")
    data = {"server": ke.server_record, "port": ke.port_record}
    if not exchanges:
        return Check("ntp-server", Status.INFO, said, data)
    if exchanges[0].error:
        return Check("ntp-server", Status.FAIL,
                     f"{said}; {_target(ke)} does not answer NTS requests", data)
    return Check("ntp-server", Status.OK, f"{said}; {_target(ke)} answers", data)


def check_ke_time(outcome: KeOutcome, tls_seconds: float) -> Check:
    if outcome.result is None:
        return Check("ke", Status.FAIL, f"NTS-KE failed: {outcome.error}")
    took = _short(outcome.seconds)
    tls = f" (TLS handshake {_short(tls_seconds)})" if tls_seconds else ""
    data = {"seconds": outcome.seconds}
    if outcome.seconds > KE_SLOW:
        return Check("ke", Status.WARN, f"NTS-KE took {took}{tls}: slow", data)
    return Check("ke", Status.OK, f"NTS-KE took {took}{tls}", data)


def verdicts(facts: Facts, now: datetime) -> list[Check]:
    """Every line of the report, in order."""
    tls = facts.tls
    checks = [check_tls_version(tls)]
    if not tls.error:
        checks += [
            check_subject(tls.chain),
            check_chain(tls),
            check_expiry(tls.chain, now),
            check_name(tls.chain, facts.server_name),
        ]
    if facts.skipped:
        checks.append(Check("nts", Status.SKIP, f"NTS-KE and NTP not tested: {facts.skipped}"))
        return checks
    if facts.relaxed_time:
        checks.append(Check("cert-time-ignored", Status.INFO,
                            "the checks below ran ignoring the certificate's dates"))
    for aead_id in CHECKED_AEADS:
        checks.append(check_aead(aead_id, facts.aeads.get(aead_id),
                                 "AES-GCM-SIV missing from this OpenSSL"))
    checks.append(check_ke_time(facts.ke, tls.seconds))
    ke = facts.ke.result
    if ke is None:
        return checks
    checks += [
        check_cookies(ke),
        check_packet_size(ke),
        check_records(ke, facts.exchanges),
        check_ntp(ke, facts.exchanges, facts.plain_ntp),
        check_response_size(facts.exchanges),
        check_nak(facts.nak),
    ]
    return checks


# ---------------------------------------------------------------------------
# the runner (I/O)


def _ssl_reason(error: SSL.Error) -> str:
    if error.args and isinstance(error.args[0], list):
        reasons = [str(e[-1]) for e in error.args[0] if isinstance(e, tuple) and e]
        if reasons:
            return "; ".join(reasons)
    return str(error) or type(error).__name__


async def probe_tls(host: str, port: int, server_name: str, trust: TrustConfig,
                    timeout: float) -> TlsFacts:
    """One TLS 1.3 handshake (ALPN ntske/1) that notes every verification problem
    instead of aborting on the first, then hangs up without a KE request."""
    facts = TlsFacts()
    ctx = client_context(trust)

    def note(conn: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int) -> bool:
        if not ok:
            c = cert.to_cryptography()
            facts.problems.append(VerifyProblem(code, depth, c.subject.rfc4514_string(),
                                                c.issuer.rfc4514_string()))
        return True  # go on: the report wants every problem, and the chain

    ctx.set_verify(SSL.VERIFY_PEER, note)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    if not is_ip_address(server_name.strip("[]")):
        conn.set_tlsext_host_name(server_name.rstrip(".").encode("idna"))
    loop = asyncio.get_running_loop()
    start = loop.time()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            while True:
                try:
                    conn.do_handshake()
                    break
                except SSL.WantReadError:
                    pass
                writer.write(_pending(conn))
                await writer.drain()
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("closed the connection during the TLS handshake")
                conn.bio_write(data)
        facts.seconds = loop.time() - start
        facts.version = conn.get_protocol_version_name()
        facts.chain = list(conn.get_peer_cert_chain(as_cryptography=True) or [])
        verified = conn.get_verified_chain(as_cryptography=True)
        if verified and not facts.problems:
            facts.verified_root = verified[-1].subject.rfc4514_string()
    except TimeoutError:
        facts.error = f"no answer within {format_duration(timeout)}"
    except SSL.Error as exc:
        facts.error = _ssl_reason(exc)
    except OSError as exc:
        facts.error = f"{host} port {port}: {exc.strerror or exc}"
    finally:
        if writer is not None:
            writer.close()
    return facts


def _pending(conn: SSL.Connection) -> bytes:
    out = b""
    while True:
        try:
            chunk = conn.bio_read(65536)
        except SSL.WantReadError:
            return out
        if not chunk:
            return out
        out += chunk




async def _timed_ke(host: str, port: int, trust: TrustConfig, server_name: str,
                    timeout: float, aeads: Sequence[int] | None = None) -> KeOutcome:
    start = time.perf_counter()
    try:
        result = await key_exchange(host, port, trust=trust, aeads=aeads,
                                    server_name=server_name, timeout=timeout)
    except KeError as exc:
        return KeOutcome(error=exc, seconds=time.perf_counter() - start)
    return KeOutcome(result=result, seconds=time.perf_counter() - start)


async def _nts_exchange(udp: UdpClient, ke: KeResult, cookie: bytes, placeholders: int,
                        timeout: float) -> Exchange:
    """One NTS request with ``cookie``; NtsNakReceived escapes for the caller."""
    c2s, s2c = aead_mod.Aead(ke.aead_id, ke.c2s), aead_mod.Aead(ke.aead_id, ke.s2c)
    xmt = int.from_bytes(os.urandom(8), "big")
    header = NtpHeader(leap=Leap.NONE, version=4, mode=Mode.CLIENT, poll=6, precision=-20,
                       transmit_ts=xmt)
    unique_id = os.urandom(nts.UNIQUE_ID_LEN)
    request = nts.build_request(header, unique_id, cookie, placeholders, c2s,
                                os.urandom(c2s.nonce_length))
    exchange = Exchange(placeholders, len(request))
    loop = asyncio.get_running_loop()
    t1 = udp.send(request)
    deadline = loop.time() + timeout
    last = ""
    while (left := deadline - loop.time()) > 0:
        try:
            received = await udp.recv(left)
        except ConnectionRefusedError:
            exchange.error = "refused (ICMP port unreachable: nothing listens there)"
            return exchange
        if received is None:
            break
        try:
            verified = nts.verify_response(received.data, unique_id, xmt, s2c)
        except NtsNakReceived:
            raise
        except NtsError as exc:
            last = f"; {exc}"
            continue
        h = verified.header
        t2, t3 = ntp_to_unix_ns(h.receive_ts, t1), ntp_to_unix_ns(h.transmit_ts, t1)
        offset, delay = offset_delay_ns(t1, t2, t3, received.rx_ns)
        exchange.response_len = len(received.data)
        exchange.delay, exchange.offset = delay / NS_PER_SECOND, offset / NS_PER_SECOND
        exchange.stratum, exchange.cookies = h.stratum, len(verified.cookies)
        return exchange
    exchange.error = (f"no valid response within {format_duration(timeout)}{last}"
                      if last else
                      f"no response within {format_duration(timeout)} (UDP blocked or dropped?)")
    return exchange


async def _plain_ntp(host: str, port: int, timeout: float) -> str:
    try:
        with PlainSession(host, port, timeout=timeout) as session:
            m = await session.measure()
    except NtsError as exc:
        return f"no answer either ({exc})"
    return f"answers unauthenticated (stratum {m.stratum}): NTS requests are dropped or broken"


async def _ntp_checks(facts: Facts, timeout: float) -> None:
    ke = facts.ke.result
    assert ke is not None
    cookies = list(ke.cookies)
    try:
        udp = await UdpClient.open(ke.ntp_server, ke.ntp_port)
    except OSError as exc:
        facts.exchanges.append(Exchange(0, 0, error=f"cannot reach {_target(ke)}: "
                                                    f"{exc.strerror or exc}"))
        return
    try:
        for placeholders in (0, _PLACEHOLDERS):
            if not cookies:
                break
            try:
                exchange = await _nts_exchange(udp, ke, cookies.pop(0), placeholders, timeout)
            except NtsNakReceived:
                exchange = Exchange(placeholders, 0, error="NTS NAK for a fresh cookie")
            facts.exchanges.append(exchange)
            if exchange.error:
                break
        if facts.exchanges and not facts.exchanges[0].error:
            bogus = os.urandom(len(ke.cookies[0]))
            try:
                answer = await _nts_exchange(udp, ke, bogus, 0, timeout)
                facts.nak = "silent" if answer.error else "authenticated"
            except NtsNakReceived:
                facts.nak = "nak"
        else:
            facts.nak = "skipped"
            if facts.exchanges and "no response" in facts.exchanges[0].error:
                facts.plain_ntp = await _plain_ntp(ke.ntp_server, ke.ntp_port, timeout)
    finally:
        udp.close()


async def gather(host: str, ke_port: int = DEFAULT_KE_PORT, trust: TrustConfig | None = None,
                 timeout: float = 3.0, server_name: str | None = None) -> Facts:
    """Collect every fact the verdicts need, from outside, as a client."""
    trust = trust or TrustConfig()
    name = server_name or host
    tls = await probe_tls(host, ke_port, name, trust, timeout)
    facts = Facts(host, ke_port, name, tls, KeOutcome())
    if tls.error:
        facts.skipped = "no TLS session"
        return facts
    codes = {p.code for p in tls.problems}
    if codes - _TIME_CODES:
        facts.skipped = "clients refuse this certificate (see above)"
        return facts
    if codes:
        # Only the dates are wrong: test the rest as a client with
        # nocerttimecheck would, and say so.
        trust = TrustConfig(trust.use_system_store, list(trust.extra), True, list(trust.pem))
        facts.relaxed_time = True
    facts.ke = await _timed_ke(host, ke_port, trust, name, timeout)
    for aead_id in CHECKED_AEADS:
        if aead_id == aead_mod.AeadId.AES_128_GCM_SIV and not aead_mod.gcm_siv_available():
            facts.aeads[aead_id] = None
            continue
        facts.aeads[aead_id] = await _timed_ke(host, ke_port, trust, name, timeout, [aead_id])
    if facts.ke.result is not None:
        await _ntp_checks(facts, timeout)
    return facts


# ---------------------------------------------------------------------------
# output and the command


def format_report(host: str, ke_port: int, checks: Sequence[Check], out: TextIO) -> None:
    code = exit_code(checks)
    print(f"ntspy check {host} port {ke_port}", file=out)
    for c in checks:
        print(f"{c.status.value:<5} {c.text}", file=out)
    worst = {0: "healthy", 1: "warnings", 2: "failures"}[code]
    counts = {s: sum(c.status is s for c in checks) for s in (Status.WARN, Status.FAIL)}
    print(f"{worst}: {counts[Status.FAIL]} FAIL, {counts[Status.WARN]} WARN "
          f"(exit {code})", file=out)


def report_json(host: str, ke_port: int, checks: Sequence[Check]) -> dict[str, Any]:
    code = exit_code(checks)
    return {
        "host": host,
        "ke_port": ke_port,
        "status": {0: "OK", 1: "WARN", 2: "FAIL"}[code],
        "exit_code": code,
        "checks": [c.as_dict() for c in checks],
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("host", metavar="HOST")
    p.add_argument("--ke-port", type=int, default=DEFAULT_KE_PORT, metavar="N",
                   help=f"NTS-KE port (default {DEFAULT_KE_PORT})")
    p.add_argument("--ca", action="append", default=[], metavar="FILE",
                   help="trust this CA certificate (PEM) besides the system store; repeatable")
    p.add_argument("--name", default=None, metavar="NAME",
                   help="the name the certificate must carry (default HOST)")
    p.add_argument("--timeout", type=float, default=3.0, metavar="S",
                   help="seconds to wait for each step (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> int:
    trust = TrustConfig.from_ca(args.ca)
    facts = asyncio.run(gather(args.host, args.ke_port, trust, args.timeout, args.name))
    checks = verdicts(facts, now())
    if args.json:
        json.dump(report_json(args.host, args.ke_port, checks), sys.stdout, indent=2)
        print()
    else:
        format_report(args.host, args.ke_port, checks, sys.stdout)
    return exit_code(checks)
