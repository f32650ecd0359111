"""A small stub resolver on the event loop: no threads (getaddrinfo needs a pool).

The client daemon stays one thread so it behaves the same under time and
network simulators. This resolver reads /etc/hosts, then asks the
nameservers of /etc/resolv.conf for A and AAAA records over UDP, with a
timeout and a retry per server. It is enough for NTP server names and pools;
anything it cannot answer is a clear :class:`ResolveError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NtsError

TYPE_A = 1
TYPE_AAAA = 28
CLASS_IN = 1
DNS_PORT = 53
_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
MAX_POINTER_HOPS = 32


class ResolveError(NtsError):
    """A name could not be resolved."""


@dataclass(slots=True)
class ResolverConfig:
    nameservers: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", DNS_PORT)])
    hosts: dict[str, list[str]] = field(default_factory=dict)
    timeout: float = 2.0
    attempts: int = 2

    @classmethod
    def from_system(cls, resolv_conf: Path = Path("/etc/resolv.conf"),
                    hosts_file: Path = Path("/etc/hosts")) -> ResolverConfig:
        cfg = cls(nameservers=[])
        with contextlib.suppress(OSError):
            for line in resolv_conf.read_text(errors="replace").splitlines():
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    with contextlib.suppress(ValueError):
                        cfg.nameservers.append((str(ipaddress.ip_address(words[1])), DNS_PORT))
        if not cfg.nameservers:
            cfg.nameservers = [("127.0.0.1", DNS_PORT)]
        with contextlib.suppress(OSError):
            cfg.hosts = parse_hosts(hosts_file.read_text(errors="replace"))
        return cfg


def is_ip_address(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address (nothing to resolve)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_hosts(text: str) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 2:
            continue
        try:
            address = str(ipaddress.ip_address(words[0]))
        except ValueError:
            continue
        for name in words[1:]:
            table.setdefault(name.lower().rstrip("."), []).append(address)
    return table


def build_query(query_id: int, name: str, qtype: int) -> bytes:
    labels = [part.encode("idna") for part in name.rstrip(".").split(".") if part]
    if any(len(label) > 63 for label in labels) or not labels:
        raise ResolveError(f"invalid host name {name!r}")
    qname = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    # Recursion desired; one question.
    return _HEADER.pack(query_id, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, CLASS_IN)


def _skip_name(data: bytes, pos: int) -> int:
    hops = 0
    while True:
        if pos >= len(data):
            raise ResolveError("truncated DNS name")
        length = data[pos]
        if length & 0xC0 == 0xC0:
            return pos + 2
        if length == 0:
            return pos + 1
        pos += 1 + length
        hops += 1
        if hops > 128:
            raise ResolveError("DNS name too long")


def parse_response(data: bytes, query_id: int, qtype: int) -> list[str]:
    """Addresses of type ``qtype`` in a response to our query; ResolveError otherwise."""
    if len(data) < _HEADER.size:
        raise ResolveError("short DNS response")
    rid, flags, qd, an, _ns, _ar = _HEADER.unpack_from(data, 0)
    if rid != query_id or not flags & 0x8000:
        raise ResolveError("DNS response does not match the query")
    rcode = flags & 0x000F
    if rcode == 3:
        return []  # NXDOMAIN
    if rcode != 0:
        raise ResolveError(f"DNS server answered with error code {rcode}")
    pos = _HEADER.size
    try:
        for _ in range(qd):
            pos = _skip_name(data, pos) + 4
        out: list[str] = []
        for _ in range(an):
            pos = _skip_name(data, pos)
            rtype, rclass, _ttl, rdlen = _RR.unpack_from(data, pos)
            pos += _RR.size
            rdata = data[pos:pos + rdlen]
            if len(rdata) != rdlen:
                raise ResolveError("truncated DNS record")
            pos += rdlen
            if rclass == CLASS_IN and rtype == qtype == TYPE_A and rdlen == 4:
                out.append(str(ipaddress.IPv4Address(rdata)))
            elif rclass == CLASS_IN and rtype == qtype == TYPE_AAAA and rdlen == 16:
                out.append(str(ipaddress.IPv6Address(rdata)))
        return out
    except struct.error:
        raise ResolveError("truncated DNS response") from None


class _Answer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.future.done():
            self.future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class Resolver:
    def __init__(self, config: ResolverConfig | None = None) -> None:
        self.config = config or ResolverConfig.from_system()

    async def resolve(self, name: str, families: Sequence[int] = (TYPE_A, TYPE_AAAA)) -> list[str]:
        """Addresses for ``name`` (an IP literal is returned as it is)."""
        try:
            return [str(ipaddress.ip_address(name))]
        except ValueError:
            pass
        key = name.lower().rstrip(".")
        if key in self.config.hosts:
            return list(self.config.hosts[key])
        addresses: list[str] = []
        errors: list[str] = []
        for qtype in families:
            try:
                addresses += await self._query(key, qtype)
            except ResolveError as exc:
                errors.append(str(exc))
        if not addresses:
            why = f": {errors[0]}" if errors else ""
            raise ResolveError(f"cannot resolve {name}{why}")
        return addresses

    async def _query(self, name: str, qtype: int) -> list[str]:
        loop = asyncio.get_running_loop()
        last = "no nameserver answered"
        for server in self.config.nameservers:
            for _ in range(self.config.attempts):
                query_id = int.from_bytes(os.urandom(2), "big")
                packet = build_query(query_id, name, qtype)
                transport, proto = await loop.create_datagram_endpoint(
                    _Answer, remote_addr=server
                )
                try:
                    transport.sendto(packet)
                    data = await asyncio.wait_for(proto.future, self.config.timeout)
                    return parse_response(data, query_id, qtype)
                except TimeoutError:
                    last = f"nameserver {server[0]} did not answer"
                except OSError as exc:
                    last = f"nameserver {server[0]}: {exc.strerror or exc}"
                    break
                finally:
                    transport.close()
        raise ResolveError(last)


AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]


async def getaddrinfo(host: str, port: int, socktype: int) -> list[AddrInfo]:
    """``loop.getaddrinfo`` without its thread pool for IP literals.

    The daemon resolves names with :class:`Resolver` first and hands IP
    addresses on, so it never starts the executor's threads; names given on
    the command line still go through the system resolver (nsswitch, mDNS...).
    """
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        loop = asyncio.get_running_loop()
        return list(await loop.getaddrinfo(host, port, type=socktype))
    if ip.version == 4:
        return [(socket.AF_INET, socktype, 0, "", (str(ip), port))]
    return [(socket.AF_INET6, socktype, 0, "", (str(ip), port, 0, 0))]
