"""TLS 1.3 for NTS-KE (RFC 8915 s4) over pyOpenSSL memory BIOs.

The stdlib ``ssl`` module has no TLS keying-material exporter, which NTS needs to
derive its AEAD keys (RFC 8915 s5.1), so this adapter runs pyOpenSSL with memory
BIOs: OpenSSL never touches a socket.  :class:`TlsStream` shuttles bytes between
its BIOs and an asyncio ``(StreamReader, StreamWriter)`` pair (the client, and
any server code that wants streams); :class:`ServerTls` is the server half with
no I/O at all, for the NTS-KE server's ``asyncio.Protocol``.

NTS-KE rules enforced here: TLS 1.3 only (min = max = 1.3) and ALPN ``ntske/1``
on both sides.  The client verifies the server's chain with OpenSSL, then the
server name itself (SAN dNSName with RFC 6125 wildcards, or iPAddress for an IP
literal) inside the verify callback, so that a wrong certificate aborts the
handshake with an alert instead of a silent hang-up.  Every failure becomes one
clear line in a :class:`~ntspy.errors.KeConnectionError` (a
:class:`~ntspy.errors.KeTimeoutError` when time ran out),
:class:`~ntspy.errors.CertificateVerifyError` or :class:`~ntspy.errors.TlsError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _ssl_lib

from ntspy._optional import require_compiled
from ntspy.errors import (
    CertificateError,
    CertificateVerifyError,
    KeConnectionError,
    KeTimeoutError,
    NtsError,
    TlsError,
    format_duration,
)

try:  # the optional compiled NTS-KE server loop (src/ntspy/_ke.c), same settings
    require_compiled()
    from .._ke import TlsContext as NativeTlsContext

    HAVE_NATIVE_KE = True
except ImportError:
    HAVE_NATIVE_KE = False

log = logging.getLogger("ntspy.tls")

NTSKE_ALPN: Final = b"ntske/1"  # RFC 8915 s4: the ALPN id of NTS-KE
TLS13_NAME: Final = "TLSv1.3"  # what OpenSSL's SSL_get_version() calls TLS 1.3

# Big enough to take a whole TLS record (16 KiB + overhead) in one read.
_READ_CHUNK: Final = 65536
# ServerTls reads OpenSSL's output in steps of one TLS record: large buffers
# cost a big malloc per call in pyOpenSSL and NTS-KE messages are small.
_RECORD_CHUNK: Final = 16384
_CLOSE_WAIT: Final = 1.0  # seconds we wait for the transport to close in close()

_IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# pyOpenSSL's verify callback: (connection, certificate, error, depth, preverify_ok).
_VerifyFn = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]
_ServerKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | dsa.DSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


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


# --- names -----------------------------------------------------------------


def _parse_ip(name: str) -> _IpAddress | None:
    """The IP address ``name`` spells (``[::1]`` accepted), or None for a host name."""
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None


def _dns_form(name: str) -> str:
    """A host name as certificates spell it: A-labels, lower case, no trailing dot."""
    name = name.rstrip(".")
    if not name.isascii():
        # Certificates carry IDNs as A-labels ("xn--..."); so must the name we compare.
        name = name.encode("idna").decode("ascii")
    return name.lower()


def _dns_pattern_matches(pattern: str, name: str) -> bool:
    """RFC 6125 s6.4: exact match, or ``*`` as the whole leftmost label of a pattern
    with at least two more labels, matching exactly one label of ``name``."""
    pattern = pattern.rstrip(".").lower()
    if not pattern.startswith("*."):
        return pattern == name
    suffix = pattern[1:]  # ".example.com"
    if suffix.count(".") < 2 or "*" in suffix:
        return False
    head, dot, rest = name.partition(".")
    return bool(head) and dot == "." and "." + rest == suffix


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def certificate_matches(cert: x509.Certificate, server_name: str) -> bool:
    """Whether ``cert`` is valid for ``server_name`` (a host name or IP literal).

    Only the subjectAltName counts (RFC 6125 s6.4.4: no fall-back to the
    subject CN when a SAN exists, and we require one).  An IP literal matches
    only an iPAddress entry; a host name only dNSName entries.
    """
    san = _san(cert)
    if san is None:
        return False
    ip = _parse_ip(server_name)
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    try:
        name = _dns_form(server_name)
    except UnicodeError:
        return False
    return any(_dns_pattern_matches(p, name) for p in san.get_values_for_type(x509.DNSName))


def _names_of(cert: x509.Certificate) -> str:
    san = _san(cert)
    if san is None:
        return f"no subjectAltName; subject {cert.subject.rfc4514_string()}"
    names = list(san.get_values_for_type(x509.DNSName))
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return ", ".join(names) if names else "no DNS names or IP addresses"


# --- verification ------------------------------------------------------------


@dataclass(slots=True)
class _VerifyFailure:
    code: int
    depth: int
    cert: x509.Certificate | None


@dataclass(slots=True)
class _PeerCheck:
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
            if _parse_ip(self.server_name) is not None
            else VerifyError.HOSTNAME_MISMATCH
        )
        return self.fail(code, 0, leaf)


def _verify_callback(no_time_check: bool) -> _VerifyFn:
    def verify(conn: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int) -> bool:
        check = conn.get_app_data()
        if not isinstance(check, _PeerCheck):
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


def _when(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def _certificate_message(failure: _VerifyFailure, host: str, server_name: str) -> str:
    """One line for a user, from the first verify error OpenSSL reported."""
    code, depth, cert = failure.code, failure.depth, failure.cert
    who = f"certificate of {host}"
    subject = cert.subject.rfc4514_string() if cert is not None else "?"
    issuer = cert.issuer.rfc4514_string() if cert is not None else "?"
    # For errors on a CA certificate, say which one.
    which = "" if depth == 0 else f"CA certificate {subject} at depth {depth}, "
    clock = "is the local clock wrong? see nocerttimecheck"
    if code == VerifyError.CERT_HAS_EXPIRED and cert is not None:
        return f"{who} has expired ({which}notAfter {_when(cert.not_valid_after_utc)}); {clock}"
    if code == VerifyError.CERT_NOT_YET_VALID and cert is not None:
        return (
            f"{who} is not yet valid ({which}notBefore {_when(cert.not_valid_before_utc)}); {clock}"
        )
    if code in (VerifyError.CRL_HAS_EXPIRED, VerifyError.CRL_NOT_YET_VALID):
        state = "has expired" if code == VerifyError.CRL_HAS_EXPIRED else "is not yet valid"
        return f"a revocation list for the {who} {state}; {clock}"
    if code in (VerifyError.HOSTNAME_MISMATCH, VerifyError.IP_ADDRESS_MISMATCH):
        names = _names_of(cert) if cert is not None else "?"
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


# --- contexts ----------------------------------------------------------------


def _new_tls13_context() -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    return ctx


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise CertificateError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _pem_certificates(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(f"{what} {path} holds no readable PEM certificate") from None


def _trusted_certificates(path: Path) -> list[x509.Certificate]:
    """Certificates from a trusted file, or from every PEM file in a trusted directory."""
    if not path.is_dir():
        return _pem_certificates(_read_file(path, "trusted certificate file"), path, "file")
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
        data = _read_file(entry, "trusted certificate file")
        # Directories hold other things too (READMEs, CRLs, keys): only
        # files with a PEM certificate count, and those must parse.
        if b"-----BEGIN CERTIFICATE-----" in data:
            certs += _pem_certificates(data, entry, "file")
    if not certs:
        raise CertificateError(f"trusted certificate directory {path} holds no PEM certificate")
    return certs


def client_context(trust: TrustConfig) -> SSL.Context:
    """A client Context for NTS-KE: TLS 1.3 only, ALPN ``ntske/1``, server verified.

    One Context can serve many connections (:meth:`TlsStream.connect` accepts it
    in place of a :class:`TrustConfig`).  Raises :class:`CertificateError` if a
    trusted certificate file or directory cannot be used.
    """
    ctx = _new_tls13_context()
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


class ServerTlsFailure(TlsError):
    """How :class:`ServerTls` failed, named as the NTS-KE server's outcome table names
    it (``kind``: ``tls``, ``alpn``, ``no-alpn``, ``tls-receive``; the compiled engine
    reports the same kinds), with OpenSSL's reason or the offered ALPN list (its wire
    form, RFC 7301 s3.1) as ``detail``."""

    def __init__(self, message: str, kind: str, detail: str | bytes | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.detail = detail


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    if NTSKE_ALPN in offered:
        return NTSKE_ALPN
    # Raising makes pyOpenSSL answer SSL_TLSEXT_ERR_ALERT_FATAL, so OpenSSL sends
    # a no_application_protocol alert (RFC 7301 s3.2); do_handshake then raises
    # this very exception.  NO_OVERLAPPING_PROTOCOLS would carry on without ALPN.
    names = ", ".join(p.decode("ascii", "replace") for p in offered) or "nothing"
    wire = b"".join(bytes([len(p)]) + p for p in offered if len(p) < 256)
    raise ServerTlsFailure(f"client offered ALPN {names}, not {NTSKE_ALPN.decode()}",
                           "alpn", wire)


# Key exchange groups the server prefers, cheapest first (docs/performance.md):
# X25519 costs the server ~0.04 ms less per handshake than the X25519MLKEM768
# hybrid OpenSSL >= 3.5 would pick by default, and its ServerHello is 1 KiB
# shorter.  The hybrid stays available to clients that offer nothing else.
# NTS-KE keys only authenticate time packets for a few days, so recording a
# session today to break it with a quantum computer later gains nothing.
# OpenSSL >= 3.5 syntax: "/" separates tuples in the server's order of
# preference; within a tuple a group the client sent a key share for wins (no
# HelloRetryRequest), then the client's order, so the hybrid goes in a tuple of
# its own.  Older builds refuse the string and get the first tuple.
SERVER_GROUPS: Final = "X25519:secp256r1:secp384r1/X25519MLKEM768"
SERVER_SUITES: Final = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


def _tune_server_context(ctx: SSL.Context) -> None:
    """Settings that make a server handshake cheaper without weakening it."""
    # No TLS 1.3 session tickets: NTS-KE clients do not resume (each KE wants
    # fresh keys and cookies), so the two NewSessionTickets OpenSSL would send
    # cost CPU, a network write and ~350 bytes for nothing.  OP_NO_TICKET alone
    # would switch to stateful tickets; without a session cache none are sent.
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    raw = ctx._context  # the only way to reach the two settings below
    # Our order of TLS 1.3 suites, not the client's: AES-128-GCM with SHA-256
    # first (OpenSSL's default puts AES-256/SHA-384 first), ~0.01 ms less per
    # handshake.  The TLS keys only protect one NTS-KE exchange, which gains
    # nothing from 256-bit AES; all three RFC 8446 suites stay allowed.
    ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
    _ssl_lib.SSL_CTX_set_ciphersuites(raw, SERVER_SUITES.encode("ascii"))
    # pyOpenSSL has no set_groups(); SSL_CTX_set1_curves_list is the same call.
    # Older OpenSSL builds may lack a group: then keep the ones they know.
    for groups in (SERVER_GROUPS, SERVER_GROUPS.partition("/")[0]):
        if _ssl_lib.SSL_CTX_set1_curves_list(raw, groups.encode("ascii")) == 1:
            return


@dataclass(slots=True)
class _ServerPair:
    cert_chain: Path
    key: Path
    chain: list[x509.Certificate]  # leaf first
    private_key: _ServerKey
    _context: SSL.Context | None = None

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def context(self) -> SSL.Context:
        """The pyOpenSSL server Context for this pair, made on first use: a
        server whose NTS-KE runs on the compiled engine never needs one (and
        saves the memory OpenSSL takes to set it up)."""
        if self._context is None:
            self._context = _pair_context(self)
        return self._context


def _public_key_der(key: x509.Certificate | _ServerKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pair_context(pair: _ServerPair) -> SSL.Context:
    ctx = _new_tls13_context()
    ctx.set_verify(SSL.VERIFY_NONE)  # NTS-KE does not use client certificates
    ctx.set_alpn_select_callback(_select_alpn)
    _tune_server_context(ctx)
    try:
        ctx.use_certificate(pair.leaf)
        for extra in pair.chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(pair.private_key)
        ctx.check_privatekey()
    except SSL.Error:
        raise CertificateError(
            f"server key {pair.key} does not match certificate {pair.cert_chain}"
        ) from None
    return ctx


def _load_server_pair(cert_chain: Path, key_path: Path, now: datetime | None) -> _ServerPair:
    chain = _pem_certificates(
        _read_file(cert_chain, "server certificate file"),
        cert_chain,
        "server certificate file",
    )
    leaf = chain[0]
    key_data = _read_file(key_path, "server key file")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise CertificateError(
            f"server key file {key_path} is encrypted; ntspy needs an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(
            f"server key file {key_path} holds no readable PEM private key"
        ) from None
    if not isinstance(key, _ServerKey):
        raise CertificateError(f"server key file {key_path} holds a key that cannot sign")
    if now is not None and leaf.not_valid_after_utc < now:
        raise CertificateError(
            f"server certificate {cert_chain} expired on {_when(leaf.not_valid_after_utc)}"
        )
    if _public_key_der(leaf) != _public_key_der(key):
        raise CertificateError(f"server key {key_path} does not match certificate {cert_chain}")
    return _ServerPair(cert_chain, key_path, chain, key)


def server_context(cert_chain: Path, key: Path, *, now: datetime | None = None) -> SSL.Context:
    """A server Context for NTS-KE: TLS 1.3 only, client must offer ALPN ``ntske/1``.

    ``cert_chain`` is a PEM file with the server certificate first, then any
    intermediates; ``key`` its unencrypted PEM private key.  Raises
    :class:`CertificateError` with a clear message if a file is missing,
    unreadable or not PEM, if the key does not match the certificate, or, when
    ``now`` is given, if the certificate has expired by then.
    """
    return _load_server_pair(cert_chain, key, now).context


class ServerContexts:
    """Several certificate/key pairs, chosen per connection by the client's SNI.

    The first pair is the default (no SNI, or no certificate matches).  Pass
    :meth:`context` (or this object) to :meth:`TlsStream.accept`; the server
    name callback switches the connection to the matching pair's Context.

    The pyOpenSSL Contexts are made when first asked for, or at once when the
    compiled engine cannot serve these pairs (:attr:`native` is None): a
    server on the engine never needs them.
    """

    def __init__(self, pairs: Sequence[tuple[Path, Path]], now: datetime) -> None:
        if not pairs:
            raise CertificateError("no server certificate and key configured")
        self._paths = list(pairs)
        self._armed = False  # whether the pairs' Contexts exist, with the SNI callback
        self._pairs, self.native = self._load(now)

    def _load(self, now: datetime) -> tuple[list[_ServerPair], NativeTlsContext | None]:
        loaded = [_load_server_pair(cert, key, now) for cert, key in self._paths]
        native = _native_context(loaded)
        if native is None or self._armed:
            self._arm(loaded)  # any error now, while the old pairs still serve
        return loaded, native

    def _arm(self, pairs: list[_ServerPair]) -> None:
        for pair in pairs:
            pair.context.set_tlsext_servername_callback(self._on_server_name)
        self._armed = True

    def _on_server_name(self, conn: SSL.Connection) -> None:
        raw = conn.get_servername()
        if raw is None:
            return
        name = raw.decode("ascii", "replace")
        for pair in self._pairs:
            if certificate_matches(pair.leaf, name):
                conn.set_context(pair.context)
                return

    def context(self) -> SSL.Context:
        """The Context to create server Connections with (the default pair's)."""
        if not self._armed:
            self._arm(self._pairs)
        return self._pairs[0].context

    @property
    def certificates(self) -> list[x509.Certificate]:
        """The leaf certificate of every pair, default first."""
        return [pair.leaf for pair in self._pairs]

    def reload(self, now: datetime) -> None:
        """Re-read every certificate and key file (e.g. on SIGHUP).

        All or nothing: on any failure the old contexts stay in use and
        :class:`CertificateError` is raised.  Connections already open keep
        their certificates.
        """
        self._pairs, self.native = self._load(now)


# --- the stream ----------------------------------------------------------------


def _export(conn: SSL.Connection, label: bytes, length: int, context: bytes) -> bytes:
    try:
        return bytes(conn.export_keying_material(label, length, context))
    except SSL.Error as e:
        raise TlsError(f"TLS exporter failed: {_ssl_reason(e)}") from None


class _PeerClosed(Exception):
    """The transport hit EOF in the middle of the handshake."""


def _ssl_reason(error: SSL.Error) -> str:
    """OpenSSL's reason strings from a pyOpenSSL error, e.g. ``tlsv1 alert protocol version``."""
    if isinstance(error, SSL.SysCallError):
        return str(error.args[1]) if len(error.args) > 1 else "system call failed"
    reasons: list[str] = []
    if error.args and isinstance(error.args[0], list):
        for entry in error.args[0]:
            if isinstance(entry, tuple) and entry:
                reasons.append(str(entry[-1]))
    return "; ".join(r for r in reasons if r) or str(error) or type(error).__name__


_VERSION_REASONS: Final = (
    "protocol version",
    "unsupported protocol",
    "wrong version number",
    "no protocols available",
    "wrong ssl version",
)


def handshake_error(reason: str, who: str, where: str) -> TlsError:
    lowered = reason.lower()
    if any(r in lowered for r in _VERSION_REASONS):
        return TlsError(f"{who} does not speak TLS 1.3, which NTS-KE requires ({reason})")
    if "no application protocol" in lowered:
        return TlsError(f"{who} did not agree to ALPN {NTSKE_ALPN.decode()} ({reason})")
    return TlsError(f"TLS handshake with {where} failed: {reason}")


class TlsStream:
    """TLS over an asyncio (reader, writer) using memory BIOs.

    Create one with :meth:`connect` (client) or :meth:`accept` (server); both
    return only after a complete, verified TLS 1.3 handshake with ALPN ``ntske/1``.
    """

    __slots__ = ("_closed", "_conn", "_peer", "_reader", "_writer")

    def __init__(
        self,
        conn: SSL.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> None:
        self._conn = conn
        self._reader = reader
        self._writer = writer
        self._peer = peer
        self._closed = False

    # -- opening ---------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        server_name: str,
        trust: TrustConfig | SSL.Context,
        connect_timeout: float = 5.0,
        handshake_timeout: float = 5.0,
    ) -> TlsStream:
        """Open TCP to ``host``:``port`` (IPv4 or IPv6) and run the client handshake.

        ``server_name`` is sent as SNI (unless it is an IP literal) and checked
        against the certificate.  ``trust`` is a :class:`TrustConfig` or a
        Context from :func:`client_context` to reuse.  Raises
        :class:`KeConnectionError`, :class:`CertificateError` or :class:`TlsError`.
        """
        ctx = trust if isinstance(trust, SSL.Context) else client_context(trust)
        reader, writer = await _open_tcp(host, port, connect_timeout)
        return await cls.handshake_client(
            reader,
            writer,
            ctx,
            server_name=server_name,
            host=host,
            port=port,
            handshake_timeout=handshake_timeout,
        )

    @classmethod
    async def handshake_client(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        context: SSL.Context,
        *,
        server_name: str,
        host: str,
        port: int,
        handshake_timeout: float,
    ) -> TlsStream:
        """Run the client handshake over an open connection (``connect`` minus TCP).

        ``host`` and ``port`` only name the peer in error messages.  The
        transport is closed if the handshake fails.
        """
        conn = SSL.Connection(context, None)
        conn.set_connect_state()
        if _parse_ip(server_name) is None:
            # RFC 6066 s3: SNI carries host names only, never IP literals.
            conn.set_tlsext_host_name(_dns_form(server_name).encode("ascii"))
        check = _PeerCheck(server_name)
        conn.set_app_data(check)
        where = f"{host} port {port}"
        stream = cls(conn, reader, writer, where)
        try:
            try:
                async with asyncio.timeout(handshake_timeout):
                    await stream._handshake()
            except TimeoutError:
                raise KeTimeoutError(
                    f"TLS handshake with {where} timed out (no answer within "
                    f"{format_duration(handshake_timeout)}; is it an NTS-KE server?)"
                ) from None
            except SSL.Error as e:
                if check.failure is not None:
                    raise CertificateVerifyError(
                        _certificate_message(check.failure, host, server_name),
                        check.failure.code,
                    ) from None
                raise handshake_error(_ssl_reason(e), host, where) from None
            except _PeerClosed:
                raise KeConnectionError(
                    f"{where} closed the connection during the TLS handshake "
                    "(is it an NTS-KE server?)"
                ) from None
            except OSError as e:
                raise KeConnectionError(
                    f"connection to {where} failed during the TLS handshake: {e.strerror or e}"
                ) from None
            stream._check_client_result(check, host)
        except BaseException:
            await stream.close()
            raise
        return stream

    def _check_client_result(self, check: _PeerCheck, host: str) -> None:
        if not check.name_checked:
            # OpenSSL calls the verify callback for the leaf on every successful
            # verification; this guards the name check should it ever not.
            leaf = self.peer_certificate
            if leaf is None:
                raise CertificateVerifyError(f"{host} sent no certificate")
            if not check.check_name(leaf) and check.failure is not None:
                raise CertificateVerifyError(
                    _certificate_message(check.failure, host, check.server_name),
                    check.failure.code,
                )
        version = self.protocol_version
        if version != TLS13_NAME:
            raise TlsError(f"{host} does not speak TLS 1.3, which NTS-KE requires (got {version})")
        if self.alpn != NTSKE_ALPN:
            raise TlsError(f"{host} did not agree to ALPN {NTSKE_ALPN.decode()}")

    @classmethod
    async def accept(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ctx_or_contexts: SSL.Context | ServerContexts,
        *,
        handshake_timeout: float,
    ) -> TlsStream:
        """Run the server handshake on a freshly accepted connection.

        Raises :class:`TlsError` (wrong version, no ``ntske/1`` ALPN, other TLS
        failure) or :class:`KeConnectionError` (timeout, client hung up); the
        transport is closed then.
        """
        ctx = (
            ctx_or_contexts.context()
            if isinstance(ctx_or_contexts, ServerContexts)
            else ctx_or_contexts
        )
        conn = SSL.Connection(ctx, None)
        conn.set_accept_state()
        who = _describe_client(writer)
        stream = cls(conn, reader, writer, who)
        try:
            try:
                async with asyncio.timeout(handshake_timeout):
                    await stream._handshake()
            except TimeoutError:
                raise KeTimeoutError(f"TLS handshake with {who} timed out") from None
            except TlsError as e:  # from the ALPN callback
                raise TlsError(f"{who}: {e}") from None
            except SSL.Error as e:
                raise handshake_error(_ssl_reason(e), who, who) from None
            except _PeerClosed:
                raise KeConnectionError(
                    f"{who} closed the connection during the TLS handshake"
                ) from None
            except OSError as e:
                raise KeConnectionError(
                    f"connection with {who} failed during the TLS handshake: {e.strerror or e}"
                ) from None
            # A client that offers no ALPN at all never reaches the ALPN callback.
            if stream.alpn != NTSKE_ALPN:
                raise TlsError(f"{who} did not offer ALPN {NTSKE_ALPN.decode()}")
            if stream.protocol_version != TLS13_NAME:
                raise TlsError(f"{who} does not speak TLS 1.3, which NTS-KE requires")
        except BaseException:
            await stream.close()
            raise
        return stream

    # -- the BIO pump -------------------------------------------------------------

    def _pending_output(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._conn.bio_read(_READ_CHUNK)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    async def _flush(self) -> None:
        data = self._pending_output()
        if data:
            # One write for everything OpenSSL produced, so a KE request that
            # fits in one record leaves in one segment (NTPsec relies on it).
            self._writer.write(data)
            await self._writer.drain()

    async def _flush_quietly(self) -> None:
        # Deliver a fatal alert if we can; the peer may already be gone.
        with contextlib.suppress(OSError):
            await self._flush()

    async def _fill(self) -> bool:
        """Feed OpenSSL the next bytes from the network; False on EOF."""
        data = await self._reader.read(_READ_CHUNK)
        if not data:
            return False
        self._conn.bio_write(data)
        return True

    async def _handshake(self) -> None:
        while True:
            try:
                self._conn.do_handshake()
            except SSL.WantReadError:
                await self._flush()
                if not await self._fill():
                    raise _PeerClosed from None
                continue
            except (SSL.Error, NtsError):
                await self._flush_quietly()
                raise
            # The client's Finished, or the server's session tickets.
            await self._flush()
            return

    # -- data ---------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Encrypt ``data`` and write it to the network in one transport write."""
        view = memoryview(data)
        try:
            while view:
                sent = self._conn.send(view)
                view = view[sent:]
        except SSL.Error as e:
            raise TlsError(f"TLS error sending to {self._peer}: {_ssl_reason(e)}") from None
        try:
            await self._flush()
        except OSError as e:
            raise KeConnectionError(
                f"connection to {self._peer} lost while sending: {e.strerror or e}"
            ) from None

    async def recv(self, max_bytes: int = 16384, timeout: float | None = None) -> bytes:
        """Up to ``max_bytes`` of decrypted data; ``b""`` at end of stream.

        End of stream is the peer's close_notify or a plain TCP close: NTS-KE
        messages end with their own End of Message record, so the KE parser
        notices truncation.  Raises :class:`KeConnectionError` after ``timeout``
        seconds without data.
        """
        if timeout is None:
            return await self._recv(max_bytes)
        try:
            async with asyncio.timeout(timeout):
                return await self._recv(max_bytes)
        except TimeoutError:
            raise KeTimeoutError(
                f"{self._peer} sent nothing for {format_duration(timeout)}"
            ) from None

    async def _recv(self, max_bytes: int) -> bytes:
        while True:
            try:
                return self._conn.recv(max_bytes)
            except SSL.WantReadError:
                pass
            except SSL.ZeroReturnError:
                return b""
            except SSL.Error as e:
                await self._flush_quietly()
                raise TlsError(f"TLS error receiving from {self._peer}: {_ssl_reason(e)}") from None
            try:
                await self._flush()  # e.g. a KeyUpdate answer
                if not await self._fill():
                    return b""
            except OSError as e:
                raise KeConnectionError(
                    f"connection to {self._peer} lost while receiving: {e.strerror or e}"
                ) from None

    def export_keying_material(self, label: bytes, length: int, context: bytes) -> bytes:
        """RFC 8446 s7.5 exporter (RFC 5705 interface), as RFC 8915 s5.1 uses it."""
        return _export(self._conn, label, length, context)

    # -- facts about the session ---------------------------------------------------

    @property
    def protocol_version(self) -> str:
        """The negotiated protocol as OpenSSL names it (always ``TLSv1.3`` here)."""
        return self._conn.get_protocol_version_name()

    @property
    def alpn(self) -> bytes | None:
        """The negotiated ALPN protocol, or None."""
        return self._conn.get_alpn_proto_negotiated() or None

    @property
    def server_name(self) -> str | None:
        """The SNI: the one the client sent (server side) or that we sent (client side)."""
        raw = self._conn.get_servername()
        return raw.decode("ascii", "replace") if raw is not None else None

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's leaf certificate (None on the server: no client certificates)."""
        return self._conn.get_peer_certificate(as_cryptography=True)

    @property
    def peer(self) -> str:
        """Who is at the other end, as error messages name it."""
        return self._peer

    async def close(self) -> None:
        """Send close_notify if possible and close the transport. Never raises."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._conn.shutdown()  # queues close_notify; fails harmlessly mid-handshake
        with contextlib.suppress(Exception):
            data = self._pending_output()
            if data:
                self._writer.write(data)
        with contextlib.suppress(Exception):
            self._writer.close()
            async with asyncio.timeout(_CLOSE_WAIT):
                await self._writer.wait_closed()


class ServerTls:
    """The server half of one NTS-KE TLS session over memory BIOs, with no I/O.

    For an :class:`asyncio.Protocol` (``server/ke_server.py``): hand it every
    byte that arrives (:meth:`handshake` until it returns True, then
    :meth:`receive`), and write :meth:`output` to the network after each step.
    It enforces what :meth:`TlsStream.accept` enforces (TLS 1.3, ALPN
    ``ntske/1``, SNI certificate selection through :class:`ServerContexts`)
    with the same error messages, without a StreamReader/StreamWriter pair or
    a task per connection.  ``who`` names the client in error messages.
    """

    __slots__ = ("_conn", "who")

    def __init__(self, ctx_or_contexts: SSL.Context | ServerContexts, who: str) -> None:
        ctx = (
            ctx_or_contexts.context()
            if isinstance(ctx_or_contexts, ServerContexts)
            else ctx_or_contexts
        )
        self._conn = SSL.Connection(ctx, None)
        self._conn.set_accept_state()
        self.who = who

    def handshake(self, data: bytes) -> bool:
        """Feed received bytes and advance the handshake; True once it is complete.

        Raises :class:`TlsError` for a failed handshake (wrong version, no
        ``ntske/1`` ALPN, anything else OpenSSL refuses); any alert OpenSSL
        produced is waiting in :meth:`output` then.
        """
        conn = self._conn
        if data:
            conn.bio_write(data)
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            return False
        except ServerTlsFailure as e:  # from the ALPN callback
            raise ServerTlsFailure(f"{self.who}: {e}", e.kind, e.detail) from None
        except SSL.Error as e:
            reason = _ssl_reason(e)
            raise ServerTlsFailure(str(handshake_error(reason, self.who, self.who)), "tls",
                                   reason) from None
        # A client that offers no ALPN at all never reaches the ALPN callback.
        if conn.get_alpn_proto_negotiated() != NTSKE_ALPN:
            raise ServerTlsFailure(f"{self.who} did not offer ALPN {NTSKE_ALPN.decode()}",
                                   "no-alpn")
        if conn.get_protocol_version_name() != TLS13_NAME:
            raise ServerTlsFailure(f"{self.who} does not speak TLS 1.3, which NTS-KE "
                                   "requires", "tls", "unsupported protocol")
        return True

    def receive(self, data: bytes = b"") -> tuple[bytes, bool]:
        """Feed received bytes; return the application data now readable and
        whether the client ended the stream (close_notify).

        Raises :class:`TlsError` for a TLS-level error (a bad record, say).
        """
        conn = self._conn
        if data:
            conn.bio_write(data)
        chunks: list[bytes] = []
        ended = False
        while True:
            try:
                chunk = conn.recv(_RECORD_CHUNK)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                ended = True
                break
            except SSL.Error as e:
                reason = _ssl_reason(e)
                raise ServerTlsFailure(f"TLS error receiving from {self.who}: {reason}",
                                       "tls-receive", reason) from None
            if not chunk:
                ended = True
                break
            chunks.append(chunk)
        return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), ended

    def send(self, data: bytes) -> None:
        """Encrypt ``data``; the records wait in :meth:`output`."""
        view = memoryview(data)
        try:
            while view:
                view = view[self._conn.send(view) :]
        except SSL.Error as e:
            raise TlsError(f"TLS error sending to {self.who}: {_ssl_reason(e)}") from None

    def close_notify(self) -> None:
        """Queue a close_notify alert (harmless no-op mid-handshake). Never raises."""
        with contextlib.suppress(Exception):
            self._conn.shutdown()

    def output(self) -> bytes:
        """Every byte OpenSSL has produced for the network since the last call."""
        conn = self._conn
        chunks: list[bytes] = []
        while True:
            try:
                chunk = conn.bio_read(_RECORD_CHUNK)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    def export_keying_material(self, label: bytes, length: int, context: bytes) -> bytes:
        """RFC 8446 s7.5 exporter (RFC 5705 interface), as RFC 8915 s5.1 uses it."""
        return _export(self._conn, label, length, context)

    @property
    def server_name(self) -> str | None:
        """The SNI the client sent, if any."""
        raw = self._conn.get_servername()
        return raw.decode("ascii", "replace") if raw is not None else None


def _native_context(pairs: Sequence[_ServerPair]) -> NativeTlsContext | None:
    """The same pairs for the compiled NTS-KE server (``ntspy._ke``), if it is built.

    It gets the certificates and keys this module has already checked, in
    canonical PEM, so both paths serve exactly the same credentials.  None
    when the module is missing or the system OpenSSL refuses a pair (the
    asyncio path then serves, with pyOpenSSL).
    """
    if not HAVE_NATIVE_KE:
        return None
    pem = serialization.Encoding.PEM
    try:
        return NativeTlsContext(
            [
                (
                    b"".join(cert.public_bytes(pem) for cert in pair.chain),
                    pair.private_key.private_bytes(
                        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                    ),
                )
                for pair in pairs
            ]
        )
    except ValueError as exc:
        log.warning("NTS-KE served from Python: the compiled server refused the "
                    "certificates (%s)", exc)
        return None


def _describe_client(writer: asyncio.StreamWriter) -> str:
    peername = writer.get_extra_info("peername")
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"client {peername[0]} port {peername[1]}"
    return "client"


async def _open_tcp(
    host: str, port: int, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    refused = (
        f"connection refused by {host} port {port} "
        f"(is the NTS-KE server running? firewall blocking TCP {port}?)"
    )
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.open_connection(host, port)
    except TimeoutError:
        raise KeTimeoutError(
            f"connection to {host} port {port} timed out (no answer within "
            f"{format_duration(timeout)}; "
            f"host down, or a firewall dropping TCP {port}?)"
        ) from None
    except ConnectionRefusedError:
        raise KeConnectionError(refused) from None
    except socket.gaierror as e:
        raise KeConnectionError(f"cannot resolve {host}: {e.strerror or e}") from None
    except OSError as e:
        # asyncio merges the errors of several addresses into one OSError.
        if "refused" in str(e).lower():
            raise KeConnectionError(refused) from None
        raise KeConnectionError(
            f"cannot connect to {host} port {port}: {e.strerror or e}"
        ) from None
