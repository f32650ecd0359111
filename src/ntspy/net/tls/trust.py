"""Which servers a client trusts: the CA configuration and the verify callback.

:class:`TrustConfig` (the system store, extra PEM files or directories, PEM
data, ``nocerttimecheck``) becomes a client Context in :func:`client_context`.
OpenSSL verifies the server's chain; the verify callback then checks the
server name itself (:mod:`.names`), so that a wrong certificate aborts the
handshake with an alert instead of a silent hang-up.  The first verify error
becomes one line for a user (:func:`certificate_message`), carried in a
:class:`~ntspy.errors.CertificateVerifyError`.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from OpenSSL import SSL, crypto

from ntspy.errors import CertificateError, TlsError

from .certfiles import pem_certificates, read_file, when
from .names import certificate_matches, names_of, parse_ip
from .ntske import NTSKE_ALPN, new_tls13_context

# pyOpenSSL's verify callback: (connection, certificate, error, depth, preverify_ok).
_VerifyFn = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]


class VerifyError(enum.IntEnum):
    """OpenSSL X509_V_ERR_* codes that get a message of their own."""

    UNABLE_TO_GET_ISSUER_CERT = 2
    CERT_SIGNATURE_FAILURE = 7
    CERT_NOT_YET_VALID = 9
    CERT_HAS_EXPIRED = 10
    CRL_NOT_YET_VALID = 11
    CRL_HAS_EXPIRED = 12
    DEPTH_ZERO_SELF_SIGNED_CERT = 18
    SELF_SIGNED_CERT_IN_CHAIN = 19
    UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
    UNABLE_TO_VERIFY_LEAF_SIGNATURE = 21
    CERT_REVOKED = 23
    INVALID_PURPOSE = 26
    CERT_UNTRUSTED = 27
    CERT_REJECTED = 28
    HOSTNAME_MISMATCH = 62
    IP_ADDRESS_MISMATCH = 64
    EE_KEY_TOO_SMALL = 66
    CA_KEY_TOO_SMALL = 67
    CA_MD_TOO_WEAK = 68
    INVALID_CA = 79


# The only errors `nocerttimecheck` may forgive: validity periods of
# certificates and CRLs.  Malformed time fields (13..16) stay fatal.
_TIME_ERRORS: Final = frozenset(
    {
        VerifyError.CERT_NOT_YET_VALID,
        VerifyError.CERT_HAS_EXPIRED,
        VerifyError.CRL_NOT_YET_VALID,
        VerifyError.CRL_HAS_EXPIRED,
    }
)


_CaItem = str | os.PathLike[str] | bytes
CaSource = _CaItem | Iterable[_CaItem] | None
"""What ``ca=`` takes: a path (``str`` or :class:`~pathlib.Path`) of a PEM file or a
directory of them, PEM data (``bytes``, or a ``str`` holding ``-----BEGIN``), or a
list of any of these."""

_PEM_MARK = "-----BEGIN"


def _ca_item(item: object, paths: list[Path], pem: list[bytes]) -> None:
    if isinstance(item, bytes | bytearray | memoryview):
        pem.append(bytes(item))
    elif isinstance(item, str) and _PEM_MARK in item:
        pem.append(item.encode("ascii", "replace"))
    elif isinstance(item, str | os.PathLike):
        paths.append(Path(item))
    else:
        raise TypeError(
            f"ca: expected a path, PEM bytes or a list of them, not {type(item).__name__}"
        )


def split_ca(ca: object) -> tuple[list[Path], list[bytes]]:
    """``ca`` in any :data:`CaSource` form as (paths, PEM blobs).

    A single path is one path, never a sequence of one-letter paths; a list
    may mix paths and PEM data.  TypeError for anything else.
    """
    paths: list[Path] = []
    pem: list[bytes] = []
    if ca is None:
        return paths, pem
    if isinstance(ca, str | bytes | bytearray | memoryview | os.PathLike):
        _ca_item(ca, paths, pem)
        return paths, pem
    if not isinstance(ca, Iterable):
        raise TypeError(
            f"ca: expected a path, PEM bytes or a list of them, not {type(ca).__name__}"
        )
    for item in ca:
        _ca_item(item, paths, pem)
    return paths, pem


@dataclass(slots=True)
class TrustConfig:
    """Which certificate authorities a client trusts for NTS-KE servers.

    ``extra`` entries are PEM files (one or several certificates) or
    directories, of which every regular file holding a PEM certificate is
    loaded, whatever its name (no OpenSSL hashed names needed).  It takes any
    :data:`CaSource` form (one path, a list, PEM bytes), sorted out at
    construction into paths (``extra``) and PEM data (``pem``).
    ``no_cert_time_check`` forgives only the validity-time errors of
    certificates and CRLs (chrony's ``nocerttimecheck``, for a client whose
    clock is still wrong); signatures, trust, names and usage are still checked.
    """

    use_system_store: bool = True
    extra: list[Path] = field(default_factory=list)
    no_cert_time_check: bool = False
    pem: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        paths, pem = split_ca(self.extra)
        more_paths, more_pem = split_ca(self.pem)
        self.extra = paths + more_paths
        self.pem = pem + more_pem

    @classmethod
    def from_ca(
        cls, ca: CaSource = None, *, use_system_store: bool = True,
        no_cert_time_check: bool = False,
    ) -> TrustConfig:
        """The system store (unless ``use_system_store`` is False) plus ``ca``."""
        paths, pem = split_ca(ca)
        return cls(use_system_store, paths, no_cert_time_check, pem)


@dataclass(slots=True)
class _VerifyFailure:
    code: int
    depth: int
    cert: x509.Certificate | None


@dataclass(slots=True)
class PeerCheck:
    """Per-connection verification state, hung on the Connection as app data
    because the verify callback belongs to the (shared) Context."""

    server_name: str
    failure: _VerifyFailure | None = None
    name_checked: bool = False

    def fail(self, code: int, depth: int, cert: x509.Certificate | None) -> bool:
        # Keep the first error: later ones are usually consequences of it.
        if self.failure is None:
            self.failure = _VerifyFailure(code, depth, cert)
        return False

    def check_name(self, leaf: x509.Certificate) -> bool:
        self.name_checked = True
        if certificate_matches(leaf, self.server_name):
            return True
        code = (
            VerifyError.IP_ADDRESS_MISMATCH
            if parse_ip(self.server_name) is not None
            else VerifyError.HOSTNAME_MISMATCH
        )
        return self.fail(code, 0, leaf)


def _verify_callback(no_time_check: bool) -> _VerifyFn:
    def verify(conn: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int) -> bool:
        check = conn.get_app_data()
        if not isinstance(check, PeerCheck):
            return bool(ok)
        # Never let an exception escape: pyOpenSSL would park it on the shared
        # Context, and another connection could pick it up.
        try:
            if not ok:
                if no_time_check and code in _TIME_ERRORS:
                    return True
                return check.fail(code, depth, cert.to_cryptography())
            if depth == 0 and not check.name_checked:
                # Checking the name here aborts the handshake, so the client
                # never finishes a session with the wrong server.  pyOpenSSL
                # cannot set a verify error code, so the alert OpenSSL sends for
                # this case is internal_error rather than bad_certificate.
                return check.check_name(cert.to_cryptography())
            return True
        except Exception:
            return check.fail(code or -1, depth, None)

    return verify


def certificate_message(failure: _VerifyFailure, host: str, server_name: str) -> str:
    """One line for a user, from the first verify error OpenSSL reported."""
    code, depth, cert = failure.code, failure.depth, failure.cert
    who = f"certificate of {host}"
    subject = cert.subject.rfc4514_string() if cert is not None else "?"
    issuer = cert.issuer.rfc4514_string() if cert is not None else "?"
    # For errors on a CA certificate, say which one.
    which = "" if depth == 0 else f"CA certificate {subject} at depth {depth}, "
    clock = "is the local clock wrong? see nocerttimecheck"
    if code == VerifyError.CERT_HAS_EXPIRED and cert is not None:
        return f"{who} has expired ({which}notAfter {when(cert.not_valid_after_utc)}); {clock}"
    if code == VerifyError.CERT_NOT_YET_VALID and cert is not None:
        return (
            f"{who} is not yet valid ({which}notBefore {when(cert.not_valid_before_utc)}); {clock}"
        )
    if code in (VerifyError.CRL_HAS_EXPIRED, VerifyError.CRL_NOT_YET_VALID):
        state = "has expired" if code == VerifyError.CRL_HAS_EXPIRED else "is not yet valid"
        return f"a revocation list for the {who} {state}; {clock}"
    if code in (VerifyError.HOSTNAME_MISMATCH, VerifyError.IP_ADDRESS_MISMATCH):
        names = names_of(cert) if cert is not None else "?"
        return f"{who} does not match name {server_name} (it is for: {names})"
    if code == VerifyError.DEPTH_ZERO_SELF_SIGNED_CERT:
        return (
            f"{who} is not trusted: it is self-signed ({subject}); "
            "add it to the trusted certificates (ntstrustedcerts) to accept it"
        )
    if code == VerifyError.SELF_SIGNED_CERT_IN_CHAIN:
        return (
            f"{who} is not trusted: its chain ends in the self-signed CA {subject}, "
            "which is not a trusted certificate (see ntstrustedcerts)"
        )
    if code in (
        VerifyError.UNABLE_TO_GET_ISSUER_CERT,
        VerifyError.UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
        VerifyError.UNABLE_TO_VERIFY_LEAF_SIGNATURE,
    ):
        return (
            f"{who} is not trusted (unknown issuer {issuer}); add that CA to the trusted "
            "certificates (ntstrustedcerts) or the system store, or the server may be "
            "missing an intermediate certificate"
        )
    if code == VerifyError.CERT_SIGNATURE_FAILURE:
        return f"{who} has a bad signature ({which}subject {subject})"
    if code == VerifyError.CERT_REVOKED:
        return f"{who} has been revoked ({which}subject {subject})"
    if code == VerifyError.INVALID_PURPOSE:
        return f"{who} is not meant for a TLS server ({which}subject {subject})"
    if code in (VerifyError.CERT_UNTRUSTED, VerifyError.CERT_REJECTED):
        return f"{who} is not trusted for TLS servers ({which}subject {subject})"
    if code == VerifyError.INVALID_CA:
        return f"{who} is not trusted: {subject} at depth {depth} is not a valid CA"
    if code in (
        VerifyError.EE_KEY_TOO_SMALL,
        VerifyError.CA_KEY_TOO_SMALL,
        VerifyError.CA_MD_TOO_WEAK,
    ):
        return f"{who} uses a key or signature that is too weak ({which}subject {subject})"
    return f"{who} did not verify (OpenSSL verify error {code} at depth {depth}, subject {subject})"


def _trusted_certificates(path: Path) -> list[x509.Certificate]:
    """Certificates from a trusted file, or from every PEM file in a trusted directory."""
    if not path.is_dir():
        return pem_certificates(read_file(path, "trusted certificate file"), path, "file")
    certs: list[x509.Certificate] = []
    try:
        entries = sorted(path.iterdir())
    except OSError as e:
        raise CertificateError(
            f"cannot list trusted certificate directory {path}: {e.strerror or e}"
        ) from None
    for entry in entries:
        if not entry.is_file():
            continue
        data = read_file(entry, "trusted certificate file")
        # Directories hold other things too (READMEs, CRLs, keys): only
        # files with a PEM certificate count, and those must parse.
        if b"-----BEGIN CERTIFICATE-----" in data:
            certs += pem_certificates(data, entry, "file")
    if not certs:
        raise CertificateError(f"trusted certificate directory {path} holds no PEM certificate")
    return certs


def client_context(trust: TrustConfig) -> SSL.Context:
    """A client Context for NTS-KE: TLS 1.3 only, ALPN ``ntske/1``, server verified.

    One Context can serve many connections
    (:meth:`~ntspy.net.tls.stream.TlsStream.connect` accepts it in place of a
    :class:`TrustConfig`).  Raises :class:`CertificateError` if a trusted
    certificate file or directory cannot be used.
    """
    ctx = new_tls13_context()
    ctx.set_alpn_protos([NTSKE_ALPN])
    if trust.use_system_store:
        ctx.set_default_verify_paths()
    store = ctx.get_cert_store()
    if store is None:  # pragma: no cover - a fresh SSL_CTX always has a store
        raise TlsError("OpenSSL context has no certificate store")
    certs = [cert for path in trust.extra for cert in _trusted_certificates(Path(path))]
    for blob in trust.pem:
        try:
            certs += x509.load_pem_x509_certificates(blob)
        except ValueError:
            raise CertificateError("trusted PEM data (ca=) holds no readable certificate") from None
    for cert in certs:
        store.add_cert(crypto.X509.from_cryptography(cert))
    ctx.set_verify(SSL.VERIFY_PEER, _verify_callback(trust.no_cert_time_check))
    return ctx
