"""The throwaway PKI that demo, tests and benchmarks rely on."""

from __future__ import annotations

import ipaddress
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ntspy.certs import load_cert_summary, make_self_signed, make_test_pki


def _cert(path: Path) -> x509.Certificate:
    certs = x509.load_pem_x509_certificates(path.read_bytes())
    assert len(certs) == 1
    return certs[0]


def test_pki_server_cert_is_signed_by_ca_and_names_every_host_and_ip(tmp_path: Path) -> None:
    paths = make_test_pki(tmp_path, ["ke.example", "localhost"], ["127.0.0.1", "::1"])
    ca, server = _cert(paths.ca_cert), _cert(paths.server_cert)

    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ke.example", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku


def test_pki_key_matches_cert_and_is_private(tmp_path: Path) -> None:
    paths = make_test_pki(tmp_path)
    assert stat.S_IMODE(paths.server_key.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(paths.server_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == _cert(paths.server_cert).public_key()


def test_pki_rsa_option(tmp_path: Path) -> None:
    paths = make_test_pki(tmp_path, key_type="rsa")
    key = serialization.load_pem_private_key(paths.server_key.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    _cert(paths.server_cert).verify_directly_issued_by(_cert(paths.ca_cert))


def test_pki_default_validity_is_about_now_to_a_month(tmp_path: Path) -> None:
    before = datetime.now(UTC)
    server = _cert(make_test_pki(tmp_path).server_cert)
    after = datetime.now(UTC)
    # Certificates keep whole seconds, so allow the truncated second.
    second = timedelta(seconds=1)
    assert before - timedelta(hours=1) - second <= server.not_valid_before_utc
    assert server.not_valid_before_utc <= after - timedelta(hours=1)
    assert before + timedelta(days=30) - second <= server.not_valid_after_utc
    assert server.not_valid_after_utc <= after + timedelta(days=30)


def test_pki_explicit_validity_applies_to_server_and_ca_still_covers_now(
    tmp_path: Path,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    start, end = now - timedelta(days=20), now - timedelta(days=10)
    paths = make_test_pki(tmp_path, not_before=start, not_after=end)
    server, ca = _cert(paths.server_cert), _cert(paths.ca_cert)
    assert (server.not_valid_before_utc, server.not_valid_after_utc) == (start, end)
    assert ca.not_valid_before_utc <= start and ca.not_valid_after_utc > now


def test_pki_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="key_type"):
        make_test_pki(tmp_path, key_type="dsa")
    now = datetime.now(UTC)
    with pytest.raises(ValueError, match="not_after"):
        make_test_pki(tmp_path, not_before=now, not_after=now - timedelta(days=1))


def test_self_signed_is_its_own_issuer(tmp_path: Path) -> None:
    cert_path, key_path = make_self_signed(tmp_path, "ke.example", ["192.0.2.1"])
    cert = _cert(cert_path)
    cert.verify_directly_issued_by(cert)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    summary = load_cert_summary(cert_path)
    assert summary.subject == summary.issuer == "CN=ke.example"
    assert summary.dns_names == ["ke.example"]
    assert summary.ip_addresses == ["192.0.2.1"]
    assert summary.not_before < summary.not_after


def test_load_cert_summary_of_a_non_certificate(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError):
        load_cert_summary(junk)
