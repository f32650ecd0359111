"""bench/loadgen.py against a real ``ntspy serve`` and against servers that lie.

No timing assertions: only that the generator counts what the server really
answered, and that it does not count wrong answers as valid.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from ntspy.proto.aead import Aead, AeadId
from tests import bench_scripts
from tests.peers import ServerProc

loadgen = bench_scripts.load("loadgen")


@pytest.fixture
def liar() -> Iterator[Callable[[Callable[[bytes], bytes]], int]]:
    """A UDP server on loopback answering every request with ``forge(request)``."""
    stop = threading.Event()
    threads: list[threading.Thread] = []
    socks: list[socket.socket] = []

    def start(forge: Callable[[bytes], bytes]) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.05)
        socks.append(sock)

        def serve() -> None:
            while not stop.is_set():
                try:
                    data, addr = sock.recvfrom(2048)
                except TimeoutError:
                    continue
                sock.sendto(forge(data), addr)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return int(sock.getsockname()[1])

    yield start
    stop.set()
    for thread in threads:
        thread.join(2)
    for sock in socks:
        sock.close()


def _as_server_reply(request: bytes, origin: bytes, tail: bytes = b"") -> bytes:
    """A mode-4, stratum-1 header with the given origin timestamp, then ``tail``."""
    header = bytearray(request[:48])
    header[0] = (header[0] & 0xF8) | 4
    header[1] = 1
    header[24:32] = origin
    return bytes(header) + tail


def test_plain_load_counts_every_answer_of_a_real_server(ntspy_server: ServerProc) -> None:
    counts = loadgen.run_load("127.0.0.1", ntspy_server.ntp_port, seconds=1.0, window=8)
    assert counts.valid > 0
    assert counts.invalid == 0
    # The server saw at least every request we counted an answer to.
    assert ntspy_server.stats()["ntp_received"] >= counts.valid


def test_nts_load_verifies_samples_with_the_s2c_key(ntspy_server: ServerProc) -> None:
    creds = loadgen.fetch_credentials(
        "localhost", ntspy_server.ke_port, ntspy_server.certs.ca_cert
    )
    assert creds.aead_id == AeadId.AES_SIV_CMAC_256
    counts = loadgen.run_load(
        "127.0.0.1", creds.ntp_port, seconds=1.0, window=8, creds=creds, verify_every=10
    )
    assert counts.valid > 0
    assert counts.invalid == 0
    assert counts.verified >= counts.valid // 10 >= 1
    assert ntspy_server.stats()["nts_authenticated"] >= counts.valid


def test_nts_ke_batch_completes_every_handshake(ntspy_server: ServerProc) -> None:
    run = loadgen.ke_handshakes("localhost", ntspy_server.ke_port, ntspy_server.certs.ca_cert, 6)
    assert (run.ok, run.failed) == (6, 0)


def test_answers_with_a_wrong_origin_are_invalid(liar: Callable[..., int]) -> None:
    port = liar(lambda req: _as_server_reply(req, bytes(8)))
    counts = loadgen.run_worker(
        "127.0.0.1", port, loadgen.build_plain(64), None, 0.3, window=4
    )
    assert counts.valid == 0
    assert counts.invalid > 0


def test_nts_answers_failing_verification_are_invalid(liar: Callable[..., int]) -> None:
    # The origin is echoed and the packet looks like an NTS response, but the
    # authenticator is garbage: only full verification can tell.
    port = liar(lambda req: _as_server_reply(req, req[40:48], bytes(req[48:])))
    creds = loadgen.NtsCredentials(15, bytes(32), bytes(32), [bytes(100)], "127.0.0.1", port)
    counts = loadgen.run_worker(
        "127.0.0.1", port, loadgen.build_nts(64, creds), Aead(15, creds.s2c), 0.3,
        window=4, verify_every=1,
    )
    assert counts.valid == 0
    assert counts.invalid > 0
    assert counts.errors
