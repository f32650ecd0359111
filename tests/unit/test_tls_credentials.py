"""The server's certificate/key pairs (net/tls/credentials.py): loading and
checking them, choosing one by SNI, reloading, over loopback."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from OpenSSL import SSL

from ntspy.certs import CertPaths, make_test_pki
from ntspy.errors import CertificateError
from ntspy.net.tls.credentials import ServerContexts, server_context
from tests.unit.tls_loopback import (
    connect,
    connects,
    san_dns,
    server_error,
    server_stream,
    tls_server,
    trust,
)


async def test_sni_selects_among_certificate_pairs(tmp_path: Path) -> None:
    a = make_test_pki(tmp_path / "a", hostnames=["a.example"], ips=[], ca_name="A CA")
    b = make_test_pki(tmp_path / "b", hostnames=["b.example"], ips=[], ca_name="B CA")
    contexts = ServerContexts(
        [(a.server_cert, a.server_key), (b.server_cert, b.server_key)], datetime.now(UTC)
    )
    both = trust(a.ca_cert, b.ca_cert)
    async with tls_server(contexts) as (port, outcomes):
        for name in ("b.example", "a.example"):
            stream = await connect(port, both, name)
            assert san_dns(stream.peer_certificate) == [name]
            server = await server_stream(outcomes)
            assert server.server_name == name
            await stream.close()
        # An unknown name gets the first (default) certificate.
        with pytest.raises(
            CertificateError, match=r"does not match name c\.example \(it is for: a\.example\)"
        ):
            await connect(port, both, "c.example")
        await server_error(outcomes)


async def test_reload_swaps_certificates_and_keeps_old_ones_on_failure(tmp_path: Path) -> None:
    live = tmp_path / "live"
    first = make_test_pki(live, ca_name="First CA")
    contexts = ServerContexts([(first.server_cert, first.server_key)], datetime.now(UTC))
    second = make_test_pki(tmp_path / "second", ca_name="Second CA")
    shutil.copy(second.ca_cert, tmp_path / "second-ca.pem")
    async with tls_server(contexts) as (port, _):
        await (await connect(port, trust(first.ca_cert))).close()

        shutil.copy(second.server_cert, first.server_cert)
        shutil.copy(second.server_key, first.server_key)
        contexts.reload(datetime.now(UTC))
        await (await connect(port, trust(second.ca_cert))).close()

        # A key that does not belong to the certificate: reload refuses, old pair serves on.
        third = make_test_pki(tmp_path / "third")
        shutil.copy(third.server_key, first.server_key)
        with pytest.raises(CertificateError, match="does not match certificate"):
            contexts.reload(datetime.now(UTC))
        await (await connect(port, trust(second.ca_cert))).close()
        assert contexts.certificates[0].issuer.rfc4514_string() == "CN=Second CA"


def test_server_contexts_make_pyopenssl_contexts_only_when_needed(
    tmp_path: Path, pki: CertPaths
) -> None:
    contexts = ServerContexts([(pki.server_cert, pki.server_key)], datetime.now(UTC))
    (pair,) = contexts._pairs
    # A server on the compiled engine never asks for them (memory OpenSSL
    # would take for nothing); without the engine they exist from the start.
    assert (pair._context is None) == (contexts.native is not None)
    ctx = contexts.context()
    assert isinstance(ctx, SSL.Context) and pair._context is ctx
    # The key must belong to the certificate either way, checked at load time.
    other = make_test_pki(tmp_path / "other")
    with pytest.raises(CertificateError, match="does not match certificate"):
        ServerContexts([(pki.server_cert, other.server_key)], datetime.now(UTC))


def test_server_contexts_needs_a_pair() -> None:
    with pytest.raises(CertificateError, match="no server certificate"):
        ServerContexts([], datetime.now(UTC))


def test_server_context_rejects_unusable_files(tmp_path: Path, pki: CertPaths) -> None:
    other = make_test_pki(tmp_path / "other")
    with pytest.raises(CertificateError, match="does not match certificate"):
        server_context(pki.server_cert, other.server_key)
    with pytest.raises(
        CertificateError, match=r"server certificate file .*nope\.pem does not exist"
    ):
        server_context(tmp_path / "nope.pem", pki.server_key)
    with pytest.raises(CertificateError, match=r"server key file .*nope\.key does not exist"):
        server_context(pki.server_cert, tmp_path / "nope.key")
    with pytest.raises(CertificateError, match="holds no readable PEM private key"):
        server_context(pki.server_cert, pki.server_cert)
    with pytest.raises(CertificateError, match="holds no readable PEM certificate"):
        server_context(pki.server_key, pki.server_key)


def test_server_context_rejects_expired_certificate(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    pki = make_test_pki(
        tmp_path, not_before=now - timedelta(days=9), not_after=now - timedelta(days=1)
    )
    with pytest.raises(CertificateError, match="expired on"):
        server_context(pki.server_cert, pki.server_key, now=now)
    with pytest.raises(CertificateError, match="expired on"):
        ServerContexts([(pki.server_cert, pki.server_key)], now)
    # Without a time the check is skipped (the caller decides).
    server_context(pki.server_cert, pki.server_key)


async def test_rsa_certificates_work(tmp_path: Path) -> None:
    await connects(make_test_pki(tmp_path, key_type="rsa"), trust(tmp_path / "ca.pem"))
