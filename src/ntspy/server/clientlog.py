"""Who the server serves, like ``chronyc clients``.

Per client address: NTP packets seen and dropped by the rate limit, NTS-KE
connections seen and refused at the door (``allow``/``deny``, the caps, the
rate limit), and when each was last seen.  As in chrony, a "hit" is every
request logged, dropped or not: answered = hits - drops.  Denied NTP packets
are not logged (as chronyd: a spoofed flood from denied addresses must not
churn the table); malformed ones are not either.

Bounded by ``clientloglimit`` bytes (:data:`ENTRY_BYTES` per client, the
dictionary entry included) and off with ``noclientlog``.  When the table is
full, the least recently seen sixteenth of it is evicted at once, so that a
flood of new addresses costs one scan per ``capacity / 16`` of them instead
of one per packet.

Layout.  One :class:`ClientLogTable` holds one region per serving process,
in shared memory when there are workers.  A region is ``capacity`` slots of
:data:`SLOT_WORDS` 64-bit integers; only its process writes it (the NTP
responder and the NTS-KE callbacks, all on that process's event loop
thread), through a private dict from address to slot number; an NTP hit
is one dict lookup and one addition to a private list, published to the
slot once a second (see :class:`ClientLog`).  The supervisor reads every
region without asking the workers: a slot's first word is a sequence
number, odd while the writer gives the slot to another address (a seqlock),
so a reader never shows one client's address with another's counters.
Counter updates on a live slot are single aligned stores and need no lock.
A restarted worker takes over its region's entries.
"""

from __future__ import annotations

import heapq
import mmap
import socket
import struct
from dataclasses import dataclass
from typing import Any

DEFAULT_LIMIT = 524288
"""chrony's default ``clientloglimit`` (bytes)."""

ENTRY_BYTES = 256
"""Memory per client, estimated: the shared slot (80 bytes) plus its private
dict entry (address string 60-90 bytes, slot number 28, dict slot ~50)."""

# Words of a slot.
_SEQ = 0  # even: stable; odd: being given to another address
_FAMILY = 1  # 0 free, 4 IPv4, 6 IPv6, 1 text (an address inet_pton refused)
_ADDR = 2  # two words: the packed address (16 bytes)
_NTP_HITS = 4
_NTP_DROPS = 5
_NKE_HITS = 6
_NKE_DROPS = 7
_LAST_NTP = 8  # Unix ns; 0: never
_LAST_NKE = 9
SLOT_WORDS = 10
_SLOT_BYTES = SLOT_WORDS * 8
_EVICT_SHARE = 16  # evict capacity / 16 entries when full
_READ_TRIES = 4
_TWO_WORDS = struct.Struct("=qq")


def capacity_for(limit: int, processes: int = 1) -> int:
    """Clients each of ``processes`` tables may hold within ``limit`` bytes in all
    (at least one)."""
    return max(1, limit // (ENTRY_BYTES * max(1, processes)))


def _pack_address(address: str) -> tuple[int, bytes]:
    host = address.partition("%")[0]  # a link-local scope: not kept
    for family, code in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
        try:
            return code, socket.inet_pton(family, host).ljust(16, b"\0")
        except OSError:
            continue
    return 1, host.encode("utf-8", "replace")[:16].ljust(16, b"\0")


def _unpack_address(family: int, packed: bytes) -> str:
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, packed[:4])
    if family == 6:
        return socket.inet_ntop(socket.AF_INET6, packed)
    return packed.rstrip(b"\0").decode("utf-8", "replace")


def display_address(address: str) -> str:
    """An IPv4-mapped IPv6 address (from a dual-stack socket) as plain IPv4."""
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """One client of the merged table; times are Unix ns, 0 for never."""

    address: str
    ntp_hits: int
    ntp_drops: int
    nke_hits: int
    nke_drops: int
    last_ntp_ns: int
    last_nke_ns: int

    def to_json(self, now_ns: int) -> dict[str, Any]:
        """The control socket's record (``clients``): seconds ago, None for never."""
        return {
            "address": self.address,
            "ntp_hits": self.ntp_hits,
            "ntp_drops": self.ntp_drops,
            "nke_hits": self.nke_hits,
            "nke_drops": self.nke_drops,
            "last_ntp_ago": _ago(now_ns, self.last_ntp_ns),
            "last_nke_ago": _ago(now_ns, self.last_nke_ns),
        }


def _ago(now_ns: int, then_ns: int) -> float | None:
    if then_ns == 0:
        return None
    return round(max(0, now_ns - then_ns) / 1e9, 3)


class ClientLogTable:
    """One region per serving process (``processes``), ``capacity`` slots each;
    in shared memory (inherited across fork) when ``shared``."""

    def __init__(self, processes: int = 1, limit: int = DEFAULT_LIMIT, *,
                 shared: bool = False) -> None:
        self.processes = max(1, processes)
        self.capacity = capacity_for(limit, self.processes)
        size = self.processes * self.capacity * _SLOT_BYTES
        self._buf: mmap.mmap | bytearray = (
            mmap.mmap(-1, size, flags=mmap.MAP_SHARED) if shared else bytearray(size)
        )
        self._bytes = memoryview(self._buf)
        self._view = self._bytes.cast("q")

    def log(self, process: int = 0) -> ClientLog:
        """The writer of process ``process``'s region (it adopts what is there)."""
        if not 0 <= process < self.processes:
            raise IndexError(f"no region {process}")
        return ClientLog(self._view, self._bytes, process * self.capacity * SLOT_WORDS,
                         self.capacity)

    def _slots(self) -> list[list[int]]:
        """Every slot in use, read consistently (see the module docstring)."""
        view = self._view
        out: list[list[int]] = []
        for i in range(self.processes * self.capacity):
            off = i * SLOT_WORDS
            for _ in range(_READ_TRIES):
                row = view[off:off + SLOT_WORDS].tolist()
                if not row[_SEQ] & 1 and view[off + _SEQ] == row[_SEQ]:
                    if row[_FAMILY]:
                        out.append(row)
                    break
        return out

    def records(self) -> list[ClientRecord]:
        """All processes' entries merged by address, most hits first."""
        merged: dict[str, list[int]] = {}
        for row in self._slots():
            packed = _TWO_WORDS.pack(row[_ADDR], row[_ADDR + 1])
            address = display_address(_unpack_address(row[_FAMILY], packed))
            into = merged.get(address)
            if into is None:
                merged[address] = row[_NTP_HITS:]
                continue
            for i in range(_NTP_HITS, _LAST_NTP):
                into[i - _NTP_HITS] += row[i]
            for i in (_LAST_NTP, _LAST_NKE):
                into[i - _NTP_HITS] = max(into[i - _NTP_HITS], row[i])
        records = [ClientRecord(address, *values) for address, values in merged.items()]
        records.sort(key=lambda r: (-(r.ntp_hits + r.nke_hits), r.address))
        return records

    def to_json(self, now_ns: int) -> list[dict[str, Any]]:
        """The ``clients`` control reply: :meth:`ClientRecord.to_json` per client."""
        return [r.to_json(now_ns) for r in self.records()]


class ClientLog:
    """One process's writer: :meth:`ntp`, :meth:`ntp_drop`, :meth:`nke`, :meth:`flush`.

    Single-threaded: call it from the process's event loop thread only (the
    compiled NTS-KE engine's thread hands its calls over, see ke_server.py).

    An NTP hit is one addition to a private list (``hits[index[address]]``,
    which the responder's fast path does itself); :meth:`flush`, run by the
    daemon's housekeeping every second and before every local read, copies
    the hits that changed into the shared slots and stamps them seen then.
    So the NTP columns seen by another process are up to one flush old, and
    "last NTP hit" has the flush's resolution (1 s).  Everything else
    (drops, NTS-KE) is written to the slot at once.
    """

    __slots__ = ("_bytes", "_free", "_published", "base", "capacity", "hits", "index", "view")

    def __init__(self, view: memoryview, raw: memoryview, base: int, capacity: int) -> None:
        self.view = view
        self._bytes = raw
        self.base = base
        self.capacity = capacity
        self.index: dict[str, int] = {}
        """address -> its slot's number (0 .. capacity - 1)"""
        self.hits = [0] * capacity
        """NTP hits per slot number, ahead of the shared slot until :meth:`flush`"""
        self._published = [0] * capacity
        self._free: list[int] = []
        for i in reversed(range(capacity)):
            off = self._offset(i)
            family = view[off + _FAMILY]
            if view[off + _SEQ] & 1:  # a writer died mid-change: the slot is unusable
                view[off + _FAMILY] = 0
                view[off + _SEQ] += 1
                family = 0
            if family:
                raw_off = (off + _ADDR) * 8
                address = _unpack_address(family, bytes(raw[raw_off:raw_off + 16]))
                self.index[address] = i
                self.hits[i] = self._published[i] = view[off + _NTP_HITS]
            else:
                self._free.append(i)

    def _offset(self, i: int) -> int:
        return self.base + i * SLOT_WORDS

    def __len__(self) -> int:
        return len(self.index)

    def ntp(self, address: str, now_ns: int) -> None:
        """An NTP request from ``address`` that passed access and the rate limit."""
        i = self.index.get(address)
        if i is None:
            i = self.insert(address, now_ns)
        self.hits[i] += 1

    def ntp_drop(self, address: str, now_ns: int) -> None:
        """An NTP request from ``address`` dropped by the rate limit."""
        i = self.index.get(address)
        if i is None:
            i = self.insert(address, now_ns)
        self.hits[i] += 1
        off = self._offset(i)
        view = self.view
        view[off + _NTP_DROPS] += 1
        view[off + _LAST_NTP] = now_ns

    def nke(self, address: str, now_ns: int, dropped: bool) -> None:
        """An NTS-KE connection from ``address``; ``dropped``: refused at the door."""
        i = self.index.get(address)
        if i is None:
            i = self.insert(address, 0)
        off = self._offset(i)
        view = self.view
        view[off + _NKE_HITS] += 1
        if dropped:
            view[off + _NKE_DROPS] += 1
        view[off + _LAST_NKE] = now_ns

    def flush(self, now_ns: int) -> None:
        """Publish the NTP hits counted since the last flush; stamp their clients seen."""
        view, hits, published = self.view, self.hits, self._published
        for i in self.index.values():
            n = hits[i]
            if n != published[i]:
                published[i] = n
                off = self.base + i * SLOT_WORDS
                view[off + _NTP_HITS] = n
                view[off + _LAST_NTP] = now_ns

    def insert(self, address: str, ntp_now_ns: int) -> int:
        """Give ``address`` a slot (evicting if full) and return its number;
        ``ntp_now_ns``: its first NTP hit's time (0: none yet)."""
        if not self._free:
            self._evict(max(1, self.capacity // _EVICT_SHARE), ntp_now_ns)
        i = self._free.pop()
        family, packed = _pack_address(address)
        off = self._offset(i)
        view = self.view
        view[off + _SEQ] += 1  # odd: readers skip the slot
        raw_off = (off + _ADDR) * 8
        self._bytes[raw_off:raw_off + 16] = packed
        for w in range(_NTP_HITS, SLOT_WORDS):
            view[off + w] = 0
        view[off + _LAST_NTP] = ntp_now_ns
        view[off + _FAMILY] = family
        view[off + _SEQ] += 1
        self.hits[i] = self._published[i] = 0
        self.index[address] = i
        return i

    def _evict(self, count: int, now_ns: int) -> None:
        """Free the ``count`` least recently seen entries."""
        if now_ns:
            self.flush(now_ns)  # last-seen times of the hits not yet published
        view, base = self.view, self.base

        def last_seen(item: tuple[str, int]) -> int:
            off = base + item[1] * SLOT_WORDS
            return max(view[off + _LAST_NTP], view[off + _LAST_NKE])

        for address, i in heapq.nsmallest(count, self.index.items(), key=last_seen):
            off = self._offset(i)
            view[off + _SEQ] += 1
            view[off + _FAMILY] = 0
            view[off + _SEQ] += 1
            del self.index[address]
            self._free.append(i)
