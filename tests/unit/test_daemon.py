"""One serving process (server/daemon.py): the listening sockets and what binding them
says when it fails, ServerDaemon serving NTP on loopback in-process, its control
views (serverstats, serverkeys, clients, its own clock for chronyc) and the client
log it keeps or does not keep."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from ntspy.config import parse_config
from ntspy.proto.ntp import Leap, Mode, NtpHeader
from ntspy.server.clientlog import DEFAULT_LIMIT, ENTRY_BYTES, ClientLogTable
from ntspy.server.daemon import BindError, ServerDaemon, Sockets, open_udp_socket
from tests.peers import LOOPBACK, free_port, ntp_client_packet


def daemon(tmp_path: Path, text: str) -> ServerDaemon:
    return ServerDaemon(parse_config(text), Sockets(), key_dir=tmp_path)


async def test_noclientlog_keeps_no_table(tmp_path: Path) -> None:
    server = daemon(tmp_path, "noclientlog\n")
    assert server.clients_table is None
    assert await server.control_handlers()["clients"]([]) == []


async def test_clientloglimit_sizes_the_table(tmp_path: Path) -> None:
    server = daemon(tmp_path, f"clientloglimit {100 * ENTRY_BYTES}\n")
    assert server.clients_table is not None
    assert server.clients_table.capacity == 100
    assert daemon(tmp_path, "").clients_table.capacity == 2048  # type: ignore[union-attr]


async def test_the_clients_handler_shows_the_shared_table(tmp_path: Path) -> None:
    table = ClientLogTable(2, DEFAULT_LIMIT, shared=True)
    server = ServerDaemon(parse_config(""), Sockets(), key_dir=tmp_path, clients=table)
    table.log(1).nke("192.0.2.5", server.clock.now_ns(), dropped=True)
    rows = await server.control_handlers()["clients"]([])
    assert [(r["address"], r["nke_hits"], r["nke_drops"]) for r in rows] == [("192.0.2.5", 1, 1)]
    assert 0 <= rows[0]["last_nke_ago"] < 5

def test_a_port_in_use_says_so_and_what_may_hold_it() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((LOOPBACK, 0))
        port = taken.getsockname()[1]
        config = parse_config(f"bindaddress {LOOPBACK}\nport {port}\n")
        with pytest.raises(BindError) as err:
            Sockets.bind(config)
    assert str(err.value) == (f"UDP (NTP) port {port} on {LOOPBACK} is already in use "
                              "(another NTP server, e.g. chronyd, running?)")


def test_a_failed_bind_closes_the_sockets_already_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    ntp, ke = free_port("udp"), free_port("tcp")
    opened: list[socket.socket] = []
    real = socket.socket

    def tracking_socket(*args: object, **kwargs: object) -> socket.socket:
        s = real(*args, **kwargs)  # type: ignore[arg-type]
        opened.append(s)
        return s

    with real(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind((LOOPBACK, ke))
        taken.listen()
        config = parse_config(f"bindaddress {LOOPBACK}\nport {ntp}\nntsport {ke}\n"
                              "ntsservercert /etc/cert.pem\nntsserverkey /etc/key.pem\n")
        monkeypatch.setattr(socket, "socket", tracking_socket)
        with pytest.raises(BindError, match=f"TCP \\(NTS-KE\\) port {ke} on {LOOPBACK}"):
            Sockets.bind(config)
        monkeypatch.undo()
    assert len(opened) == 2 and all(s.fileno() == -1 for s in opened)
    with real(socket.AF_INET, socket.SOCK_DGRAM) as again:  # the NTP port is free again
        again.bind((LOOPBACK, ntp))


async def test_serves_ntp_on_its_socket_and_counts(tmp_path: Path) -> None:
    sockets = Sockets(ntp=[open_udp_socket(LOOPBACK, 0)])
    server = ServerDaemon(parse_config("allow\nlocal stratum 3\n"), sockets, key_dir=tmp_path)
    await server.start()
    try:
        port = server.ntp_port
        assert port == sockets.ntp[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.setblocking(False)
            await loop.sock_connect(client, (LOOPBACK, port))
            await loop.sock_sendall(client, ntp_client_packet())
            reply = NtpHeader.unpack(await loop.sock_recv(client, 1024))
        assert (reply.mode, reply.stratum) == (Mode.SERVER, 3)
        stats = await server.control_handlers()["serverstats"]([])
        assert stats["ntp_received"] == 1
        assert stats["kernel_rx"] + stats["daemon_rx"] == 1  # every receive time-stamped
        rows = await server.control_handlers()["clients"]([])
        assert [(r["address"], r["ntp_hits"]) for r in rows] == [(LOOPBACK, 1)]
    finally:
        await server.stop()
        sockets.close()


async def test_serverkeys_lists_the_ring_newest_first(tmp_path: Path) -> None:
    server = ServerDaemon(parse_config("ntsrotate 3600\n"), Sockets(), key_dir=tmp_path)
    await server.start()
    try:
        now = server.clock.now_ns() // 10**9
        server.keys.rotate(now)
        rows = await server.control_handlers()["serverkeys"]([])
        assert [r["id"] for r in rows] == [k.key_id for k in server.keys.ring.keys]
        assert len(rows) == 2 and all(0 <= r["age"] < 5 for r in rows)
        assert not any("pending" in r or "keystore" in r for r in rows)  # no fleet
    finally:
        await server.stop()


async def test_its_own_clock_for_chronyc_with_and_without_local(tmp_path: Path) -> None:
    for text, synced, stratum in (("local stratum 3\n", True, 3), ("", False, 16)):
        server = ServerDaemon(parse_config(text), Sockets(), key_dir=tmp_path)
        await server.start()
        try:
            views = server.own_clock_handlers()
            tracking = await views["tracking"]([])
            assert tracking["synchronised"] is synced
            assert tracking["reference"] == ("127.127.1.1" if synced else None)
            assert tracking["stratum"] == stratum
            assert tracking["leap"] == (int(Leap.NONE) if synced else 3)
            assert tracking["clock_control"] is False  # a server alone never steers
            assert await views["sources"]([]) == []  # no sources, as chronyd without any
            assert set((await views["activity"]([])).values()) == {0}
        finally:
            await server.stop()


async def test_stop_saves_the_key_ring(tmp_path: Path) -> None:
    server = ServerDaemon(parse_config(""), Sockets(), key_dir=tmp_path)
    await server.start()
    ids = [k.key_id for k in server.keys.ring.keys]
    await server.stop()
    again = ServerDaemon(parse_config(""), Sockets(), key_dir=tmp_path)
    again.keys.load(again.clock.now_ns() // 10**9)
    assert [k.key_id for k in again.keys.ring.keys] == ids
