"""The thread-free stub resolver, against a tiny DNS server of the test's own on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntspy.client.daemon import ClientDaemon, ClientOptions
from ntspy.clock import MeasureOnlyClock
from ntspy.config import parse_config
from ntspy.net.dns import (
    TYPE_A,
    TYPE_AAAA,
    ResolveError,
    Resolver,
    ResolverConfig,
    build_query,
    parse_hosts,
    parse_response,
)

ZONE = {("pool.example", TYPE_A): [bytes([127, 0, 0, 2]), bytes([127, 0, 0, 3])],
        ("pool.example", TYPE_AAAA): [bytes(15) + b"\x01"]}


def answer(query: bytes) -> bytes:
    qid, _flags = struct.unpack_from("!HH", query)
    pos, labels = 12, []
    while query[pos]:
        labels.append(query[pos + 1:pos + 1 + query[pos]].decode())
        pos += 1 + query[pos]
    qtype = struct.unpack_from("!H", query, pos + 1)[0]
    question = query[12:pos + 5]
    records = ZONE.get((".".join(labels), qtype), [])
    rcode = 0 if records or ".".join(labels) == "pool.example" else 3
    out = struct.pack("!HHHHHH", qid, 0x8180 | rcode, 1, len(records), 0, 0) + question
    for rdata in records:  # name as a compression pointer to the question
        out += struct.pack("!HHHIH", 0xC00C, qtype, 1, 60, len(rdata)) + rdata
    return out


class FakeDns(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(answer(data), addr)  # type: ignore[attr-defined]


async def start_server(port: int = 0) -> tuple[asyncio.DatagramTransport, int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(FakeDns, local_addr=("127.0.0.1", port))
    return transport, transport.get_extra_info("sockname")[1]


async def test_resolves_a_and_aaaa_without_threads() -> None:
    transport, port = await start_server()
    try:
        resolver = Resolver(ResolverConfig([("127.0.0.1", port)], timeout=1.0))
        assert await resolver.resolve("pool.example") == ["127.0.0.2", "127.0.0.3", "::1"]
        with pytest.raises(ResolveError, match=r"cannot resolve nowhere\.example"):
            await resolver.resolve("nowhere.example")
    finally:
        transport.close()


async def test_ip_literals_and_hosts_file_need_no_query() -> None:
    resolver = Resolver(ResolverConfig([("127.0.0.1", 9)], hosts=parse_hosts(
        "127.0.0.5 ntp.local ntp # comment\nbad line\n::1 six.local\n")))
    assert await resolver.resolve("192.0.2.1") == ["192.0.2.1"]
    assert await resolver.resolve("NTP.local.") == ["127.0.0.5"]
    assert await resolver.resolve("six.local") == ["::1"]


async def test_silent_nameserver_times_out_with_a_clear_error() -> None:
    loop = asyncio.get_running_loop()
    silent, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                    local_addr=("127.0.0.1", 0))
    port = silent.get_extra_info("sockname")[1]
    try:
        resolver = Resolver(ResolverConfig([("127.0.0.1", port)], timeout=0.2, attempts=1))
        with pytest.raises(ResolveError, match="did not answer"):
            await resolver.resolve("pool.example")
    finally:
        silent.close()


def test_response_for_another_query_is_refused() -> None:
    reply = answer(build_query(7, "pool.example", TYPE_A))
    assert parse_response(reply, 7, TYPE_A) == ["127.0.0.2", "127.0.0.3"]
    with pytest.raises(ResolveError):
        parse_response(reply, 8, TYPE_A)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_garbage_responses_raise_only_resolve_error(data: bytes) -> None:
    with contextlib.suppress(ResolveError):
        parse_response(data, int.from_bytes(data[:2] or b"\0\0", "big"), TYPE_A)


async def test_daemon_expands_a_pool_through_the_resolver() -> None:
    transport, port = await start_server()
    try:
        resolver = Resolver(ResolverConfig([("127.0.0.1", port)], timeout=1.0))
        config = parse_config("pool pool.example iburst maxsources 2\nserver 127.0.0.9\n")
        daemon = ClientDaemon(config, MeasureOnlyClock(), ClientOptions(resolver=resolver))
        sources = await daemon._make_sources(daemon.configured_sources())
        assert [s.name for s in sources] == ["127.0.0.2", "127.0.0.3", "127.0.0.9"]
        assert all(s.resolved for s in sources)
    finally:
        transport.close()


async def test_a_pool_that_does_not_resolve_at_start_is_retried_until_it_does() -> None:
    # The nameserver is not there at boot (the network comes up late) ...
    loop = asyncio.get_running_loop()
    silent, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                    local_addr=("127.0.0.1", 0))
    port = silent.get_extra_info("sockname")[1]
    resolver = Resolver(ResolverConfig([("127.0.0.1", port)], timeout=0.1, attempts=1))
    config = parse_config("pool pool.example iburst maxsources 2\n")
    daemon = ClientDaemon(config, MeasureOnlyClock(), ClientOptions(
        resolver=resolver, pool_check=0.05, pool_retry=0.1))
    try:
        await daemon.start()
        assert daemon.sources == []  # nothing yet, but not given up on
        await asyncio.sleep(0.5)
        assert daemon.sources == []
        # ... then it answers, on the same address.
        silent.close()
        await asyncio.sleep(0.01)  # the close takes effect on the next turn of the loop
        transport, _ = await start_server(port)
        try:
            for _ in range(100):
                if len(daemon.sources) == 2:
                    break
                await asyncio.sleep(0.05)
            assert sorted(s.address for s in daemon.sources) == ["127.0.0.2", "127.0.0.3"]
        finally:
            transport.close()
    finally:
        await daemon.stop()


async def test_an_unreachable_pool_source_is_replaced() -> None:
    transport, port = await start_server()
    resolver = Resolver(ResolverConfig([("127.0.0.1", port)], timeout=1.0))
    config = parse_config("pool pool.example maxsources 1\n")
    daemon = ClientDaemon(config, MeasureOnlyClock(), ClientOptions(
        resolver=resolver, pool_check=0.05, pool_retry=0.1))
    try:
        daemon.sources = await daemon._make_sources(daemon.configured_sources())
        (first,) = daemon.sources
        assert first.address == "127.0.0.2"
        first.machine.polls = 8  # eight polls, no answer: the reach register is empty
        key, state = next(iter(daemon._pools.items()))
        await daemon._keep_pool(key, state)
        assert [s.address for s in daemon.sources] == ["127.0.0.3"]
    finally:
        await daemon.stop()
        transport.close()


@pytest.mark.parametrize(("flag", "expected"), [
    ("-4", ["127.0.0.2", "127.0.0.3"]), ("-6", ["::1"]), (None, ["127.0.0.2", "127.0.0.3", "::1"]),
])
async def test_ipv4_or_ipv6_only_like_chronyd(flag: str | None, expected: list[str]) -> None:
    import argparse

    from ntspy.run import add_arguments, families
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([flag, "-x"] if flag else ["-x"])
    transport, port = await start_server()
    try:
        resolver = Resolver(ResolverConfig([("127.0.0.1", port)], timeout=1.0))
        config = parse_config("pool pool.example maxsources 4\n")
        daemon = ClientDaemon(config, MeasureOnlyClock(),
                              ClientOptions(resolver=resolver, families=families(args)))
        sources = await daemon._make_sources(daemon.configured_sources())
        assert [s.address for s in sources] == expected
    finally:
        transport.close()
