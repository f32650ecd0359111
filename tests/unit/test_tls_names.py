"""RFC 6125 server-name checks (net/tls/names.py): directly, and as the client's
handshake applies them over loopback."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from ntspy.certs import CertPaths, make_test_pki
from ntspy.net.tls.credentials import server_context
from ntspy.net.tls.names import certificate_matches
from tests.unit.tls_loopback import (
    connect,
    connect_error,
    connects,
    server_stream,
    tls_server,
    trust,
)


async def test_wrong_host_name(pki: CertPaths) -> None:
    error = await connect_error(pki, trust(pki.ca_cert), "ke.example.org")
    assert str(error) == (
        "certificate of 127.0.0.1 does not match name ke.example.org "
        "(it is for: localhost, 127.0.0.1, ::1)"
    )


async def test_ip_address_san_match(pki: CertPaths) -> None:
    async with tls_server(server_context(pki.server_cert, pki.server_key)) as (port, outcomes):
        stream = await connect(port, trust(pki.ca_cert), "127.0.0.1")
        server = await server_stream(outcomes)
        assert server.server_name is None  # RFC 6066: no SNI for an IP literal
        await stream.close()


async def test_ip_address_san_mismatch(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path, hostnames=["localhost"], ips=["127.0.0.2"])
    error = await connect_error(pki, trust(pki.ca_cert), "127.0.0.1")
    assert "does not match name 127.0.0.1 (it is for: localhost, 127.0.0.2)" in str(error)


async def test_wildcard_certificate(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path, hostnames=["*.example.net"], ips=[])
    await connects(pki, trust(pki.ca_cert), "ke.example.net")
    error = await connect_error(pki, trust(pki.ca_cert), "a.ke.example.net")
    assert "(it is for: *.example.net)" in str(error)


def test_certificate_name_matching(tmp_path: Path) -> None:
    pki = make_test_pki(
        tmp_path, hostnames=["*.example.com", "*.com", "Exact.Example"], ips=["::1"]
    )
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    assert certificate_matches(cert, "ke.example.com")
    assert certificate_matches(cert, "KE.Example.COM.")
    assert certificate_matches(cert, "exact.example")
    assert certificate_matches(cert, "::1")
    assert certificate_matches(cert, "[::1]")
    assert not certificate_matches(cert, "example.com")  # the wildcard needs a label
    assert not certificate_matches(cert, "a.b.example.com")  # and only one
    assert not certificate_matches(cert, "example.org")  # "*.com" is too broad to count
    assert not certificate_matches(cert, "0:0::2")
    assert not certificate_matches(cert, "127.0.0.1")


def test_ip_literal_matches_only_ip_entries(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path, hostnames=["127.0.0.1"], ips=["192.0.2.7"])
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    assert not certificate_matches(cert, "127.0.0.1")  # a dNSName that looks like an IP
    assert certificate_matches(cert, "192.0.2.7")
