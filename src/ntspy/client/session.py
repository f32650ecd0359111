"""Client sessions: one NTP exchange at a time with one server, NTS or plain.

:class:`NtsSession` runs NTS-KE once, keeps the cookie jar, and sends
authenticated requests (RFC 8915 s5); :class:`PlainSession` sends unauthenticated
NTPv4 requests.  Both return :class:`Measurement` values.

What a request gives away is kept to a minimum: each NTS request spends a
fresh cookie (reusing one would let an observer link requests, RFC 8915 s5.7)
and carries a new random unique identifier and nonce, and the transmit
timestamp on the wire is a random 64-bit value rather than our clock (as chrony
and ntpd-rs do): the server only echoes it, and we remember it to match the
response.  T1 is the clock reading taken right before the send.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

from ..clock import Clock, SystemClock
from ..errors import (
    AuthenticationFailure,
    KeError,
    KissOfDeath,
    MalformedPacket,
    NakBackoff,
    NtpConnectionError,
    NtpTimeoutError,
    NtsError,
    NtsNakReceived,
    ServerUnsynchronized,
    StateFileError,
    format_duration,
)
from ..net.tls.trust import CaSource, TrustConfig
from ..net.udp import Received, UdpClient
from ..proto import aead as aead_mod
from ..proto import nts
from ..proto.ke import DEFAULT_KE_PORT
from ..proto.ntp import (
    NS_PER_SECOND,
    NTP_PORT,
    Leap,
    Mode,
    NtpHeader,
    ntp_to_unix_ns,
    offset_delay_ns,
    short_to_seconds,
)
from ..state import b64, unb64
from . import ke as ke_client
from .ke import KeResult

MAX_COOKIES = 8
"""Cookies we keep, like chrony and ntpd-rs: enough for 8 lost packets in a row."""

_XMT_BYTES = 8
_REQUEST_POLL = 6  # log2 seconds; servers echo it and some use it for rate limiting
_REQUEST_PRECISION = -20  # about a microsecond: what CLOCK_REALTIME reads to

KeFunction = Callable[..., Awaitable[KeResult]]
"""Signature of :func:`ntspy.client.ke.key_exchange`; injectable for tests."""


@dataclass(slots=True)
class Measurement:
    """One completed client/server exchange.

    ``offset`` follows RFC 5905: positive when the server is ahead of us, i.e.
    our clock is slow by that much.  Times ``t1``..``t4`` are Unix ns; ``t1``
    and ``t4`` are ours, ``t2`` and ``t3`` the server's.
    """

    server: str
    address: str
    port: int
    offset: float  # seconds
    delay: float  # seconds
    stratum: int
    leap: int
    reference_id: str
    reference_time_ns: int
    root_delay: float  # seconds
    root_dispersion: float  # seconds
    poll: int
    precision: int
    version: int
    authenticated: bool
    kernel_rx_timestamp: bool
    t1: int
    t2: int
    t3: int
    t4: int
    aead_id: int | None = None
    cookies: int = 0  # cookies held after this exchange (NTS only)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (all plain types)."""
        return dataclasses.asdict(self)


def format_reference_id(stratum: int, refid: bytes) -> str:
    """Reference id as people read it: ASCII for stratum 0/1, dotted quad otherwise.

    For stratum 2+ it is the upstream's IPv4 address (or the first bytes of an
    MD5 of its IPv6 address, which still print as a dotted quad).
    """
    text = refid.rstrip(b"\x00")
    if stratum <= 1 and text and all(32 <= b < 127 for b in text):
        return text.decode("ascii")
    # Not printable (chrony's local reference is 127.127.1.1): show the bytes.
    return ".".join(str(b) for b in refid)


class _Session:
    """The UDP and timing half shared by NTS and plain sessions."""

    authenticated = False
    version = 4  # the NTP version our requests carry

    def __init__(self, timeout: float, clock: Clock | None, random: Callable[[int], bytes]):
        self.timeout = timeout
        self.clock: Clock = clock or SystemClock()
        self.random = random
        self.stats: Counter[str] = Counter()
        self._udp: UdpClient | None = None
        self._udp_target: tuple[str, int] | None = None

    async def _udp_to(self, host: str, port: int) -> UdpClient:
        if self._udp is not None and self._udp_target == (host, port):
            return self._udp
        self.close()
        try:
            udp = await UdpClient.open(host, port, self.clock)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise NtpConnectionError(f"cannot reach NTP server {host}:{port}: {reason}") from None
        self._udp, self._udp_target = udp, (host, port)
        return udp

    def _new_header(self) -> tuple[NtpHeader, int]:
        xmt = int.from_bytes(self.random(_XMT_BYTES), "big")
        header = NtpHeader(
            leap=Leap.NONE,
            version=self.version,
            mode=Mode.CLIENT,
            poll=_REQUEST_POLL,
            precision=_REQUEST_PRECISION,
            transmit_ts=xmt,
        )
        return header, xmt

    async def _exchange(
        self,
        udp: UdpClient,
        host: str,
        port: int,
        request: bytes,
        check: Callable[[bytes], NtpHeader],
    ) -> tuple[NtpHeader, Received, int]:
        """Send ``request``, then wait for a datagram that ``check`` accepts.

        Datagrams ``check`` rejects (AuthenticationFailure, MalformedPacket)
        are counted in :attr:`stats` by reason and ignored: an attacker can
        always inject junk, and must not be able to make us give up early.
        """
        loop_time = asyncio.get_running_loop().time
        t1 = udp.send(request)
        self.stats["requests"] += 1
        deadline = loop_time() + self.timeout
        rejected = 0
        last_reason = ""
        while True:
            remaining = deadline - loop_time()
            received = await udp.recv(remaining) if remaining > 0 else None
            if received is None:
                break
            try:
                header = check(received.data)
            except (AuthenticationFailure, MalformedPacket) as exc:
                rejected += 1
                last_reason = str(exc)
                self.stats[f"rejected: {exc}"] += 1
                continue
            self.stats["accepted"] += 1
            return header, received, t1
        kind = "NTS" if self.authenticated else "NTP"
        within = format_duration(self.timeout)
        if rejected:
            raise NtpTimeoutError(
                f"no valid {kind} response from {host}:{port} within {within}: "
                f"{rejected} response(s) rejected ({last_reason})",
                rejected,
            )
        self.stats["timeouts"] += 1
        raise NtpTimeoutError(
            f"no {kind} response from {host}:{port} within {within} "
            "(UDP blocked or packets dropped?)"
        )

    def _measurement(
        self, host: str, udp: UdpClient, header: NtpHeader, received: Received, t1: int
    ) -> Measurement:
        t4 = received.rx_ns
        t2 = ntp_to_unix_ns(header.receive_ts, t1)
        t3 = ntp_to_unix_ns(header.transmit_ts, t1)
        offset, delay = offset_delay_ns(t1, t2, t3, t4)
        return Measurement(
            server=host,
            address=udp.peer[0],
            port=udp.peer[1],
            offset=offset / NS_PER_SECOND,
            delay=delay / NS_PER_SECOND,
            stratum=header.stratum,
            leap=header.leap,
            reference_id=format_reference_id(header.stratum, header.reference_id),
            reference_time_ns=ntp_to_unix_ns(header.reference_ts, t1) if header.reference_ts else 0,
            root_delay=short_to_seconds(header.root_delay),
            root_dispersion=short_to_seconds(header.root_dispersion),
            poll=header.poll,
            precision=header.precision,
            version=header.version,
            authenticated=self.authenticated,
            kernel_rx_timestamp=received.kernel_ts,
            t1=t1,
            t2=t2,
            t3=t3,
            t4=t4,
        )

    def close(self) -> None:
        """Close the UDP socket (a new one opens on the next measurement)."""
        if self._udp is not None:
            self._udp.close()
        self._udp = self._udp_target = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _check_server_header(data: bytes, xmt: int) -> NtpHeader:
    """Checks every response must pass, NTS or not (RFC 5905 s8 'bogus' tests)."""
    header = NtpHeader.unpack(data)
    if header.mode != Mode.SERVER:
        raise MalformedPacket(f"response has mode {header.mode}, expected 4 (server)")
    if header.origin_ts != xmt:
        raise AuthenticationFailure("origin timestamp does not match our request")
    return header


def _check_usable(header: NtpHeader) -> None:
    """A response that is authentic but carries no time we can use."""
    code = header.kiss_code
    if code is not None:
        raise KissOfDeath(code or "(empty)")
    if header.leap == Leap.UNSYNCHRONIZED:
        raise ServerUnsynchronized("server is not synchronised (leap indicator 3)")
    if header.receive_ts == 0 or header.transmit_ts == 0:
        raise MalformedPacket("response has a zero receive or transmit timestamp")


class PlainSession(_Session):
    """Unauthenticated NTPv4 client exchanges with one server (RFC 5905).

    ``version`` is the NTP version our requests carry (1 to 4; servers answer
    with the same one), for servers that still want an older one.
    """

    authenticated = False

    def __init__(
        self,
        host: str,
        port: int = NTP_PORT,
        *,
        timeout: float = 5.0,
        clock: Clock | None = None,
        random: Callable[[int], bytes] = os.urandom,
        version: int = 4,
    ) -> None:
        super().__init__(timeout, clock, random)
        if not 1 <= version <= 4:
            raise ValueError(f"NTP version must be 1 to 4, not {version}")
        self.host = host
        self.port = port
        self.version = version

    async def measure(self) -> Measurement:
        """One request/response; raises :class:`NtsError` (or a child) on failure."""
        udp = await self._udp_to(self.host, self.port)
        header, xmt = self._new_header()

        def check(data: bytes) -> NtpHeader:
            return _check_server_header(data, xmt)

        try:
            response, received, t1 = await self._exchange(
                udp, self.host, self.port, header.pack(), check
            )
        except ConnectionRefusedError:
            raise NtpConnectionError(_refused(self.host, self.port)) from None
        _check_usable(response)
        return self._measurement(self.host, udp, response, received, t1)


def _refused(host: str, port: int) -> str:
    return f"{host}:{port} refused the NTP request (ICMP port unreachable: no NTP server there?)"


class NtsSession(_Session):
    """Authenticated NTP (RFC 8915) with one NTS-KE server and the NTP server it names.

    Key exchange happens on the first :meth:`measure` and again whenever the
    cookies run out or the server answers with an NTS NAK.
    """

    authenticated = True

    def __init__(
        self,
        host: str,
        ke_port: int = DEFAULT_KE_PORT,
        *,
        trust: TrustConfig | None = None,
        ca: CaSource = None,
        aeads: Sequence[int] | None = None,
        server_name: str | None = None,
        ntp_port: int | None = None,
        timeout: float = 5.0,
        clock: Clock | None = None,
        random: Callable[[int], bytes] = os.urandom,
        key_exchange: KeFunction = ke_client.key_exchange,
        max_key_exchanges: int | None = None,
        on_cookie_spent: Callable[[], None] | None = None,
    ) -> None:
        """``ntp_port`` overrides the NTP port the KE server names (for testing a
        server behind a port mapping); normally leave it None.

        ``max_key_exchanges`` bounds the NTS-KE sessions this session will ever
        run (``ntspy query``: 2).  ``on_cookie_spent`` is called after a cookie
        leaves the jar and before the packet carrying it is sent, so that the
        caller can persist the jar first: no cookie is ever sent twice, not even
        across a crash (RFC 8915 s6: a repeated cookie links the client).

        Trust: ``ca`` adds CA certificates to the system store, in any form
        :class:`~ntspy.TrustConfig` takes (a path, a list of paths, PEM bytes);
        ``trust`` (a :class:`~ntspy.TrustConfig`) says it all instead, e.g. to
        leave the system store out.  Give one or neither."""
        super().__init__(timeout, clock, random)
        if trust is not None and ca is not None:
            raise ValueError("give NtsSession either trust= or ca=, not both")
        if trust is None and ca is not None:
            trust = TrustConfig.from_ca(ca)
        self.host = host
        self.ke_port = ke_port
        self.trust = trust
        self.aeads = aeads
        self.server_name = server_name
        self.ntp_port = ntp_port
        self._key_exchange = key_exchange
        self.ke: KeResult | None = None
        self.cookies: list[bytes] = []
        self._c2s: aead_mod.Aead | None = None
        self._s2c: aead_mod.Aead | None = None
        self.max_key_exchanges = max_key_exchanges
        self.on_cookie_spent = on_cookie_spent
        self.ke_confirmed = False
        """Whether an authenticated response came since the last NTS-KE: only then
        may a NAK lead to another one (RFC 8915 s5.7: do not overload the KE server;
        an off-path attacker can forge NAKs, not authenticated responses)."""

    async def key_exchange(self) -> KeResult:
        """Run NTS-KE now, replacing keys and cookies."""
        done = self.stats["key exchanges"]
        if self.max_key_exchanges is not None and done >= self.max_key_exchanges:
            raise KeError(f"{done} NTS-KE sessions with {self.host} already: not another")
        result = await self._key_exchange(
            self.host,
            self.ke_port,
            trust=self.trust,
            aeads=self.aeads,
            server_name=self.server_name,
            timeout=self.timeout,
        )
        self.stats["key exchanges"] += 1
        self.ke_confirmed = False
        self.ke = result
        self.cookies = list(result.cookies[:MAX_COOKIES])
        self._c2s = aead_mod.Aead(result.aead_id, result.c2s)
        self._s2c = aead_mod.Aead(result.aead_id, result.s2c)
        return result

    def dump(self) -> dict[str, Any] | None:
        """Keys and cookies as a JSON-friendly dict (for ``ntsdumpdir``), or None."""
        if self.ke is None or not self.cookies:
            return None
        k = self.ke
        return {
            "ke_host": k.ke_host,
            "ke_port": k.ke_port,
            "ke_address": k.ke_address,
            "aead": k.aead_id,
            "c2s": b64(k.c2s),
            "s2c": b64(k.s2c),
            "cookies": [b64(c) for c in self.cookies],
            "ntp_server": k.ntp_server,
            "ntp_port": k.ntp_port,
            "tls_version": k.tls_version,
            "cert_subject": k.cert_subject,
            "cert_not_after": k.cert_not_after.timestamp() if k.cert_not_after else None,
            "compliant_128gcm": k.compliant_128gcm,
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Take keys and cookies saved by :meth:`dump`; StateFileError if unusable.

        Refused unless they belong to this session's KE server: cookies are
        only good with the server that issued them.
        """
        try:
            if (saved["ke_host"], int(saved["ke_port"])) != (self.host, self.ke_port):
                raise StateFileError("saved NTS state is for another server")
            after = saved.get("cert_not_after")
            result = KeResult(
                aead_id=int(saved["aead"]),
                c2s=unb64(saved["c2s"]),
                s2c=unb64(saved["s2c"]),
                cookies=[unb64(c) for c in saved["cookies"]][:MAX_COOKIES],
                ntp_server=str(saved["ntp_server"]),
                ntp_port=int(saved["ntp_port"]),
                ke_host=self.host,
                ke_port=self.ke_port,
                ke_address=str(saved.get("ke_address", "")),
                tls_version=str(saved.get("tls_version", "")),
                cert_subject=str(saved.get("cert_subject", "")),
                cert_not_after=(
                    datetime.fromtimestamp(float(after), UTC) if after is not None else None
                ),
                compliant_128gcm=bool(saved.get("compliant_128gcm", False)),
            )
            c2s = aead_mod.Aead(result.aead_id, result.c2s)
            s2c = aead_mod.Aead(result.aead_id, result.s2c)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateFileError(f"saved NTS state is damaged ({exc})") from None
        if not result.cookies:
            raise StateFileError("saved NTS state has no cookies")
        self.ke, self.cookies, self._c2s, self._s2c = result, list(result.cookies), c2s, s2c
        self.ke_confirmed = True  # these keys were in use before the restart

    @property
    def ntp_target(self) -> tuple[str, int]:
        """Where NTP requests go: what the KE server said (RFC 8915 s4.1.7, s4.1.8)."""
        if self.ke is None:
            raise NtsError("no key exchange yet")
        return self.ke.ntp_server, self.ntp_port or self.ke.ntp_port

    async def measure(self) -> Measurement:
        """One authenticated exchange; re-runs KE once on a NAK or an empty jar."""
        if self.ke is None or not self.cookies:
            await self.key_exchange()
        try:
            return await self._measure_once()
        except NtsNakReceived:
            self.stats["naks"] += 1
            self.cookies.clear()
            if not self.ke_confirmed:
                # A NAK right after a fresh NTS-KE: a broken server or a forger.
                # Either way another KE now would just feed the KE server load.
                raise NakBackoff(f"{self.host}: NTS NAK before any authenticated response "
                                 "since the last NTS-KE: backing off") from None
            await self.key_exchange()
            return await self._measure_once()

    async def _measure_once(self) -> Measurement:
        if not self.cookies:
            await self.key_exchange()
        assert self.ke is not None and self._c2s is not None and self._s2c is not None
        host, port = self.ntp_target
        udp = await self._udp_to(host, port)
        s2c = self._s2c
        cookie = self.cookies.pop(0)  # spent whatever happens next: never sent twice
        if self.on_cookie_spent is not None:
            self.on_cookie_spent()  # persisted before it can be on the wire
        # Ask for enough extra cookies that the jar is full again after the reply.
        placeholders = max(0, MAX_COOKIES - 1 - len(self.cookies))
        unique_id = self.random(nts.UNIQUE_ID_LEN)
        nonce = self.random(self._c2s.nonce_length)
        header, xmt = self._new_header()
        request = nts.build_request(header, unique_id, cookie, placeholders, self._c2s, nonce)
        got_cookies: list[bytes] = []

        def check(data: bytes) -> NtpHeader:
            verified = nts.verify_response(data, unique_id, xmt, s2c)
            got_cookies[:] = verified.cookies
            return verified.header

        try:
            response, received, t1 = await self._exchange(udp, host, port, request, check)
        except ConnectionRefusedError:
            raise NtpConnectionError(_refused(host, port)) from None
        self.ke_confirmed = True  # an authenticated response: the keys are good
        room = MAX_COOKIES - len(self.cookies)
        self.cookies.extend(got_cookies[:room])
        self.stats["cookies received"] += len(got_cookies)
        _check_usable(response)
        measurement = self._measurement(self.host, udp, response, received, t1)
        measurement.aead_id = self.ke.aead_id
        measurement.cookies = len(self.cookies)
        return measurement
