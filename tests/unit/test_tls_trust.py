"""The client's trust store and verify callback (net/tls/trust.py): which servers
it accepts and the message for each one it refuses, over loopback."""

from __future__ import annotations

import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ntspy.certs import CertPaths, make_self_signed, make_test_pki
from ntspy.errors import CertificateError
from ntspy.net.tls.credentials import server_context
from ntspy.net.tls.stream import TlsStream
from ntspy.net.tls.trust import TrustConfig, client_context
from tests.unit.tls_loopback import connect_error, connects, tls_server, trust


async def test_reusing_one_client_context(pki: CertPaths) -> None:
    ctx = client_context(trust(pki.ca_cert))
    async with tls_server(server_context(pki.server_cert, pki.server_key)) as (port, _):
        for _ in range(2):
            stream = await TlsStream.connect("127.0.0.1", port, server_name="localhost", trust=ctx)
            await stream.close()
        with pytest.raises(CertificateError, match=re.escape("does not match name other.example")):
            await TlsStream.connect("127.0.0.1", port, server_name="other.example", trust=ctx)


async def test_expired_certificate(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    end = (now - timedelta(days=1)).replace(microsecond=0)
    pki = make_test_pki(tmp_path, not_before=now - timedelta(days=10), not_after=end)
    error = await connect_error(pki, trust(pki.ca_cert))
    message = str(error)
    assert message.startswith("certificate of 127.0.0.1 has expired")
    assert end.strftime("%Y-%m-%d %H:%M:%S") in message
    assert "nocerttimecheck" in message
    await connects(pki, trust(pki.ca_cert, no_cert_time_check=True))


async def test_not_yet_valid_certificate(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    pki = make_test_pki(
        tmp_path, not_before=now + timedelta(days=2), not_after=now + timedelta(days=40)
    )
    error = await connect_error(pki, trust(pki.ca_cert))
    assert "is not yet valid (notBefore" in str(error)
    assert "nocerttimecheck" in str(error)
    await connects(pki, trust(pki.ca_cert, no_cert_time_check=True))


async def test_no_cert_time_check_still_checks_trust(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    pki = make_test_pki(tmp_path / "a", not_before=now - timedelta(days=9), not_after=now)
    other = make_test_pki(tmp_path / "b")
    error = await connect_error(pki, trust(other.ca_cert, no_cert_time_check=True))
    assert "not trusted" in str(error)


async def test_untrusted_issuer(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "server", ca_name="Server Side CA")
    other = make_test_pki(tmp_path / "other", ca_name="Some Other CA")
    error = await connect_error(pki, trust(other.ca_cert))
    assert str(error).startswith(
        "certificate of 127.0.0.1 is not trusted (unknown issuer CN=Server Side CA)"
    )


async def test_system_store_does_not_trust_a_throwaway_ca(pki: CertPaths) -> None:
    error = await connect_error(pki, TrustConfig())
    assert "not trusted" in str(error)


async def test_nothing_trusted_at_all(pki: CertPaths) -> None:
    error = await connect_error(pki, trust())
    assert "not trusted" in str(error)


async def test_self_signed_certificate(tmp_path: Path, pki: CertPaths) -> None:
    cert, key = make_self_signed(tmp_path / "self")
    self_signed = CertPaths(ca_cert=cert, server_cert=cert, server_key=key)
    error = await connect_error(self_signed, trust(pki.ca_cert))
    assert "is not trusted: it is self-signed (CN=localhost)" in str(error)
    # Trusting the certificate itself pins it.
    await connects(self_signed, trust(cert))


async def test_trust_by_directory_of_any_file_names(tmp_path: Path, pki: CertPaths) -> None:
    other = make_test_pki(tmp_path / "other", ca_name="Other CA")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(other.ca_cert, trusted / "a.pem")
    shutil.copy(pki.ca_cert, trusted / "our-ca.crt.txt")
    (trusted / "README").write_text("certificates for NTS\n")
    (trusted / "subdir").mkdir()
    await connects(pki, trust(trusted))


async def test_trust_by_bundle_file(tmp_path: Path, pki: CertPaths) -> None:
    other = make_test_pki(tmp_path / "other", ca_name="Other CA")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(other.ca_cert.read_bytes() + pki.ca_cert.read_bytes())
    await connects(pki, trust(bundle))


def test_unusable_trust_entries(tmp_path: Path) -> None:
    with pytest.raises(
        CertificateError, match=r"trusted certificate file .*missing\.pem does not exist"
    ):
        client_context(trust(tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(CertificateError, match="holds no readable PEM certificate"):
        client_context(trust(junk))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CertificateError, match="holds no PEM certificate"):
        client_context(trust(empty))
