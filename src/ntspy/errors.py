"""The one exception tree of ntspy.

Everything the library raises on bad input, failed authentication or a failed
peer is an :class:`NtsError`.  Adapters turn these into log lines and counters;
the protocol core never swallows them.
"""

from __future__ import annotations


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


class KeConnectionError(KeError):
    """The KE server could not be reached (refused, timed out, closed early)."""


class CertificateError(KeError):
    """The KE server's certificate did not verify (expired, wrong name, untrusted...)."""


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
