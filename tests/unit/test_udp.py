"""UDP adapter: kernel receive timestamps, IPv4/IPv6, timeouts, errors."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from ntspy.clock import ManualClock, SystemClock
from ntspy.net.udp import MAX_DATAGRAM, SO_TIMESTAMPNS, UdpClient, UdpServer, kernel_rx_ns


def echo(data: bytes, addr: Any, rx_ns: int) -> bytes:
    return data


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_round_trip_carries_kernel_receive_timestamps(host: str) -> None:
    server = await UdpServer.bind(host, 0, echo)
    client = await UdpClient.open(host, server.address[1])
    try:
        before = time.clock_gettime_ns(time.CLOCK_REALTIME)
        t1 = client.send(b"ping")
        received = await client.recv(2.0)
        after = time.clock_gettime_ns(time.CLOCK_REALTIME)
        assert received is not None
        assert received.data == b"ping"
        assert received.kernel_ts
        assert before <= t1 <= received.rx_ns <= after
        assert server.stats.kernel_rx_timestamps == 1
        assert server.stats.daemon_rx_timestamps == 0
        assert client.stats.kernel_rx_timestamps == 1
        assert client.peer[0] == host
    finally:
        client.close()
        server.close()


async def test_falls_back_to_the_clock_and_says_so() -> None:
    clock = ManualClock(1_700_000_000_123_456_789)
    server = await UdpServer.bind("127.0.0.1", 0, echo)
    client = await UdpClient.open("127.0.0.1", server.address[1], clock)
    client.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 0)
    try:
        assert client.send(b"x") == 1_700_000_000_123_456_789
        received = await client.recv(2.0)
        assert received is not None
        assert not received.kernel_ts
        assert received.rx_ns == 1_700_000_000_123_456_789
        assert client.stats.daemon_rx_timestamps == 1
    finally:
        client.close()
        server.close()


def test_kernel_rx_ns_ignores_missing_or_foreign_control_messages() -> None:
    assert kernel_rx_ns([]) is None
    assert kernel_rx_ns([(socket.IPPROTO_IP, 1, b"\x00" * 16)]) is None


async def test_recv_times_out_with_none() -> None:
    server = await UdpServer.bind("127.0.0.1", 0, lambda d, a, t: None)
    client = await UdpClient.open("127.0.0.1", server.address[1])
    try:
        client.send(b"unanswered")
        start = time.monotonic()
        assert await client.recv(0.2) is None
        assert 0.15 < time.monotonic() - start < 1.5
        assert server.stats.received == 1
    finally:
        client.close()
        server.close()


async def test_server_answers_a_burst_of_datagrams() -> None:
    server = await UdpServer.bind("127.0.0.1", 0, echo)
    client = await UdpClient.open("127.0.0.1", server.address[1])
    try:
        for i in range(30):
            client.send(i.to_bytes(2, "big"))
        got: set[int] = set()
        while len(got) < 30:
            received = await client.recv(2.0)
            assert received is not None
            got.add(int.from_bytes(received.data, "big"))
        assert got == set(range(30))
        assert server.stats.sent == 30
    finally:
        client.close()
        server.close()


async def test_handler_exception_is_counted_and_server_keeps_going() -> None:
    def handler(data: bytes, addr: Any, rx_ns: int) -> bytes:
        if data == b"boom":
            raise RuntimeError("handler bug")
        return data

    server = await UdpServer.bind("127.0.0.1", 0, handler)
    client = await UdpClient.open("127.0.0.1", server.address[1])
    try:
        client.send(b"boom")
        client.send(b"fine")
        received = await client.recv(2.0)
        assert received is not None and received.data == b"fine"
        assert server.stats.dropped == 1
    finally:
        client.close()
        server.close()


async def test_closed_port_reports_connection_refused() -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    client = await UdpClient.open("127.0.0.1", port, SystemClock())
    try:
        client.send(b"anyone?")
        with pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(client.recv(2.0), 3.0)
    finally:
        client.close()


# The server's drain loop: every datagram counted once, nothing read after close.


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
