"""ntspy: Network Time Security (RFC 8915) and NTPv4 (RFC 5905) in Python.

The library API (``query``, ``query_async``, ``NtsSession``, ``Measurement``,
``NTPClient``, ``TrustConfig``) and every exception (``NtsError`` and its
children, see :mod:`ntspy.errors`) are importable from here.  They are loaded
on first use, so that importing a protocol module such as ``ntspy.proto.ntp``
does not pull in TLS, and ``ntspy serve`` can keep the system OpenSSL out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AuthenticationFailure",
    "CertificateError",
    "CertificateVerifyError",
    "ConfigError",
    "KeConnectionError",
    "KeError",
    "KeProtocolError",
    "KeServerError",
    "KeTimeoutError",
    "KissOfDeath",
    "MalformedPacket",
    "Measurement",
    "NTPClient",
    "NTPException",
    "NTPStats",
    "NakBackoff",
    "NtpConnectionError",
    "NtpTimeoutError",
    "NtsError",
    "NtsNakReceived",
    "NtsSession",
    "PlainSession",
    "ServerUnsynchronized",
    "StateFileError",
    "StateFileUnreadable",
    "TlsError",
    "TrustConfig",
    "__version__",
    "query",
    "query_async",
]

_API_NAMES = frozenset({
    "Measurement", "NTPClient", "NTPException", "NTPStats", "NtsSession",
    "PlainSession", "TrustConfig", "query", "query_async",
})
_ERROR_NAMES = frozenset(__all__) - _API_NAMES - {"__version__"}

if TYPE_CHECKING:
    from .api import (
        Measurement,
        NTPClient,
        NTPException,
        NTPStats,
        NtsSession,
        PlainSession,
        TrustConfig,
        query,
        query_async,
    )
    from .errors import (
        AuthenticationFailure,
        CertificateError,
        CertificateVerifyError,
        ConfigError,
        KeConnectionError,
        KeError,
        KeProtocolError,
        KeServerError,
        KeTimeoutError,
        KissOfDeath,
        MalformedPacket,
        NakBackoff,
        NtpConnectionError,
        NtpTimeoutError,
        NtsError,
        NtsNakReceived,
        ServerUnsynchronized,
        StateFileError,
        StateFileUnreadable,
        TlsError,
    )


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        from . import api

        return getattr(api, name)
    if name in _ERROR_NAMES:
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'ntspy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API_NAMES | _ERROR_NAMES)
