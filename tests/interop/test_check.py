"""``ntspy check`` against real servers: ntspy serve (all four AEADs), chronyd 4.3
(AEAD 15 only), an expired certificate, a missing intermediate, a blocked NTP port.
Each asserts the exit code and the line that says why."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ntspy.certs import CertPaths, make_test_pki
from ntspy.proto.aead import gcm_siv_available
from tests.conftest import ServerFactory
from tests.daemon_helpers import ChronydServer
from tests.peers import ServerProc, prepare_ntspy_server

HOST = "127.0.0.1"


def run_check(ke_port: int, ca: Path, *extra: str) -> tuple[int, str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "ntspy", "check", HOST, "--ke-port", str(ke_port),
         "--ca", str(ca), "--timeout", "1", *extra],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, out.stdout, out.stderr


def line(out: str, start: str) -> str:
    """The one report line whose text (after the status) starts with ``start``."""
    found = [ln for ln in out.splitlines() if ln[6:].startswith(start)]
    assert len(found) == 1, f"{start!r} in:\n{out}"
    return found[0]


def test_ntspy_serve_is_healthy_with_all_four_aeads(ntspy_server: ServerProc) -> None:
    code, out, err = run_check(ntspy_server.ke_port, ntspy_server.certs.ca_cert)
    assert code == 0, out + err
    assert line(out, "TLS version").startswith("OK    TLS version TLSv1.3")
    assert line(out, "certificate chain").startswith("OK ")
    assert line(out, "certificate expires in 29 days").startswith("OK ")
    assert line(out, "certificate matches 127.0.0.1").startswith("OK ")
    for aead_id in (15, 16, 17) + ((30,) if gcm_siv_available() else ()):
        assert line(out, f"AEAD {aead_id} ").startswith("OK "), out
        assert "accepted (8 cookies" in line(out, f"AEAD {aead_id} ")
    assert line(out, "NTS request with one cookie: 200 octets").startswith("OK ")
    assert line(out, "bogus cookie answered with an NTS NAK").startswith("OK ")
    assert line(out, "responses never longer than requests").startswith("OK ")
    assert f"Port {ntspy_server.ntp_port}" in line(out, "Server/Port records")
    assert line(out, "authenticated NTP with").startswith("OK ")
    assert line(out, "NTS-KE took").startswith("OK ")
    assert out.rstrip().endswith("healthy: 0 FAIL, 0 WARN (exit 0)")
    stats = ntspy_server.stats()
    assert stats["nts_naks"] == 1  # exactly the bogus cookie

    code, out, _ = run_check(ntspy_server.ke_port, ntspy_server.certs.ca_cert, "--json")
    report = json.loads(out)
    assert code == report["exit_code"] == 0 and report["status"] == "OK"
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["packet-size"]["octets"] == 200
    assert by_name["cookies"]["count"] == 8
    assert by_name["aead-15"]["accepted"] is True
    assert by_name["cert-expiry"]["days_left"] == 29


@pytest.fixture
def chronyd_server(tmp_path: Path) -> Iterator[ChronydServer]:
    server = ChronydServer(tmp_path / "chronyd")
    server.start()
    yield server
    server.stop()


def test_chronyd_accepts_aead_15_only_and_its_packets_are_long(
    chronyd_server: ChronydServer,
) -> None:
    code, out, err = run_check(chronyd_server.ke_port, chronyd_server.ca_cert)
    assert code == 1, out + err  # warnings only
    assert line(out, "AEAD 15 AEAD_AES_SIV_CMAC_256: accepted").startswith("OK ")
    for aead_id in (16, 17, 30):
        assert line(out, f"AEAD {aead_id} ").startswith(("INFO", "SKIP")), out
        assert "not accepted" in line(out, f"AEAD {aead_id} ") or aead_id == 30
    size = line(out, "NTS request with one cookie")
    assert size.startswith("WARN  NTS request with one cookie: 228 octets, over 200"), size
    assert line(out, "8 cookies of 100 octets").startswith("OK ")
    assert line(out, "authenticated NTP with").startswith("OK ")
    assert line(out, "bogus cookie answered with an NTS NAK").startswith("OK ")
    assert out.rstrip().endswith("warnings: 0 FAIL, 1 WARN (exit 1)")


def test_expired_certificate_fails(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    server = ChronydServer(tmp_path / "chronyd")
    # chronyd serves whatever certificate it is given; make it one that expired.
    server.certs = make_test_pki(tmp_path / "chronyd" / "pki", not_before=now - timedelta(days=40),
                                 not_after=now - timedelta(days=3))
    server.start()
    try:
        code, out, err = run_check(server.ke_port, server.ca_cert)
    finally:
        server.stop()
    assert code == 2, out + err
    expiry = line(out, "certificate expired")
    assert expiry.startswith("FAIL  certificate expired 3 days ago"), expiry
    # Only the dates are wrong: the rest is tested as with nocerttimecheck, and works.
    assert line(out, "the checks below ran ignoring").startswith("INFO")
    assert line(out, "authenticated NTP with").startswith("OK ")


def write_chain(directory: Path, send_intermediate: bool) -> tuple[CertPaths, Path]:
    """Root -> intermediate -> leaf for 127.0.0.1; the server file holds the leaf,
    and the intermediate too when ``send_intermediate``.  Returns (paths, root)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)

    def cert(subject: str, issuer: str, key: ec.EllipticCurvePrivateKey,
             signer: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=90))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            b = (b.add_extension(x509.SubjectAlternativeName(names), critical=False)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                critical=False))
        return b.sign(signer, hashes.SHA256())

    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    root = cert("Test Root", "Test Root", keys[0], keys[0], True)
    mid = cert("Test Intermediate", "Test Root", keys[1], keys[0], True)
    leaf = cert("localhost", "Test Intermediate", keys[2], keys[1], False)
    pem = serialization.Encoding.PEM
    root_path, leaf_path, key_path = (directory / "root.pem", directory / "server.pem",
                                      directory / "server.key")
    root_path.write_bytes(root.public_bytes(pem))
    leaf_path.write_bytes(leaf.public_bytes(pem) + (mid.public_bytes(pem)
                                                    if send_intermediate else b""))
    key_path.write_bytes(keys[2].private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    key_path.chmod(0o600)
    return CertPaths(root_path, leaf_path, key_path), root_path


@pytest.mark.parametrize("send_intermediate", [False, True])
def test_missing_intermediate_fails(tmp_path: Path, send_intermediate: bool) -> None:
    certs, root = write_chain(tmp_path / "pki", send_intermediate)
    server = prepare_ntspy_server(tmp_path, certs=certs)
    server.start()
    try:
        code, out, err = run_check(server.ke_port, root)
    finally:
        server.stop()
    chain = line(out, "certificate chain")
    if send_intermediate:
        assert code == 0, out + err
        assert chain.startswith("OK    certificate chain complete (2 certificates sent"), chain
        return
    assert code == 2, out + err
    assert chain.startswith("FAIL  certificate chain incomplete (1 certificate sent)"), chain
    assert "CN=Test Intermediate" in chain and "missing intermediate" in chain
    assert line(out, "NTS-KE and NTP not tested").startswith("SKIP")


def test_blocked_ntp_port_fails(ntspy_server_factory: ServerFactory, tmp_path: Path) -> None:
    # NTS-KE names 127.0.0.2 (and the server's own NTP port) for NTP; there a
    # socket swallows every packet, as a firewall dropping UDP would.
    server = ntspy_server_factory(extra_lines=["ntsntpserver 127.0.0.2"])
    port = server.ntp_port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blackhole:
        blackhole.bind(("127.0.0.2", port))
        code, out, err = run_check(server.ke_port, server.certs.ca_cert)
    assert code == 2, out + err
    ntp = line(out, "authenticated NTP with")
    assert ntp.startswith(f"FAIL  authenticated NTP with 127.0.0.2 port {port} failed: "
                          "no response within 1 s"), ntp
    assert "plain NTP: no answer either" in ntp
    records = line(out, "Server/Port records")
    assert records.startswith("FAIL") and "Server 127.0.0.2" in records
    assert "does not answer" in records
    assert line(out, "NAK not tested").startswith("SKIP")
    assert line(out, "AEAD 15 ").startswith("OK ")  # NTS-KE itself is fine
