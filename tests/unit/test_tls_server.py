"""ServerTls (net/tls/server.py), the sans-I/O server half: driven byte by byte
against a pyOpenSSL client on memory BIOs, with no socket at all."""

from __future__ import annotations

import pytest
from OpenSSL import SSL

from ntspy.certs import CertPaths
from ntspy.net.tls.credentials import server_context
from ntspy.net.tls.ntske import ServerTlsFailure
from ntspy.net.tls.server import ServerTls
from ntspy.net.tls.trust import client_context
from tests.unit.tls_loopback import trust

LABEL = b"EXPORTER-network-time-security"  # RFC 8915 s5.1
C2S = bytes([0, 0, 0, 15, 0])  # NTPv4, AES-SIV-CMAC-256, client-to-server


def _client(ctx: SSL.Context, sni: bytes | None = b"localhost") -> SSL.Connection:
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    if sni is not None:
        conn.set_tlsext_host_name(sni)
    return conn


def _client_output(conn: SSL.Connection) -> bytes:
    try:
        return conn.bio_read(65536)
    except SSL.WantReadError:
        return b""


def _handshake(client: SSL.Connection, server: ServerTls) -> None:
    """Pass bytes both ways until both sides have finished the handshake."""
    client_done = server_done = False
    for _ in range(10):
        try:
            client.do_handshake()
            client_done = True
        except SSL.WantReadError:
            pass
        server_done = server.handshake(_client_output(client)) or server_done
        if data := server.output():
            client.bio_write(data)
        if client_done and server_done:
            return
    raise AssertionError("the handshake did not finish")


def _foreign_client(pki: CertPaths, alpn: list[bytes] | None) -> SSL.Connection:
    ctx = SSL.Context(SSL.TLS_METHOD)
    if alpn is not None:
        ctx.set_alpn_protos(alpn)
    ctx.load_verify_locations(str(pki.ca_cert))
    ctx.set_verify(SSL.VERIFY_PEER)
    return _client(ctx)


def _refusal(client: SSL.Connection, server: ServerTls) -> ServerTlsFailure:
    """The failure the server raises on the client's next flight."""
    with pytest.raises(ServerTlsFailure) as info:
        server.handshake(_client_output(client))
    return info.value


def test_a_session_with_no_io(pki: CertPaths) -> None:
    server = ServerTls(server_context(pki.server_cert, pki.server_key), "client 192.0.2.1")
    client = _client(client_context(trust(pki.ca_cert)))
    _handshake(client, server)

    assert server.server_name == "localhost"
    assert client.get_alpn_proto_negotiated() == b"ntske/1"
    assert server.export_keying_material(LABEL, 32, C2S) == client.export_keying_material(
        LABEL, 32, C2S
    )
    client.send(b"request")
    assert server.receive(_client_output(client)) == (b"request", False)
    server.send(b"response")
    client.bio_write(server.output())
    assert client.recv(100) == b"response"
    assert server.output() == b""  # nothing more to send

    client.shutdown()  # close_notify
    assert server.receive(_client_output(client)) == (b"", True)


def test_a_client_without_sni_gets_the_default_certificate(pki: CertPaths) -> None:
    server = ServerTls(server_context(pki.server_cert, pki.server_key), "client")
    _handshake(_client(client_context(trust(pki.ca_cert)), sni=None), server)
    assert server.server_name is None


def test_other_alpn_is_refused_with_an_alert(pki: CertPaths) -> None:
    server = ServerTls(server_context(pki.server_cert, pki.server_key), "client 192.0.2.1")
    client = _foreign_client(pki, [b"http/1.1", b"h2"])
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()  # the ClientHello
    failure = _refusal(client, server)
    assert str(failure) == "client 192.0.2.1: client offered ALPN http/1.1, h2, not ntske/1"
    assert failure.kind == "alpn"
    assert failure.detail == b"\x08http/1.1\x02h2"  # the offered list, RFC 7301 wire form
    assert server.output()  # the no_application_protocol alert


def test_no_alpn_at_all_is_refused(pki: CertPaths) -> None:
    server = ServerTls(server_context(pki.server_cert, pki.server_key), "client 192.0.2.1")
    client = _foreign_client(pki, None)
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()  # the ClientHello
    # The server answers; the refusal comes once the handshake is complete.
    assert not server.handshake(_client_output(client))
    client.bio_write(server.output())
    client.do_handshake()  # the client's Finished
    failure = _refusal(client, server)
    assert str(failure) == "client 192.0.2.1 did not offer ALPN ntske/1"
    assert failure.kind == "no-alpn"


def test_garbage_fails_the_handshake_with_openssls_reason(pki: CertPaths) -> None:
    server = ServerTls(server_context(pki.server_cert, pki.server_key), "client 192.0.2.1")
    with pytest.raises(ServerTlsFailure) as info:
        server.handshake(b"GET / HTTP/1.1\r\n\r\n")
    assert info.value.kind == "tls"
    assert str(info.value).startswith("TLS handshake with client 192.0.2.1 failed: ")
    assert info.value.detail
