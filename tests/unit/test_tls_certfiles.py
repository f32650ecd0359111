"""Reading certificate files (net/tls/certfiles.py): one clear line per failure."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from ntspy.certs import CertPaths
from ntspy.errors import CertificateError
from ntspy.net.tls.certfiles import pem_certificates, read_file, when


def test_reads_every_certificate_of_a_bundle(tmp_path: Path, pki: CertPaths) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.server_cert.read_bytes() + pki.ca_cert.read_bytes())
    certs = pem_certificates(read_file(bundle, "bundle"), bundle, "bundle")
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    assert len(certs) == 2
    assert certs[0].subject.rfc4514_string() == "CN=localhost"
    assert certs[1] == ca


def test_each_failure_names_the_file_as_the_caller_does(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(CertificateError) as info:
        read_file(missing, "server key file")
    assert str(info.value) == f"server key file {missing} does not exist"

    with pytest.raises(CertificateError) as info:
        read_file(tmp_path, "trusted file")  # a directory
    assert str(info.value) == f"cannot read trusted file {tmp_path}: Is a directory"

    junk = tmp_path / "junk.pem"
    with pytest.raises(CertificateError) as info:
        pem_certificates(b"hello\n", junk, "file")
    assert str(info.value) == f"file {junk} holds no readable PEM certificate"


def test_dates_read_in_utc() -> None:
    assert when(datetime(2026, 6, 1, 12, 30, 5, tzinfo=UTC)) == "2026-06-01 12:30:05 UTC"
