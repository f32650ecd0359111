"""The server's per-packet machinery around the responder: the UDP drain loop's
counters and the random pool the responder draws its nonces from."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from ntspy.net.udp import MAX_DATAGRAM, UdpServer
from ntspy.server.responder import RandomPool


async def test_server_loop_counts_every_datagram_once() -> None:
    def handler(data: bytes, addr: Any, rx_ns: int) -> bytes | None:
        assert rx_ns > 0
        if data == b"boom":
            raise RuntimeError("handler bug")
        return None if data == b"quiet" else data

    server = await UdpServer.bind("127.0.0.1", 0, handler)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        payloads = [b"a", b"boom", b"quiet", b"b", bytes(MAX_DATAGRAM + 100), b"c"]
        for p in payloads:
            client.sendto(p, server.address)
        answers = sorted([
            (await asyncio.wait_for(loop.sock_recvfrom(client, MAX_DATAGRAM), 2.0))[0]
            for _ in range(3)
        ])
        assert answers == [b"a", b"b", b"c"]
        for _ in range(50):  # the last datagrams may still be in flight
            if server.stats.received == len(payloads):
                break
            await asyncio.sleep(0.01)
        s = server.stats
        assert (s.received, s.sent, s.dropped, s.truncated) == (6, 3, 1, 1)
        assert s.kernel_rx_timestamps + s.daemon_rx_timestamps == s.received
        assert s.kernel_rx_timestamps == s.received == 6  # Linux stamps every one
    finally:
        client.close()
        server.close()


async def test_server_loop_stops_reading_when_closed() -> None:
    server = await UdpServer.bind("127.0.0.1", 0, lambda d, a, t: d)
    address = server.address
    server.close()
    server.close()  # twice is fine
    assert server.sock.fileno() == -1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.sendto(b"x", address)  # nobody reads it; nothing raises in the loop
        await asyncio.sleep(0.05)
    assert server.stats.received == 0


def test_random_pool_hands_out_fresh_bytes_in_slices() -> None:
    drawn: list[int] = []

    def source(n: int) -> bytes:
        drawn.append(n)
        return os.urandom(n)

    pool = RandomPool(block=64, source=source)
    parts = [pool(16) for _ in range(8)]
    assert all(len(p) == 16 for p in parts) and len(set(parts)) == 8
    assert drawn == [64, 64]  # two blocks for 128 bytes
    assert len(pool(12)) == 12 and len(pool(100)) == 100  # bigger than a block: direct
    assert drawn[-1] == 100


def test_random_pool_is_not_shared_with_a_forked_child() -> None:
    pool = RandomPool()
    pool(16)  # fill the block before forking
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it would use next, then leave at once
        try:
            os.write(write, pool(16))
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 16 and child != pool(16)
