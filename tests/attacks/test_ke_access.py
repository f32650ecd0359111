"""allow/deny apply to NTS-KE (issue 14, item 2): a denied address is dropped at accept,
before TLS, and gets no cookies; it is counted; allowed clients are served as before.
Both KE back ends (the compiled engine and the pure-Python path)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from ntspy.client.session import NtsSession
from ntspy.net.tls.trust import TrustConfig
from tests.peers import LOOPBACK, start_ntspy_server

DENIED = "127.0.0.2"  # loopback too, but outside the allow rule


@pytest.mark.parametrize("pure_python", [False, True])
async def test_a_denied_address_gets_no_tls_and_no_cookies(
        tmp_path: Path, pure_python: bool) -> None:
    server = start_ntspy_server(tmp_path, allow=f"allow {LOOPBACK}\ndeny {DENIED}",
                                pure_python=pure_python)
    try:
        before = server.stats()
        context = ssl.create_default_context(cafile=str(server.certs.ca_cert))
        context.set_alpn_protocols(["ntske/1"])
        for _ in range(3):
            raw = socket.create_connection((LOOPBACK, server.ke_port), timeout=5,
                                           source_address=(DENIED, 0))
            with raw, pytest.raises((ssl.SSLError, ConnectionError, OSError)), \
                    context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.recv(1)  # never reached: the server closes before any handshake
        after = server.stats()
        assert after["ke_denied"] - before["ke_denied"] == 3, after
        assert after["ke_accepted"] == before["ke_accepted"]  # no session was started
        assert after["ke_completed"] == before["ke_completed"]
        # An allowed client still gets its cookies and authenticated time.
        trust = TrustConfig(use_system_store=False, extra=[server.certs.ca_cert])
        with NtsSession("localhost", server.ke_port, trust=trust, timeout=3.0) as session:
            assert (await session.measure()).authenticated
        assert server.stats()["ke_completed"] == before["ke_completed"] + 1
    finally:
        server.stop()
