"""Batched datagram I/O (``ntspy._accel.recv_batch`` / ``send_batch``) and the
server loop built on it.

The C functions are tested on real loopback sockets, IPv4 and IPv6, and fed
hostile arguments. The server loop runs once with the accelerator and once
without it (``NTSPY_NO_ACCEL=1`` only decides the default; the test swaps
the functions in itself), and both must answer and count the same.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ntspy import _accel
from ntspy.net import udp
from ntspy.net.udp import MAX_DATAGRAM, SO_TIMESTAMPNS, UdpServer, UdpStats

SECOND = 1_000_000_000


def _pair(family: int, stamped: bool = True) -> Iterator[tuple[socket.socket, socket.socket]]:
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    rx = socket.socket(family, socket.SOCK_DGRAM)
    tx = socket.socket(family, socket.SOCK_DGRAM)
    try:
        rx.bind((host, 0))
        tx.bind((host, 0))
        rx.setblocking(False)
        if stamped:
            rx.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        yield rx, tx
    finally:
        rx.close()
        tx.close()


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    yield from _pair(request.param)


def _recv_all(fd: int, want: int, max_count: int = 256, bufsize: int = 2048) -> list[Any]:
    """Loopback delivery is immediate, but allow a moment for it."""
    got: list[Any] = []
    for _ in range(200):
        got += _accel.recv_batch(fd, max_count, bufsize)
        if len(got) >= want:
            break
        time.sleep(0.005)
    return got


def test_recv_batch_returns_data_sender_and_kernel_time(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    rx, tx = pair
    before = time.time_ns()
    payloads = [b"first", b"", bytes(range(256)) * 4]
    for p in payloads:
        tx.sendto(p, rx.getsockname())
    got = _recv_all(rx.fileno(), len(payloads))
    after = time.time_ns()
    assert [d for d, _, _ in got] == payloads
    # The same address format socket.recvfrom gives: (host, port) or
    # (host, port, flowinfo, scope_id).
    assert all(a == tx.getsockname() for _, a, _ in got)
    for _, _, rx_ns in got:
        assert before - SECOND // 10 <= rx_ns <= after + SECOND // 10
    assert _accel.recv_batch(rx.fileno(), 256, 2048) == []


def test_recv_batch_without_timestamps_says_minus_one() -> None:
    for rx, tx in _pair(socket.AF_INET, stamped=False):
        tx.sendto(b"x", rx.getsockname())
        [(data, addr, rx_ns)] = _recv_all(rx.fileno(), 1)
        assert (data, addr, rx_ns) == (b"x", tx.getsockname(), -1)


def test_recv_batch_reports_truncated_datagrams_and_keeps_going(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    rx, tx = pair
    for p in (b"short", bytes(101), bytes(100)):
        tx.sendto(p, rx.getsockname())
    got = _recv_all(rx.fileno(), 3, bufsize=100)
    assert [d for d, _, _ in got] == [b"short", None, bytes(100)]
    assert all(a == tx.getsockname() and t > 0 for _, a, t in got)


def test_recv_batch_takes_at_most_max_count_and_empty_when_nothing_queued() -> None:
    for rx, tx in _pair(socket.AF_INET):
        assert _accel.recv_batch(rx.fileno(), 4, 64) == []  # EAGAIN
        for i in range(5):
            tx.sendto(bytes([i]), rx.getsockname())
        time.sleep(0.05)
        first = _accel.recv_batch(rx.fileno(), 3, 64)
        rest = _recv_all(rx.fileno(), 2, max_count=3, bufsize=64)
        assert [d for d, _, _ in first] == [b"\x00", b"\x01", b"\x02"]
        assert [d for d, _, _ in rest] == [b"\x03", b"\x04"]
        assert _accel.recv_batch(rx.fileno(), 3, 64) == []


def test_send_batch_reaches_several_addresses(pair: tuple[socket.socket, socket.socket]) -> None:
    rx, tx = pair
    family = rx.family
    host = rx.getsockname()[0]
    sinks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        for s in sinks:
            s.bind((host, 0))
            s.settimeout(2.0)
        # IPv6 addresses both as 4-tuples and as plain (host, port).
        items = [(f"to {i}".encode(), s.getsockname()) for i, s in enumerate(sinks)]
        items.append((b"short form", s.getsockname()[:2]))
        assert _accel.send_batch(tx.fileno(), items) == 4
        assert [s.recvfrom(100) for s in sinks[:2]] == [
            (b"to 0", tx.getsockname()),
            (b"to 1", tx.getsockname()),
        ]
        assert sinks[2].recv(100) == b"to 2"
        assert sinks[2].recv(100) == b"short form"
        assert _accel.send_batch(tx.fileno(), []) == 0
    finally:
        for s in sinks:
            s.close()


def test_send_batch_skips_a_datagram_the_kernel_refuses_and_sends_the_rest() -> None:
    for rx, tx in _pair(socket.AF_INET):
        rx.settimeout(2.0)
        to = rx.getsockname()
        items = [
            (bytes(70_000), to),  # EMSGSIZE: longer than any UDP datagram
            (b"one", to),
            (b"v6", ("::1", to[1])),  # EAFNOSUPPORT on an IPv4 socket
            (b"two", to),
            (bytes(70_000), to),
        ]
        assert _accel.send_batch(tx.fileno(), items) == 2
        assert [rx.recv(100), rx.recv(100)] == [b"one", b"two"]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((-1, 8, 100), ValueError),
        ((0, 0, 100), ValueError),
        ((0, 257, 100), ValueError),
        ((0, 8, 0), ValueError),
        ((0, 8, 65_537), ValueError),
        ((0, 2**40, 100), OverflowError),
        ((0, 8, 2**70), OverflowError),
        (("0", 8, 100), TypeError),
        ((0, 8.0, 100), TypeError),
        ((0, 8), TypeError),
    ],
)
def test_recv_batch_rejects_hostile_arguments(
    args: tuple[Any, ...], error: type[Exception]
) -> None:
    with pytest.raises(error):
        _accel.recv_batch(*args)


def test_recv_batch_on_a_non_socket_or_closed_fd_raises_oserror() -> None:
    with open(__file__, "rb") as f, pytest.raises(OSError):
        _accel.recv_batch(f.fileno(), 4, 100)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fd = s.fileno()
    s.close()
    with pytest.raises(OSError):
        _accel.recv_batch(fd, 4, 100)


class _Int(int):
    def __index__(self) -> int:  # pragma: no cover - must never be called
        raise AssertionError("send_batch ran Python code")


@pytest.mark.parametrize(
    ("items", "error"),
    [
        ({"a": 1}, TypeError),
        ([(b"x", ("127.0.0.1", 9))] * 257, ValueError),
        ([b"x"], TypeError),
        ([(b"x",)], TypeError),
        ([("text", ("127.0.0.1", 9))], TypeError),
        ([(bytearray(b"x"), ("127.0.0.1", 9))], TypeError),
        ([(b"x", ("localhost", 9))], ValueError),  # numeric only: no DNS here
        ([(b"x", ("127.0.0.1\x00junk", 9))], ValueError),
        ([(b"x", ("", 9))], ValueError),
        ([(b"x", ("1" * 100_000, 9))], ValueError),
        ([(b"x", ("127.0.0.1", 65_536))], OverflowError),
        ([(b"x", ("127.0.0.1", -1))], OverflowError),
        ([(b"x", ("127.0.0.1", "9"))], TypeError),
        ([(b"x", ("127.0.0.1", _Int(9)))], TypeError),
        ([(b"x", ("127.0.0.1",))], TypeError),
        ([(b"x", ("::1", 9, 0))], TypeError),
        ([(b"x", ("::1", 9, 1 << 20, 0))], OverflowError),
        ([(b"x", ("::1", 9, 0, 1 << 32))], OverflowError),
        ([(b"x", ("::1", 9, -1, 0))], OverflowError),
        ([(b"x", ("fe80::1%no-such-interface", 9))], ValueError),
        ([(b"x", "127.0.0.1:9")], TypeError),
    ],
)
def test_send_batch_rejects_hostile_items_before_sending_anything(
    items: Any, error: type[Exception]
) -> None:
    for rx, tx in _pair(socket.AF_INET):
        good = (b"good", rx.getsockname())
        batch = [good, *items] if isinstance(items, list) and len(items) < 256 else items
        with pytest.raises(error):
            _accel.send_batch(tx.fileno(), batch)
        time.sleep(0.01)
        assert _accel.recv_batch(rx.fileno(), 8, 100) == []  # the good one was not sent


def test_batch_calls_leak_no_references() -> None:
    for rx, tx in _pair(socket.AF_INET):
        payload = b"counted payload"
        to = rx.getsockname()
        good = [(payload, to)]
        bad = [(payload, to), (payload, ("bad host", 1))]
        refs = sys.getrefcount(payload), sys.getrefcount(to)
        for _ in range(100):
            assert _accel.send_batch(tx.fileno(), good) == 1
            with pytest.raises(ValueError):
                _accel.send_batch(tx.fileno(), bad)
        assert (sys.getrefcount(payload), sys.getrefcount(to)) == refs
        got = _recv_all(rx.fileno(), 100)
        assert len(got) == 100
        # Nothing in the results is over-counted: only its container holds
        # each object (sys.getrefcount's own argument is the second reference).
        counts = {(sys.getrefcount(got[i]), sys.getrefcount(got[i][0])) for i in range(len(got))}
        assert counts == {(2, 2)}


async def _exercise_server(batched: bool) -> tuple[list[bytes], UdpStats]:
    """Send the same mix of datagrams to a server; its replies and counters."""

    def handler(data: bytes, addr: Any, rx_ns: int) -> Any:  # Any: also a bytearray
        assert abs(rx_ns - time.time_ns()) < SECOND
        if data == b"boom":
            raise RuntimeError("handler bug")
        if data == b"huge":
            return bytes(70_000)  # the kernel refuses it: a send error
        if data == b"bytearray":
            return bytearray(b"from a bytearray")
        return None if data == b"quiet" else b"re: " + data + f" {addr[0]}".encode()

    server = await UdpServer.bind("127.0.0.1", 0, handler)
    server.batched = batched
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    payloads = [b"a", b"boom", b"quiet", b"huge", bytes(MAX_DATAGRAM + 1), b"bytearray", b"b"]
    try:
        for p in payloads:
            client.sendto(p, server.address)
        answers = [
            (await asyncio.wait_for(loop.sock_recvfrom(client, MAX_DATAGRAM), 2.0))[0]
            for _ in range(3)
        ]
        for _ in range(100):
            if server.stats.received == len(payloads):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)  # nothing else may arrive
        with pytest.raises(BlockingIOError):
            client.recv(MAX_DATAGRAM)
        return sorted(answers), server.stats
    finally:
        client.close()
        server.close()


async def test_server_loop_answers_and_counts_the_same_with_and_without_batching(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Whatever NTSPY_NO_ACCEL says, run the batched loop on the built module.
    monkeypatch.setattr(udp, "_recv_batch", _accel.recv_batch)
    monkeypatch.setattr(udp, "_send_batch", _accel.send_batch)
    single = await _exercise_server(batched=False)
    batched = await _exercise_server(batched=True)
    assert single == batched
    answers, stats = batched
    assert answers == sorted([b"re: a 127.0.0.1", b"re: b 127.0.0.1", b"from a bytearray"])
    assert stats == UdpStats(
        received=7,
        kernel_rx_timestamps=7,  # Linux stamps every datagram
        daemon_rx_timestamps=0,
        truncated=1,
        dropped=1,
        sent=3,
        send_errors=1,
    )


async def test_server_batched_loop_reads_the_clock_when_the_kernel_gives_no_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(udp, "_recv_batch", _accel.recv_batch)
    monkeypatch.setattr(udp, "_send_batch", _accel.send_batch)
    seen: list[int] = []

    def handler(data: bytes, addr: Any, rx_ns: int) -> bytes:
        seen.append(rx_ns)
        return data

    server = await UdpServer.bind("127.0.0.1", 0, handler)
    server.batched = True
    server.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 0)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        before = time.time_ns()
        client.sendto(b"ping", server.address)
        reply, _ = await asyncio.wait_for(loop.sock_recvfrom(client, 100), 2.0)
        assert reply == b"ping"
        assert before <= seen[0] <= time.time_ns()
        s = server.stats
        assert (s.received, s.kernel_rx_timestamps, s.daemon_rx_timestamps, s.sent) == (1, 0, 1, 1)
    finally:
        client.close()
        server.close()


def test_batching_is_the_default_unless_disabled() -> None:
    import os

    disabled = os.environ.get("NTSPY_NO_ACCEL", "") not in ("", "0")
    assert udp.BATCHED is not disabled
