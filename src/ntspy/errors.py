"""The one exception tree of ntspy.

Everything the library raises on bad input, failed authentication or a failed
peer is an :class:`NtsError`.  Adapters turn these into log lines and counters;
the protocol core never swallows them.

Some also derive from the built-in exception a Python user would catch for
the same trouble, so that code written for ``socket`` or ``ssl`` keeps working::

    NtsError
    +-- MalformedPacket, AuthenticationFailure, NtsNakReceived, KissOfDeath
    +-- ServerUnsynchronized
    +-- NtpConnectionError          also ConnectionError
    +-- NtpTimeoutError             also TimeoutError
    +-- KeError
    |   +-- KeProtocolError, KeServerError, NakBackoff, TlsError
    |   +-- KeConnectionError       also ConnectionError
    |   |   +-- KeTimeoutError      also TimeoutError
    |   +-- CertificateError        a certificate file or a server's certificate
    |       +-- CertificateVerifyError   also ssl.SSLCertVerificationError
    +-- ConfigError
    +-- StateFileError
        +-- StateFileUnreadable
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ssl import SSLCertVerificationError as _SslVerifyError
else:
    try:
        from ssl import SSLCertVerificationError as _SslVerifyError
    except ImportError:
        # `ntspy serve` keeps the system OpenSSL out of its processes (cli.py);
        # it never verifies a peer's certificate, so nothing there needs ssl's class.
        class _SslVerifyError(ValueError):
            verify_code: int = 0
            verify_message: str = ""


def format_duration(seconds: float) -> str:
    """A timeout or deadline as messages show it: ``3 s``, ``2.5 s``, ``0.2 s``.

    Tenths from one second up, two significant digits below: the deadline a
    user set, not the float a loop computed (``2.98895``).
    """
    if seconds >= 1:
        return f"{round(seconds, 1):g} s"
    return f"{float(f'{seconds:.2g}'):g} s"


class NtsError(Exception):
    """Base of every error ntspy raises on purpose."""


class MalformedPacket(NtsError):
    """An NTP packet or extension field that does not parse."""


class AuthenticationFailure(NtsError):
    """An AEAD check failed, or a response does not belong to our request."""


class NtsNakReceived(NtsError):
    """The server answered with an NTS NAK (kiss code NTSN): our cookie is no good."""


class KissOfDeath(NtsError):
    """The server answered with a kiss-o'-death packet (stratum 0), e.g. RATE or DENY."""

    def __init__(self, code: str) -> None:
        super().__init__(f"server sent kiss-o'-death {code}")
        self.code = code


class ServerUnsynchronized(NtsError):
    """The server answered, but says its own clock is not synchronised (leap 3)."""


class NtpConnectionError(NtsError, ConnectionError):
    """The NTP server cannot be reached: no route, no address, or ICMP port unreachable."""


class NtpTimeoutError(NtsError, TimeoutError):
    """No usable NTP response came within the timeout.

    ``rejected`` counts the responses that came but were dropped (failed
    authentication, not ours, malformed); 0 means nothing came at all.
    """

    def __init__(self, message: str, rejected: int = 0) -> None:
        super().__init__(message)
        self.rejected = rejected


class KeError(NtsError):
    """NTS-KE failed."""


class KeProtocolError(KeError):
    """A KE message broke RFC 8915 s4.

    ``code`` is the RFC 8915 error code a server should send back for it
    (0 unrecognized critical record, 1 bad request, 2 internal server error).
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class KeServerError(KeError):
    """The KE server sent an Error record."""

    def __init__(self, code: int) -> None:
        names = {0: "unrecognized critical record", 1: "bad request", 2: "internal server error"}
        super().__init__(f"server sent Error record {code} ({names.get(code, 'unknown code')})")
        self.code = code


class NakBackoff(KeError):
    """NAKs keep coming without an authenticated response: no new NTS-KE for now."""


class KeConnectionError(KeError, ConnectionError):
    """The KE server could not be reached (refused, unreachable, closed early)."""


class KeTimeoutError(KeConnectionError, TimeoutError):
    """The KE server did not answer in time (TCP connect, TLS handshake or records)."""


class CertificateError(KeError):
    """A certificate problem: a trusted-CA or server certificate file that cannot
    be used, or (as :class:`CertificateVerifyError`) a server's certificate that
    did not verify."""


class CertificateVerifyError(CertificateError, _SslVerifyError):
    """The KE server's certificate did not verify (expired, wrong name, untrusted...).

    Also an :class:`ssl.SSLCertVerificationError`: ``verify_code`` is OpenSSL's
    ``X509_V_ERR_*`` code (e.g. 10 expired, 62 host name mismatch) and
    ``verify_message`` the sentence ``str()`` gives.
    """

    def __init__(self, message: str, verify_code: int = 0) -> None:
        super().__init__(message)
        self.verify_code = verify_code
        self.verify_message = message

    def __str__(self) -> str:
        # ssl.SSLError's own __str__ would show the args tuple.
        return self.verify_message

    def __reduce__(self) -> tuple[type[CertificateVerifyError], tuple[str, int]]:
        return type(self), (self.verify_message, self.verify_code)


class TlsError(KeError):
    """TLS failed for a reason other than the certificate (version, ALPN, handshake)."""


class ConfigError(NtsError):
    """A configuration line that cannot be used; carries the file and line number."""

    def __init__(self, message: str, filename: str = "<config>", lineno: int = 0) -> None:
        where = f"{filename}:{lineno}: " if lineno else f"{filename}: "
        super().__init__(where + message)
        self.filename = filename
        self.lineno = lineno
        self.reason = message


class StateFileError(NtsError):
    """A persisted state file that is corrupt, truncated or unreadable."""


class StateFileUnreadable(StateFileError):
    """A state file is there but cannot be read (permissions, I/O error): not a
    damaged file to set aside, but one to keep and report."""
