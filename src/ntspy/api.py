"""The library API: ask a server for the time in one call.

>>> import ntspy
>>> m = ntspy.query("time.cloudflare.com")      # doctest: +SKIP
>>> m.offset, m.delay, m.authenticated           # doctest: +SKIP
(-0.000412, 0.0121, True)

For repeated measurements keep an :class:`NtsSession` (one NTS-KE, then a
cookie per request) and call ``await session.measure()``.

For ntplib users, :class:`NTPClient` takes ntplib's ``request(host, version,
port, timeout)`` and returns an :class:`NTPStats` with ntplib's attribute
names; ``nts=True`` makes the same call authenticated.

Every blocking call here also works when called from inside a running event
loop (a notebook, an async application): it then runs on an event loop of its
own in a worker thread, and blocks the caller until it is done; from async
code, prefer the ``*_async`` forms.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .client.session import Measurement, NtsSession, PlainSession
from .errors import NtpConnectionError, NtsError
from .net.tls.trust import CaSource, TrustConfig
from .proto.ke import DEFAULT_KE_PORT
from .proto.ntp import NS_PER_SECOND, NTP_PORT, NTP_UNIX_OFFSET, Mode

__all__ = [
    "Measurement",
    "NTPClient",
    "NTPException",
    "NTPStats",
    "NtsSession",
    "PlainSession",
    "TrustConfig",
    "query",
    "query_async",
]

SAMPLE_INTERVAL = 0.25
"""Seconds between samples of one query: quick, yet not a burst servers rate-limit."""
QUERY_MAX_KEY_EXCHANGES = 2

NTPException = NtsError
"""ntplib's exception name, for code that catches ``ntplib.NTPException``."""

T = TypeVar("T")


def run_blocking(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine ``make()`` returns to completion and return its result.

    Outside an event loop that is :func:`asyncio.run`.  Inside a running loop
    (which cannot be re-entered) the coroutine gets a loop of its own in a
    worker thread, and this call waits for it: the calling loop is blocked
    meanwhile, as by any blocking call.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(1, thread_name_prefix="ntspy") as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def make_session(
    host: str,
    nts: bool = True,
    *,
    port: int | None = None,
    ke_port: int = DEFAULT_KE_PORT,
    ca: CaSource = None,
    timeout: float = 5.0,
    no_cert_time_check: bool = False,
    version: int = 4,
    server_name: str | None = None,
) -> NtsSession | PlainSession:
    """The session :func:`query` uses; see there for the arguments."""
    if not nts:
        return PlainSession(host, port or NTP_PORT, timeout=timeout, version=version)
    if version != 4:
        raise ValueError("NTS authenticates NTPv4 only (RFC 8915): version must be 4")
    trust = TrustConfig.from_ca(ca, no_cert_time_check=no_cert_time_check)
    # One query never runs more than two NTS-KE sessions, whatever NAKs come.
    return NtsSession(host, ke_port, trust=trust, ntp_port=port, timeout=timeout,
                      server_name=server_name, max_key_exchanges=QUERY_MAX_KEY_EXCHANGES)


def best(samples: Iterable[Measurement]) -> Measurement:
    """The sample with the smallest round-trip delay: the least disturbed by queueing."""
    return min(samples, key=lambda m: m.delay)


async def query_async(
    host: str,
    nts: bool = True,
    *,
    port: int | None = None,
    ke_port: int = DEFAULT_KE_PORT,
    ca: CaSource = None,
    timeout: float = 5.0,
    samples: int = 1,
    no_cert_time_check: bool = False,
) -> Measurement:
    """Measure the offset to ``host``; the best of ``samples`` exchanges.

    ``nts`` runs NTS-KE on ``ke_port`` and authenticates every packet; without
    it, plain NTP goes to ``port`` (default 123).  With NTS, ``port`` only
    overrides the NTP port the KE server names.  ``ca`` adds trusted CA
    certificates to the system store: a path (``str`` or ``Path``) of a PEM
    file or directory, PEM ``bytes``, or a list of these.  Samples that fail
    are skipped; if none succeeds the last error is raised (an
    :class:`~ntspy.NtsError`: :class:`~ntspy.NtpTimeoutError` and
    :class:`~ntspy.KeTimeoutError` are also :class:`TimeoutError`,
    :class:`~ntspy.KeConnectionError` and :class:`~ntspy.NtpConnectionError`
    :class:`ConnectionError`, :class:`~ntspy.CertificateVerifyError`
    :class:`ssl.SSLCertVerificationError`).
    """
    if samples < 1:
        raise ValueError("samples must be at least 1")
    session = make_session(
        host, nts, port=port, ke_port=ke_port, ca=ca, timeout=timeout,
        no_cert_time_check=no_cert_time_check,
    )
    return await _measure(session, samples)


async def _measure(session: NtsSession | PlainSession, samples: int) -> Measurement:
    results: list[Measurement] = []
    error: NtsError | None = None
    try:
        for i in range(samples):
            if i:
                await asyncio.sleep(SAMPLE_INTERVAL)
            try:
                results.append(await session.measure())
            except NtsError as exc:
                if isinstance(session, NtsSession) and session.ke is None:
                    raise  # KE failed: no point in trying again
                error = exc
    finally:
        session.close()
    if not results:
        assert error is not None
        raise error
    return best(results)


def query(
    host: str,
    nts: bool = True,
    *,
    port: int | None = None,
    ke_port: int = DEFAULT_KE_PORT,
    ca: CaSource = None,
    timeout: float = 5.0,
    samples: int = 1,
    no_cert_time_check: bool = False,
) -> Measurement:
    """Blocking form of :func:`query_async` (runs its own event loop, in a
    worker thread when called from inside a running one)."""
    return run_blocking(
        lambda: query_async(
            host, nts, port=port, ke_port=ke_port, ca=ca, timeout=timeout,
            samples=samples, no_cert_time_check=no_cert_time_check,
        )
    )


# ---------------------------------------------------------------------------
# ntplib-compatible client

_DOTTED_QUAD = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")


def reference_id_int(reference_id: str) -> int:
    """The 32-bit reference id behind :attr:`Measurement.reference_id`'s text
    (ASCII for stratum 0/1, a dotted quad otherwise), as ntplib's ``ref_id``."""
    if _DOTTED_QUAD.fullmatch(reference_id):
        octets = [int(part) for part in reference_id.split(".")]
        if all(o < 256 for o in octets):
            return int.from_bytes(bytes(octets), "big")
    raw = reference_id.encode("ascii", "replace")[:4].ljust(4, b"\x00")
    return int.from_bytes(raw, "big")


def _ntp_seconds(unix_ns: int) -> float:
    """Unix ns as a float of seconds since 1900 (ntplib's timestamp scale)."""
    return (unix_ns + NTP_UNIX_OFFSET * NS_PER_SECOND) / NS_PER_SECOND


@dataclass(slots=True)
class NTPStats:
    """One exchange with ntplib's attribute names (``ntplib.NTPStats``).

    ``*_timestamp`` are seconds since 1900 (NTP scale), ``*_time`` the same
    instants as Unix time (what ``time.time()`` returns).  Unlike ntplib's:

    * ``orig_timestamp``/``orig_time`` are our clock's reading just before the
      request left (T1).  The transmit timestamp on the wire is a random value
      the server only echoes (it would give away our clock), so the packet's
      origin field means nothing to a user.
    * ``offset`` and ``delay`` are computed from nanosecond integers, not from
      these floats (which resolve only about half a microsecond).
    * Timestamps are resolved to the right NTP era, so they keep counting past
      2036 instead of wrapping.

    ``authenticated``, ``aead_id``, ``server``, ``address``, ``port``,
    ``reference_id`` (the id as text) and ``measurement`` (the full
    :class:`Measurement`) are ntspy's additions.
    """

    offset: float
    delay: float
    leap: int
    version: int
    mode: int
    stratum: int
    poll: int
    precision: int
    root_delay: float
    root_dispersion: float
    ref_id: int
    ref_timestamp: float
    orig_timestamp: float
    recv_timestamp: float
    tx_timestamp: float
    dest_timestamp: float
    ref_time: float
    orig_time: float
    recv_time: float
    tx_time: float
    dest_time: float
    authenticated: bool
    aead_id: int | None
    server: str
    address: str
    port: int
    reference_id: str
    measurement: Measurement = field(repr=False)

    @classmethod
    def from_measurement(cls, m: Measurement) -> NTPStats:
        """ntplib's view of a :class:`Measurement`."""
        ref_ns = m.reference_time_ns
        return cls(
            offset=m.offset,
            delay=m.delay,
            leap=m.leap,
            version=m.version,
            mode=Mode.SERVER,  # every accepted response is one (RFC 5905 mode 4)
            stratum=m.stratum,
            poll=m.poll,
            precision=m.precision,
            root_delay=m.root_delay,
            root_dispersion=m.root_dispersion,
            ref_id=reference_id_int(m.reference_id),
            # A zero reference timestamp ("never synchronised") stays zero, as in ntplib.
            ref_timestamp=_ntp_seconds(ref_ns) if ref_ns else 0.0,
            orig_timestamp=_ntp_seconds(m.t1),
            recv_timestamp=_ntp_seconds(m.t2),
            tx_timestamp=_ntp_seconds(m.t3),
            dest_timestamp=_ntp_seconds(m.t4),
            ref_time=ref_ns / NS_PER_SECOND if ref_ns else float(-NTP_UNIX_OFFSET),
            orig_time=m.t1 / NS_PER_SECOND,
            recv_time=m.t2 / NS_PER_SECOND,
            tx_time=m.t3 / NS_PER_SECOND,
            dest_time=m.t4 / NS_PER_SECOND,
            authenticated=m.authenticated,
            aead_id=m.aead_id,
            server=m.server,
            address=m.address,
            port=m.port,
            reference_id=m.reference_id,
            measurement=m,
        )


def _udp_port(port: int | str) -> int:
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    try:
        return socket.getservbyname(port, "udp")  # ntplib's default is "ntp"
    except OSError:
        raise ValueError(f"unknown UDP service {port!r}") from None


async def _address_of(host: str, port: int, family: int) -> str:
    """The first address of ``host`` in ``family`` (for ntplib's ``address_family``)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise NtpConnectionError(f"cannot resolve {host}: {exc.strerror or exc}") from None
    return str(infos[0][4][0])


class NTPClient:
    """A drop-in for ``ntplib.NTPClient``: ``NTPClient().request(host)``.

    ``ca`` (trusted CA certificates besides the system store, in any form
    :func:`query` takes), ``ke_port`` and ``no_cert_time_check`` are the
    defaults for NTS requests; :meth:`request` can override each.
    """

    def __init__(
        self,
        *,
        ca: CaSource = None,
        ke_port: int = DEFAULT_KE_PORT,
        no_cert_time_check: bool = False,
    ) -> None:
        self.ca = ca
        self.ke_port = ke_port
        self.no_cert_time_check = no_cert_time_check

    def request(
        self,
        host: str,
        version: int = 4,
        port: int | str = NTP_PORT,
        timeout: float = 5,
        address_family: int = socket.AF_UNSPEC,
        *,
        nts: bool = False,
        ke_port: int | None = None,
        ca: CaSource = None,
    ) -> NTPStats:
        """Ask ``host`` for the time once; ntplib's arguments, in ntplib's order.

        Plain NTP by default, as ntplib.  ``nts=True`` runs NTS-KE on
        ``ke_port`` (default 4460) first and authenticates the exchange; the
        NTP port is then the one the NTS-KE server names, unless ``port`` is
        set to something other than 123.  ``version`` is the NTP version of the
        request (1 to 4; NTS needs 4).  ``timeout`` bounds each step (NTS-KE,
        then the NTP exchange).  Raises :class:`~ntspy.NtsError` (ntplib's
        ``NTPException`` is an alias of it) or a child: a timeout is also a
        :class:`TimeoutError`, an unreachable server a :class:`ConnectionError`.
        """
        return run_blocking(
            lambda: self.request_async(
                host, version, port, timeout, address_family, nts=nts, ke_port=ke_port, ca=ca
            )
        )

    async def request_async(
        self,
        host: str,
        version: int = 4,
        port: int | str = NTP_PORT,
        timeout: float = 5,
        address_family: int = socket.AF_UNSPEC,
        *,
        nts: bool = False,
        ke_port: int | None = None,
        ca: CaSource = None,
    ) -> NTPStats:
        """:meth:`request` for async code."""
        ntp_port = _udp_port(port)
        ke = self.ke_port if ke_port is None else ke_port
        target, server_name = host, None
        if address_family != socket.AF_UNSPEC:
            target = await _address_of(host, ke if nts else ntp_port, address_family)
            server_name = host  # the certificate names the host, not its address
        session = make_session(
            target,
            nts,
            port=(ntp_port if ntp_port != NTP_PORT else None) if nts else ntp_port,
            ke_port=ke,
            ca=self.ca if ca is None else ca,
            timeout=timeout,
            no_cert_time_check=self.no_cert_time_check,
            version=version,
            server_name=server_name if nts else None,
        )
        stats = NTPStats.from_measurement(await _measure(session, 1))
        stats.server = host
        return stats
