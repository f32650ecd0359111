"""The library API: ask a server for the time in one call.

>>> import ntspy
>>> m = ntspy.query("time.cloudflare.com")      # doctest: +SKIP
>>> m.offset, m.delay, m.authenticated           # doctest: +SKIP
(-0.000412, 0.0121, True)

For repeated measurements keep an :class:`NtsSession` (one NTS-KE, then a
cookie per request) and call ``await session.measure()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

from .client.session import Measurement, NtsSession, PlainSession
from .errors import NtsError
from .net.tls import TrustConfig
from .proto.ke import DEFAULT_KE_PORT
from .proto.ntp import NTP_PORT

__all__ = ["Measurement", "NtsSession", "PlainSession", "query", "query_async"]

SAMPLE_INTERVAL = 0.25
QUERY_MAX_KEY_EXCHANGES = 2
"""Seconds between samples of one query: quick, yet not a burst servers rate-limit."""


def make_session(
    host: str,
    nts: bool = True,
    *,
    port: int | None = None,
    ke_port: int = DEFAULT_KE_PORT,
    ca: Iterable[str | Path] = (),
    timeout: float = 5.0,
    no_cert_time_check: bool = False,
) -> NtsSession | PlainSession:
    """The session :func:`query` uses; see there for the arguments."""
    if not nts:
        return PlainSession(host, port or NTP_PORT, timeout=timeout)
    trust = TrustConfig(
        use_system_store=True,
        extra=[Path(p) for p in ca],
        no_cert_time_check=no_cert_time_check,
    )
    # One query never runs more than two NTS-KE sessions, whatever NAKs come.
    return NtsSession(host, ke_port, trust=trust, ntp_port=port, timeout=timeout,
                      max_key_exchanges=QUERY_MAX_KEY_EXCHANGES)


def best(samples: Iterable[Measurement]) -> Measurement:
    """The sample with the smallest round-trip delay: the least disturbed by queueing."""
    return min(samples, key=lambda m: m.delay)


async def query_async(
    host: str,
    nts: bool = True,
    *,
    port: int | None = None,
    ke_port: int = DEFAULT_KE_PORT,
    ca: Iterable[str | Path] = (),
    timeout: float = 5.0,
    samples: int = 1,
    no_cert_time_check: bool = False,
) -> Measurement:
    """Measure the offset to ``host``; the best of ``samples`` exchanges.

    ``nts`` runs NTS-KE on ``ke_port`` and authenticates every packet; without
    it, plain NTP goes to ``port`` (default 123).  With NTS, ``port`` only
    overrides the NTP port the KE server names.  ``ca`` adds trusted CA
    certificate files to the system store.  Samples that fail are skipped;
    if none succeeds the last error is raised (:class:`~ntspy.errors.NtsError`
    or a child, e.g. :class:`~ntspy.errors.CertificateError`).
    """
    if samples < 1:
        raise ValueError("samples must be at least 1")
    session = make_session(
        host, nts, port=port, ke_port=ke_port, ca=ca, timeout=timeout,
        no_cert_time_check=no_cert_time_check,
    )
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
    ca: Iterable[str | Path] = (),
    timeout: float = 5.0,
    samples: int = 1,
    no_cert_time_check: bool = False,
) -> Measurement:
    """Blocking form of :func:`query_async` (runs its own event loop)."""
    return asyncio.run(
        query_async(
            host, nts, port=port, ke_port=ke_port, ca=ca, timeout=timeout,
            samples=samples, no_cert_time_check=no_cert_time_check,
        )
    )
