"""``ntspy.NTPClient`` (ntplib's interface) against chronyd and ``ntspy serve``, plain
and NTS, its values checked against ``ntspy query --json``; and the CLI's polish:
a closed pipe, the NTP port actually used, rounded timeouts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import ntspy
from ntspy.api import reference_id_int
from tests.peers import ServerProc, free_port

from .conftest import Chronyd

HOST = "127.0.0.1"


def query_json(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "ntspy", "query", "--json", *args, HOST],
                         capture_output=True, text=True, timeout=30, check=True)
    (host,) = json.loads(out.stdout)["hosts"]
    assert isinstance(host, dict)
    return host


def assert_matches(stats: ntspy.NTPStats, sample: dict[str, Any]) -> None:
    """The same server seen by NTPClient and by ``ntspy query`` a moment apart."""
    for name in ("stratum", "leap", "version", "precision", "authenticated", "port"):
        assert getattr(stats, name) == sample[name], name
    assert stats.ref_id == reference_id_int(sample["reference_id"])
    assert stats.reference_id == sample["reference_id"]
    assert stats.root_delay == pytest.approx(sample["root_delay"], abs=1e-3)
    assert stats.root_dispersion == pytest.approx(sample["root_dispersion"], abs=1e-3)
    assert stats.offset == pytest.approx(sample["offset"], abs=0.005)
    assert stats.mode == 4 and 0 <= stats.delay < 0.1
    assert abs(stats.tx_time - time.time()) < 5
    assert stats.tx_timestamp == pytest.approx(stats.tx_time + 2_208_988_800, abs=1e-6)


def test_plain_against_chronyd(chronyd: Chronyd) -> None:
    stats = ntspy.NTPClient().request(HOST, port=chronyd.ntp_port)
    (sample,) = query_json("--no-nts", "--port", str(chronyd.ntp_port))["samples"]
    assert_matches(stats, sample)
    assert stats.authenticated is False and stats.stratum == 1
    # ntplib's default version 2 style call still gets an answer.
    assert ntspy.NTPClient().request(HOST, 3, chronyd.ntp_port).version == 3


def test_nts_against_chronyd(chronyd: Chronyd) -> None:
    stats = ntspy.NTPClient(ca=str(chronyd.ca_cert)).request(
        HOST, nts=True, ke_port=chronyd.ke_port)
    (sample,) = query_json("--ca", str(chronyd.ca_cert), "--ke-port",
                           str(chronyd.ke_port))["samples"]
    assert_matches(stats, sample)
    assert stats.authenticated is True and stats.aead_id == 15
    assert stats.port == chronyd.ntp_port  # from chrony's Port record


def test_plain_and_nts_against_ntspy_serve(ntspy_server: ServerProc) -> None:
    plain = ntspy.NTPClient().request(HOST, port=ntspy_server.ntp_port)
    (sample,) = query_json("--no-nts", "--port", str(ntspy_server.ntp_port))["samples"]
    assert_matches(plain, sample)
    ca = ntspy_server.certs.ca_cert.read_bytes()  # PEM bytes work as well as paths
    secure = ntspy.NTPClient().request(HOST, nts=True, ke_port=ntspy_server.ke_port, ca=ca)
    (sample,) = query_json("--ca", str(ntspy_server.certs.ca_cert), "--ke-port",
                           str(ntspy_server.ke_port))["samples"]
    assert_matches(secure, sample)
    assert secure.authenticated is True


def test_wrong_ca_is_an_ssl_verification_error(ntspy_server: ServerProc, tmp_path: Path) -> None:
    import ssl

    from ntspy.certs import make_test_pki

    other = make_test_pki(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        ntspy.query(HOST, ke_port=ntspy_server.ke_port, ca=other.ca_cert)
    assert isinstance(info.value, ntspy.CertificateVerifyError)
    assert "not trusted" in str(info.value) and info.value.verify_code > 0


def test_closed_pipe_ends_quietly(chronyd: Chronyd) -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written, like `| head` done early
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ntspy", "query", "--json", "--samples", "3", "--ca",
             str(chronyd.ca_cert), "--ke-port", str(chronyd.ke_port), HOST],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=30,
        )
    finally:
        os.close(write)
    assert proc.stderr == "", proc.stderr  # no BrokenPipeError traceback, no "Exception ignored"
    assert proc.returncode == 141  # 128 + SIGPIPE, as a shell tool killed by it


def test_header_names_the_port_used(chronyd: Chronyd) -> None:
    # --port sends NTP to a socket that swallows it: the header must name that port.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((HOST, 0))
        port = silent.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "ntspy", "query", "--ca", str(chronyd.ca_cert), "--ke-port",
             str(chronyd.ke_port), "--port", str(port), "--timeout", "0.5", HOST],
            capture_output=True, text=True, timeout=30,
        )
    header = out.stdout.splitlines()[0]
    assert f"NTP 127.0.0.1 port {port} (NTS-KE named port {chronyd.ntp_port})" in header, header
    assert "within 0.5 s" in out.stderr, out.stderr  # the timeout given, as given


def test_ke_timeout_message_is_rounded() -> None:
    with socket.create_server((HOST, free_port("tcp"))) as mute:
        out = subprocess.run(
            [sys.executable, "-m", "ntspy", "ke", "--ke-port", str(mute.getsockname()[1]),
             "--timeout", "1", HOST],
            capture_output=True, text=True, timeout=30,
        )
    assert out.returncode == 1
    assert "timed out (no answer within 1 s;" in out.stderr, out.stderr
