"""The ntplib-style client, ``ca=`` forms and blocking calls inside a running loop,
against an in-process plain NTP responder and TLS endpoints on loopback."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import crypto

import ntspy
from ntspy.api import NTPStats, reference_id_int
from ntspy.certs import make_test_pki
from ntspy.client.session import Measurement
from ntspy.net.tls.trust import TrustConfig, client_context, split_ca
from ntspy.proto.ntp import NTP_UNIX_OFFSET, Mode, NtpHeader, unix_ns_to_ntp

HOST = "127.0.0.1"


class Responder:
    """A plain NTP server in a thread (so a blocked event loop cannot stall it)."""

    def __init__(self, answer: bool = True) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.05)
        self.port = int(self.sock.getsockname()[1])
        self.answer = answer
        self.versions: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(2048)
            except OSError:
                continue
            rx = time.time_ns()
            request = NtpHeader.unpack(data)
            self.versions.append(request.version)
            if not self.answer:
                continue
            reply = NtpHeader(
                version=request.version, mode=Mode.SERVER, stratum=2, poll=request.poll,
                precision=-23, root_delay=0x00010000, root_dispersion=0x00008000,
                reference_id=bytes([192, 0, 2, 7]), reference_ts=unix_ns_to_ntp(rx - 10**9),
                origin_ts=request.transmit_ts, receive_ts=unix_ns_to_ntp(rx),
                transmit_ts=unix_ns_to_ntp(time.time_ns()),
            )
            self.sock.sendto(reply.pack(), addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def responder() -> Iterator[Responder]:
    r = Responder()
    yield r
    r.close()


def test_request_has_ntplib_attributes(responder: Responder) -> None:
    before = time.time()
    stats = ntspy.NTPClient().request(HOST, port=responder.port)
    after = time.time()
    assert isinstance(stats, NTPStats)
    assert (stats.version, stats.mode, stats.stratum, stats.leap) == (4, 4, 2, 0)
    assert stats.precision == -23 and stats.poll == 6
    assert stats.root_delay == 1.0 and stats.root_dispersion == 0.5
    assert stats.ref_id == 0xC0000207 and stats.reference_id == "192.0.2.7"
    assert before <= stats.orig_time <= stats.dest_time <= after
    assert before - 1 <= stats.recv_time <= stats.tx_time <= after + 1
    assert abs(stats.ref_time - (stats.recv_time - 1)) < 0.01
    for name in ("orig", "recv", "tx", "dest", "ref"):
        assert getattr(stats, f"{name}_timestamp") == pytest.approx(
            getattr(stats, f"{name}_time") + NTP_UNIX_OFFSET, abs=1e-6)
    assert abs(stats.offset) < 0.05 and 0 <= stats.delay < 0.5
    assert stats.authenticated is False and stats.server == HOST and stats.port == responder.port


def test_positional_arguments_are_ntplibs(responder: Responder) -> None:
    stats = ntspy.NTPClient().request(HOST, 3, responder.port, 2)  # host, version, port, timeout
    assert stats.version == 3 and responder.versions == [3]
    stats = ntspy.NTPClient().request(HOST, port=str(responder.port),
                                      address_family=socket.AF_INET)
    assert stats.server == HOST and stats.address == HOST
    with pytest.raises(ValueError, match="version"):
        ntspy.NTPClient().request(HOST, 5, responder.port)
    with pytest.raises(ValueError, match="NTPv4"):
        ntspy.NTPClient().request(HOST, 3, nts=True)


def test_from_measurement_maps_every_field() -> None:
    t1 = 1_700_000_000 * 10**9
    m = Measurement(server="s", address="a", port=123, offset=0.25, delay=0.5, stratum=1,
                    leap=1, reference_id="GPS", reference_time_ns=0, root_delay=0.0,
                    root_dispersion=0.0, poll=4, precision=-20, version=4,
                    authenticated=True, kernel_rx_timestamp=True,
                    t1=t1, t2=t1 + 500_000_000, t3=t1 + 500_000_000, t4=t1 + 500_000_000,
                    aead_id=30, cookies=8)
    s = NTPStats.from_measurement(m)
    assert s.offset == 0.25 and s.delay == 0.5 and s.leap == 1
    assert s.ref_id == int.from_bytes(b"GPS\x00", "big")
    assert s.ref_timestamp == 0.0 and s.ref_time == -NTP_UNIX_OFFSET  # as ntplib: never synced
    assert s.orig_timestamp == 1_700_000_000 + NTP_UNIX_OFFSET
    assert s.tx_time == 1_700_000_000.5 and s.aead_id == 30 and s.measurement is m


@pytest.mark.parametrize(("text", "value"), [
    ("192.0.2.7", 0xC0000207), ("0.0.0.0", 0), ("GPS", 0x47505300), ("LOCL", 0x4C4F434C),
    ("127.127.1.1", 0x7F7F0101),
])
def test_reference_id_int(text: str, value: int) -> None:
    assert reference_id_int(text) == value


def test_timeouts_are_timeout_errors() -> None:
    silent = Responder(answer=False)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            ntspy.NTPClient().request(HOST, port=silent.port, timeout=0.5)
        assert time.monotonic() - start < 3
        assert isinstance(info.value, ntspy.NtpTimeoutError)
        assert isinstance(info.value, ntspy.NTPException)  # ntplib's name still catches it
        assert "within 0.5 s" in str(info.value)
    finally:
        silent.close()


def test_refused_is_a_connection_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError) as info:
        ntspy.query(HOST, nts=False, port=port, timeout=2)
    assert isinstance(info.value, ntspy.NtpConnectionError)


def test_ke_refused_and_ke_timeout() -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        closed = s.getsockname()[1]
    with pytest.raises(ConnectionError) as refused:
        ntspy.query(HOST, ke_port=closed, timeout=2)
    assert isinstance(refused.value, ntspy.KeConnectionError)
    assert not isinstance(refused.value, TimeoutError)
    # Accepts TCP, never speaks TLS: the handshake times out.
    with socket.create_server((HOST, 0)) as mute:
        start = time.monotonic()
        with pytest.raises(TimeoutError) as timeout:
            ntspy.query(HOST, ke_port=mute.getsockname()[1], timeout=1.5)
        assert time.monotonic() - start < 4
    assert isinstance(timeout.value, ntspy.KeTimeoutError)
    assert isinstance(timeout.value, ConnectionError)
    message = str(timeout.value)
    # The timeout given, not what the TCP connect left of it ("within 1.49873 s").
    assert "within 1.5 s" in message, message


async def test_blocking_calls_work_inside_a_running_loop(responder: Responder) -> None:
    asyncio.get_running_loop()  # pytest-asyncio runs this test in a loop
    m = ntspy.query(HOST, nts=False, port=responder.port)
    assert m.stratum == 2
    stats = ntspy.NTPClient().request(HOST, port=responder.port)
    assert stats.stratum == 2
    stats = await ntspy.NTPClient().request_async(HOST, port=responder.port)
    assert stats.stratum == 2


# --- ca= forms ------------------------------------------------------------------------


def test_split_ca_forms(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path)
    pem = pki.ca_cert.read_bytes()
    assert split_ca(None) == ([], [])
    assert split_ca(str(pki.ca_cert)) == ([pki.ca_cert], [])  # one path, not its letters
    assert split_ca(pki.ca_cert) == ([pki.ca_cert], [])
    assert split_ca([str(pki.ca_cert), tmp_path]) == ([pki.ca_cert, tmp_path], [])
    assert split_ca(pem) == ([], [pem])
    assert split_ca(pem.decode()) == ([], [pem])
    assert split_ca([pem, pki.ca_cert]) == ([pki.ca_cert], [pem])
    with pytest.raises(TypeError):
        split_ca(42)
    with pytest.raises(TypeError):
        split_ca([42])
    # TrustConfig sorts out whatever it is given, so a str in extra= is one path too.
    trust = TrustConfig(extra=str(pki.ca_cert))  # type: ignore[arg-type]
    assert trust.extra == [pki.ca_cert] and trust.pem == []


def _verifies(trust: TrustConfig, leaf: Path) -> bool:
    """Whether the client context built from ``trust`` accepts the certificate ``leaf``."""
    context = client_context(trust)  # owns the store: keep it alive while using it
    store = context.get_cert_store()
    assert store is not None
    cert = crypto.X509.from_cryptography(x509.load_pem_x509_certificate(leaf.read_bytes()))
    try:
        crypto.X509StoreContext(store, cert).verify_certificate()
    except crypto.X509StoreContextError:
        return False
    finally:
        del context
    return True


@pytest.mark.parametrize("form", ["str", "path", "list", "bytes", "dir"])
def test_every_ca_form_loads_the_ca(tmp_path: Path, form: str) -> None:
    pki = make_test_pki(tmp_path / "pki", ca_name=f"ca-{form}")
    ca: object = {
        "str": str(pki.ca_cert), "path": pki.ca_cert, "list": [str(pki.ca_cert)],
        "bytes": pki.ca_cert.read_bytes(), "dir": str(tmp_path / "pki"),
    }[form]
    trust = TrustConfig.from_ca(ca, use_system_store=False)  # type: ignore[arg-type]
    assert _verifies(trust, pki.server_cert)
    assert not _verifies(TrustConfig(use_system_store=False), pki.server_cert)


def test_ca_pem_bytes_without_a_certificate_is_a_certificate_error() -> None:
    with pytest.raises(ntspy.CertificateError, match="PEM data"):
        client_context(TrustConfig.from_ca(b"not a certificate"))


def test_nts_session_takes_ca_without_importing_tls(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path)
    session = ntspy.NtsSession(HOST, 4460, ca=str(pki.ca_cert))
    assert session.trust is not None and session.trust.extra == [pki.ca_cert]
    assert session.trust.use_system_store
    with pytest.raises(ValueError, match="not both"):
        ntspy.NtsSession(HOST, ca=pki.ca_cert, trust=ntspy.TrustConfig())
    assert _verifies(session.trust, pki.server_cert)
