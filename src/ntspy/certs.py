"""Throwaway certificates for ``ntspy demo``, tests and benchmarks.

This is a test and demo utility, not protocol code: it reads the wall clock
(``datetime.now(timezone.utc)``) for default validity periods.  Never use these
certificates for a real server; their keys live in plain files.

Layout written by :func:`make_test_pki`::

    ca.pem          the self-signed CA certificate (give it to clients as a trusted cert)
    server.pem      the server certificate only (leaf); the CA is *not* appended
                    because a root is never sent in a chain
    server.key      the server's private key, PKCS#8 PEM, file mode 0600
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT_FILE = "ca.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"

# The CA outlives any server certificate we issue under it, so that tests of an
# expired or not-yet-valid *server* certificate fail on the leaf, not on the CA.
_CA_MARGIN = timedelta(days=365)
_DEFAULT_BACKDATE = timedelta(hours=1)
_DEFAULT_LIFETIME = timedelta(days=30)

_SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(slots=True)
class CertPaths:
    """Where :func:`make_test_pki` wrote its files."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(slots=True)
class CertSummary:
    """What a user wants to know about a certificate file at a glance."""

    subject: str
    issuer: str
    not_before: datetime
    not_after: datetime
    dns_names: list[str]
    ip_addresses: list[str]


def _new_key(key_type: str) -> _SigningKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"key_type must be 'ec' or 'rsa', not {key_type!r}")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hostnames: Sequence[str], ips: Sequence[str]) -> x509.SubjectAlternativeName:
    general: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    general += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    return x509.SubjectAlternativeName(general)


def _write_key(path: Path, key: _SigningKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Create with 0600 from the start: a chmod afterwards would leave a window
    # in which the key is readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(path, 0o600)  # O_CREAT does not change the mode of an existing file


def _write_certs(path: Path, certs: Sequence[x509.Certificate]) -> None:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))


def _validity(
    not_before: datetime | None, not_after: datetime | None
) -> tuple[datetime, datetime, datetime]:
    now = datetime.now(UTC)
    start = not_before if not_before is not None else now - _DEFAULT_BACKDATE
    end = not_after if not_after is not None else now + _DEFAULT_LIFETIME
    if end <= start:
        raise ValueError("not_after must be later than not_before")
    return now, start, end


def make_test_pki(
    directory: Path,
    hostnames: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1", "::1"),
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    key_type: str = "ec",
    ca_name: str = "ntspy throwaway CA",
) -> CertPaths:
    """Write a throwaway CA and a server certificate signed by it into ``directory``.

    The server certificate carries a subjectAltName with every name in
    ``hostnames`` (dNSName) and ``ips`` (iPAddress), and the serverAuth extended
    key usage.  ``not_before``/``not_after`` set the *server* certificate's
    validity (default: one hour ago until 30 days from now); the CA is always
    valid for that whole range and for the present, so a test with a past or
    future server certificate fails on the server certificate alone.

    ``key_type`` is ``"ec"`` (P-256, the default) or ``"rsa"`` (2048 bits); both
    keys use it.  Files are named as in the module docstring; existing files
    are overwritten.
    """
    now, start, end = _validity(not_before, not_after)
    directory.mkdir(parents=True, exist_ok=True)

    ca_key = _new_key(key_type)
    ca_subject = _name(ca_name)
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(start, now) - _CA_MARGIN)
        .not_valid_after(max(end, now) + _CA_MARGIN)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = _new_key(key_type)
    common_name = hostnames[0] if hostnames else (ips[0] if ips else "ntspy test server")
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                # RSA key exchange is gone in TLS 1.3, but some validators still
                # expect this bit on RSA server certificates.
                key_encipherment=key_type == "rsa",
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hostnames, ips), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    paths = CertPaths(
        ca_cert=directory / CA_CERT_FILE,
        server_cert=directory / SERVER_CERT_FILE,
        server_key=directory / SERVER_KEY_FILE,
    )
    _write_certs(paths.ca_cert, [ca_cert])
    _write_certs(paths.server_cert, [server_cert])
    _write_key(paths.server_key, server_key)
    return paths


def make_self_signed(
    directory: Path,
    hostname: str = "localhost",
    ips: Sequence[str] = ("127.0.0.1", "::1"),
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    key_type: str = "ec",
    stem: str = "selfsigned",
) -> tuple[Path, Path]:
    """Write a self-signed server certificate and its key; return ``(cert, key)``.

    Files are ``<stem>.pem`` and ``<stem>.key`` (mode 0600) in ``directory``.
    The certificate is its own issuer and carries no keyUsage extension, so it
    can serve both as a server certificate and, when a client is told to trust
    this very file, as its own trust anchor.
    """
    _, start, end = _validity(not_before, not_after)
    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key(key_type)
    subject = _name(hostname)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san([hostname], ips), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{stem}.pem"
    key_path = directory / f"{stem}.key"
    _write_certs(cert_path, [cert])
    _write_key(key_path, key)
    return cert_path, key_path


def load_cert_summary(path: Path) -> CertSummary:
    """Summarize the first certificate of a PEM file (subject, issuer, validity, SAN).

    Raises ``ValueError`` if the file holds no PEM certificate and ``OSError``
    if it cannot be read.
    """
    cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = san.get_values_for_type(x509.DNSName)
        ip_addresses = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns_names, ip_addresses = [], []
    return CertSummary(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        dns_names=dns_names,
        ip_addresses=ip_addresses,
    )
