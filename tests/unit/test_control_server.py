"""The command socket in-process: chrony's protocol on a Unix datagram socket and UDP,
garbage never stops it, long views come back whole in pages, refusals are chrony's."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest

from ntspy.control import candm
from ntspy.control.protocol import ControlError, ControlServer, request
from ntspy.errors import NtsError


def handlers() -> dict[str, Any]:
    async def sources(args: list[str]) -> list[dict[str, Any]]:
        return [{"name": f"s{i}", "configured": f"s{i}", "address": f"192.0.2.{i}",
                 "mode": "^", "state": "?", "stratum": 2, "poll": 6, "reach": 0,
                 "last_rx": None, "adjusted_offset": 0.0, "measured_offset": 0.0, "error": 0.0,
                 "options": {}, "padding": "x" * 100} for i in range(40)]

    async def boom(args: list[str]) -> None:
        raise RuntimeError("a bug")

    async def refuse(args: list[str]) -> None:
        raise NtsError("no such source 192.0.2.99")

    return {"sources": sources, "boom": boom, "delete": refuse}


@pytest.fixture
def short_dir() -> Any:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:  # Unix socket paths are short
        yield Path(d)


async def test_garbage_then_a_long_view_in_pages(short_dir: Path) -> None:
    path = short_dir / "c.sock"
    server = ControlServer(path, handlers(), [("127.0.0.1", 0)])
    await server.start()
    try:
        assert os.stat(path).st_mode & 0o777 == 0o666
        port = server.udp_addresses[0][1]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as u, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as v:
            u.bind(f"\0ntspy-test-{os.getpid()}")
            u.settimeout(0.2)
            for junk in (b"", b"\x06", os.urandom(27), os.urandom(400), b"\x06\x01" + bytes(900)):
                u.sendto(junk, str(path))
                v.sendto(junk, ("127.0.0.1", port))
        await asyncio.sleep(0.1)
        rows = await request(path, "sources")
        assert len(rows) == 40 and rows[39]["address"] == "192.0.2.39"  # several pages
        with pytest.raises(ControlError, match="internal error: a bug"):
            await request(path, "boom")
        with pytest.raises(ControlError, match="unknown command 'nope'"):
            await request(path, "nope")
    finally:
        await server.close()
    assert not path.exists()


async def test_udp_answers_open_commands_and_refuses_the_rest(short_dir: Path) -> None:
    server = ControlServer(short_dir / "c.sock", handlers(), [("127.0.0.1", 0)])
    await server.start()
    loop = asyncio.get_running_loop()
    try:
        port = server.udp_addresses[0][1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.connect(("127.0.0.1", port))

            async def ask(command: int, body: Any = None) -> candm.Reply:
                s.send(candm.build_request(command, body, sequence=7))
                data = await asyncio.wait_for(loop.sock_recv(s, 4096), 2.0)
                return candm.parse_reply(data, 7)

            reply = await ask(candm.Command.N_SOURCES)
            assert reply.ok and isinstance(reply.body, candm.NSources)
            assert reply.body.n_sources == 40
            reply = await ask(candm.Command.SOURCE_DATA, candm.SourceIndex(3))
            assert isinstance(reply.body, candm.SourceData)
            assert str(reply.body.address) == "192.0.2.3" and reply.body.poll == 6
            reply = await ask(candm.Command.SOURCE_DATA, candm.SourceIndex(99))
            assert reply.status == candm.Status.NOSUCHSOURCE
            for command in (candm.Command.SHUTDOWN, candm.Command.NTP_DATA,
                            candm.Command.DEL_SOURCE):
                body = candm.body_type(command)
                reply = await ask(command, body() if body else None)
                assert reply.status == candm.Status.UNAUTH, command
    finally:
        await server.close()


async def test_a_handler_refusal_is_chrony_status(short_dir: Path) -> None:
    """Over the Unix socket (root here): delete of an unknown source is 503."""
    path = short_dir / "c.sock"
    server = ControlServer(path, handlers())
    await server.start()
    loop = asyncio.get_running_loop()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(f"\0ntspy-test-del-{os.getpid()}")
            s.setblocking(False)
            s.connect(str(path))
            s.send(candm.build_request(
                candm.Command.DEL_SOURCE,
                candm.AddressArg(ipaddress.ip_address("192.0.2.99")), sequence=9))
            reply = candm.parse_reply(await asyncio.wait_for(loop.sock_recv(s, 4096), 2.0), 9)
            assert reply.status == candm.Status.NOSUCHSOURCE
    finally:
        await server.close()
