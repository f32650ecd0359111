"""ntspy's client against a real chronyd NTS server on loopback."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ntspy import cli
from ntspy.certs import make_test_pki

from .conftest import Chronyd, free_port

HOST = "127.0.0.1"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_query_gets_authenticated_samples(
    chronyd: Chronyd, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "query", "--ca", str(chronyd.ca_cert),
                         "--ke-port", str(chronyd.ke_port), "--samples", "2", HOST)
    assert code == 0, err
    assert err == ""
    assert out.count("authenticated yes") == 2
    assert "AEAD_AES_SIV_CMAC_256 (15), 8 cookies" in out
    assert f"NTP 127.0.0.1 port {chronyd.ntp_port}" in out  # from chrony's Port record
    assert "cookies 8" in out
    assert "stratum 1" in out
    assert out.rstrip().splitlines()[-1].startswith("System clock wrong by ")


def test_query_json(chronyd: Chronyd, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "query", "--json", "--ca", str(chronyd.ca_cert),
                       "--ke-port", str(chronyd.ke_port), "--samples", "3", HOST)
    assert code == 0
    report = json.loads(out)
    assert report["ok"] is True
    (host,) = report["hosts"]
    assert host["ke"]["cookies"] == 8
    assert host["ke"]["aead_id"] == 15
    assert len(host["samples"]) == 3
    for sample in host["samples"]:
        assert sample["authenticated"] is True
        assert sample["stratum"] == 1
        assert sample["cookies"] == 8
        # chronyd serves this very clock: offset and delay are tiny on loopback.
        assert abs(sample["offset"]) < 0.01
        assert 0 <= sample["delay"] < 0.1


def test_plain_query(chronyd: Chronyd, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "query", "--no-nts", "--port", str(chronyd.ntp_port), HOST)
    assert code == 0, err
    assert "authenticated no" in out
    assert "System clock wrong by" in out


def test_ke_reports_negotiation(chronyd: Chronyd, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "ke", "--ca", str(chronyd.ca_cert),
                         "--ke-port", str(chronyd.ke_port), HOST)
    assert code == 0, err
    assert "TLSv1.3" in out
    assert "CN=localhost" in out
    assert "15 (AEAD_AES_SIV_CMAC_256)" in out  # chrony 4.3 has no AES-128-GCM-SIV
    assert "8 of 100 bytes" in out
    assert f"127.0.0.1 port {chronyd.ntp_port}" in out

    code, out, _ = run(capsys, "ke", "--json", "--ca", str(chronyd.ca_cert),
                       "--ke-port", str(chronyd.ke_port), HOST)
    assert code == 0
    assert json.loads(out)["cookies"] == 8


@pytest.fixture
def flipping_proxy(chronyd: Chronyd) -> Iterator[int]:
    """A UDP relay to chronyd that flips one byte of every response."""
    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.bind((HOST, 0))
    back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    back.connect((HOST, chronyd.ntp_port))
    stop = threading.Event()
    client: list[tuple[str, int]] = []

    def relay() -> None:
        while not stop.is_set():
            readable, _, _ = select.select([front, back], [], [], 0.05)
            if front in readable:
                data, addr = front.recvfrom(4096)
                client[:] = [addr]
                back.send(data)
            if back in readable:
                reply = bytearray(back.recv(4096))
                reply[47] ^= 0x01  # last byte of the transmit timestamp: authenticated
                if client:
                    front.sendto(bytes(reply), client[0])

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    yield int(front.getsockname()[1])
    stop.set()
    thread.join(2)
    front.close()
    back.close()


def test_tampered_responses_fail_the_query(
    chronyd: Chronyd, flipping_proxy: int, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "query", "--ca", str(chronyd.ca_cert), "--ke-port",
                         str(chronyd.ke_port), "--port", str(flipping_proxy),
                         "--samples", "2", "--timeout", "1", HOST)
    assert code == 1
    assert "authenticated yes" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert line.startswith(f"ntspy: {HOST}: sample ")
        assert "no valid NTS response" in line and "AEAD verification failed" in line
    assert "Traceback" not in err


def test_untrusted_ca_is_a_certificate_error(
    chronyd: Chronyd, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_test_pki(tmp_path)
    code, out, err = run(capsys, "query", "--ca", str(other.ca_cert),
                         "--ke-port", str(chronyd.ke_port), HOST)
    assert code == 1
    assert out == ""
    assert err.startswith(f"ntspy: {HOST}: certificate of ")
    assert "not trusted" in err
    assert len(err.strip().splitlines()) == 1


def test_closed_ke_port_fails_fast(chronyd: Chronyd, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    code, _, err = run(capsys, "ke", "--ca", str(chronyd.ca_cert),
                       "--ke-port", str(free_port()), HOST)
    assert code == 1
    assert time.monotonic() - start < 2
    assert err.startswith(f"ntspy: {HOST}: connection refused by ")
