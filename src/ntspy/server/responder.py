"""The NTP responder: a request's bytes in, a response's bytes (or nothing) out.

Sans-I/O: the adapter hands in the datagram, the client address, the kernel
receive time, a function returning the time to put in the transmit
timestamp (called once, just before the response is built) and a source of
random bytes.

The responder only decides: whether the client may be answered (access
rules), how the rate limit treats it, whether an NTS request gets its answer
or a NAK, and the values in the response's header. What a request holds and
how an answer is laid out and sealed is ``proto/``'s: :func:`nts.scan_request`
and :func:`nts.parse_request` read a request, :class:`nts.ResponsePlan`
builds every NTS answer, and the key ring (``proto/cookies.py``) opens
cookies and seals new ones. Each packet's fate is a :class:`Reason`
(``Responder.reason`` after :meth:`Responder.handle`), and each reason moves
a fixed set of counters (:data:`REASON_COUNTERS`).
"""

from __future__ import annotations

import contextlib
import enum
import os
import weakref
from collections.abc import Callable

from ..errors import AuthenticationFailure, MalformedPacket
from ..proto import nts
from ..proto.aead import Aead
from ..proto.cookies import KeyRing
from ..proto.ntp import (
    HEADER_LEN,
    KISS_NTS_NAK,
    KISS_RATE,
    NS_PER_SECOND,
    NTP_UNIX_OFFSET,
    REQUEST_POLL,
    REQUEST_TRANSMIT,
    RESPONSE_HEADER,
    RESPONSE_MIDDLE,
    V4_CLIENT,
    VERSION_MODE_MASK,
    Mode,
    NtpHeader,
    SyncState,
    encode_ef,
    first_byte,
    iter_efs,
    seconds_to_short,
    unix_ns_to_ntp,
)
from .access import AccessTable
from .clientlog import ClientLog
from .ratelimit import RateLimiter, Verdict
from .stats import ServerStats, counter_index

PLAN_CACHE_SIZE = 4096
"""Response plans kept (one per session seen lately); the cache is emptied when full."""


class Reason(enum.IntEnum):
    """What became of one request: answered how, or why not (as ntpd-rs's
    ServerReason x ServerResponse, flattened). Each moves the counters
    :data:`REASON_COUNTERS` lists."""

    ANSWERED = 0
    """Plain NTP, answered with the time."""
    RATE_KOD = 1
    """Plain NTP over the rate limit, answered with a RATE kiss-o'-death."""
    NTS_ANSWERED = 2
    """NTS, authenticated and answered with the time and new cookies."""
    NTS_RATE_KOD = 3
    """NTS over the rate limit, authenticated: an authenticated RATE kiss with cookies."""
    NAK = 4
    """NTS whose cookie or authenticator failed: an NTS NAK (RFC 8915 s5.7)."""
    RATE_NAK = 5
    """The same, over the rate limit."""
    DENIED = 6
    """Not allowed by the access rules: dropped."""
    RATE_DROP = 7
    """Over the rate limit: dropped."""
    MALFORMED = 8
    """Not an NTP client request we can read: dropped."""


def _indices(*names: str) -> tuple[int, ...]:
    return tuple(counter_index(name) for name in names)


REASON_COUNTERS: dict[Reason, tuple[str, ...]] = {
    Reason.ANSWERED: ("ntp_received", "daemon_tx"),
    Reason.RATE_KOD: ("ntp_received", "ntp_rate_kod", "daemon_tx"),
    Reason.NTS_ANSWERED: ("ntp_received", "nts_authenticated", "daemon_tx"),
    Reason.NTS_RATE_KOD: ("ntp_received", "ntp_rate_kod", "nts_authenticated", "daemon_tx"),
    Reason.NAK: ("ntp_received", "nts_auth_failures", "nts_naks"),
    Reason.RATE_NAK: ("ntp_received", "ntp_rate_kod", "nts_auth_failures", "nts_naks"),
    Reason.DENIED: ("ntp_denied",),
    Reason.RATE_DROP: ("ntp_dropped",),
    Reason.MALFORMED: ("ntp_malformed",),
}
"""The counters (server/stats.py) each reason adds one to; an answered NTS
request also adds its new cookies to ``nts_cookies``."""

_COUNTS = tuple(_indices(*REASON_COUNTERS[reason]) for reason in Reason)
_NTS_COOKIES = counter_index("nts_cookies")
# the hot path's reasons, looked up once
_ANSWERED, _RATE_KOD, _NTS_ANSWERED, _NTS_RATE_KOD, _NAK, _RATE_NAK = (
    Reason.ANSWERED, Reason.RATE_KOD, Reason.NTS_ANSWERED, Reason.NTS_RATE_KOD, Reason.NAK,
    Reason.RATE_NAK,
)

_REPLY_PACK = RESPONSE_HEADER.pack
_POLL, _ORIGIN = REQUEST_POLL, REQUEST_TRANSMIT


class RandomPool:
    """``os.urandom`` drawn in 4 KiB blocks and handed out in slices.

    Two nonces per NTS response cost two getrandom() calls without it. The
    block is thrown away in a forked child, so no two processes ever hand
    out the same bytes.
    """

    def __init__(self, block: int = 4096, source: Callable[[int], bytes] = os.urandom) -> None:
        self.block = block
        self.source = source
        self._buf = b""
        self._pos = 0
        ref = weakref.ref(self)

        def forget() -> None:
            pool = ref()
            if pool is not None:
                pool.reset()

        os.register_at_fork(after_in_child=forget)

    def reset(self) -> None:
        """Forget the unused bytes."""
        self._buf, self._pos = b"", 0

    def __call__(self, n: int) -> bytes:
        """``n`` random bytes."""
        return self.take(n)

    def take(self, n: int) -> bytes:
        """``n`` random bytes (what calling the pool does, without the call slot:
        the responder calls this one per packet)."""
        pos = self._pos
        end = pos + n
        if end > len(self._buf):
            if n > self.block:
                return self.source(n)
            self._buf, pos, end = self.source(self.block), 0, n
        self._pos = end
        return self._buf[pos:end]


_NTP_EPOCH = NTP_UNIX_OFFSET << 32
_TS_MASK = (1 << 64) - 1


def _ntp_ts(unix_ns: int) -> int:
    # unix_ns_to_ntp's expression, inlined in handle where it runs twice per packet
    return ((unix_ns << 32) // NS_PER_SECOND + _NTP_EPOCH) & _TS_MASK


class Responder:
    """Answers NTP and NTS requests (see the module docstring).

    ``fastpath=False`` reads every request with :func:`nts.parse_request`
    instead of trying :func:`nts.scan_request` first; the scan exists only
    for speed and leads to the same decisions and bytes (tested).
    """

    def __init__(
        self,
        keyring: KeyRing,
        stats: ServerStats,
        random_bytes: Callable[[int], bytes],
        *,
        access: AccessTable | None = None,
        ratelimit: RateLimiter | None = None,
        fastpath: bool = True,
        clients: ClientLog | None = None,
    ) -> None:
        """``clients``: the client log to count each logged request in (``clientloglimit``;
        None: ``noclientlog``)."""
        self.keyring = keyring
        self.stats = stats
        self.random_bytes = random_bytes
        self.access = access
        self.ratelimit = ratelimit
        self.fastpath = fastpath
        self.clients = clients
        self.state = SyncState()
        self.reason: Reason | None = None
        """What became of the last request :meth:`handle` was given."""
        self._plans: dict[bytes, nts.ResponsePlan] = {}
        self._ring_version = -1

    # The per-server header bytes only change when the state is replaced, so
    # they are packed here, not per packet. SyncState is frozen: replace it.
    @property
    def state(self) -> SyncState:
        """The server's clock as every response describes it; assign a new one to change it."""
        return self._state

    @state.setter
    def state(self, state: SyncState) -> None:
        self._state = state
        rd, rdisp = seconds_to_short(state.root_delay), seconds_to_short(state.root_dispersion)
        # (first byte, stratum, the bytes from precision to the reference time):
        # the header's parts that do not depend on the request (an NTPv4 one)
        first = first_byte(state.leap, 4, Mode.SERVER)
        pack = RESPONSE_MIDDLE.pack
        self._head = (first, state.stratum,
                      pack(state.precision, rd, rdisp, state.reference_id, state.reference_ts))
        self._head_rate = (first, 0, pack(state.precision, rd, rdisp, KISS_RATE,
                                          state.reference_ts))
        self._mid_nak = pack(state.precision, rd, rdisp, KISS_NTS_NAK, state.reference_ts)

    @property
    def random_bytes(self) -> Callable[[int], bytes]:
        """Where the nonces come from: ``random_bytes(n)`` is n random bytes."""
        return self._random_bytes

    @random_bytes.setter
    def random_bytes(self, random_bytes: Callable[[int], bytes]) -> None:
        self._random_bytes = random_bytes
        self._draw = random_bytes.take if isinstance(random_bytes, RandomPool) else random_bytes

    @property
    def clients(self) -> ClientLog | None:
        """The client log each request is counted in (None: ``noclientlog``)."""
        return self._clients

    @clients.setter
    def clients(self, clients: ClientLog | None) -> None:
        self._clients = clients
        # The fast path counts a hit itself: ClientLog.ntp inlined.
        self._client_index = clients.index if clients is not None else None
        self._client_hits = clients.hits if clients is not None else []

    @property
    def stats(self) -> ServerStats:
        """The counter row this responder adds to."""
        return self._stats

    @stats.setter
    def stats(self, stats: ServerStats) -> None:
        self._stats = stats
        self._view = stats.view
        self._base = stats.base
        # each reason's counters as indices into the view (inlined _record)
        self._rows = tuple(tuple(stats.base + i for i in row) for row in _COUNTS)

    def _record(self, reason: Reason) -> None:
        """Note the packet's fate and move its counters."""
        self.reason = reason
        view = self._view
        for index in self._rows[reason]:
            view[index] += 1

    def handle(
        self, data: bytes, address: str, rx_ns: int, tx_clock: Callable[[], int]
    ) -> bytes | None:
        """The answer to one datagram from ``address``, or None (counted) for no answer.

        ``rx_ns`` is the receive time (Unix ns); ``tx_clock()`` is read once,
        just before the response is built, for its transmit timestamp.
        """
        n = len(data)
        # The usual requests: NTPv4 client mode, either a bare header or the NTS
        # layout a client sends. Anything else is read by the general parser,
        # before any side effect.
        if not self.fastpath or n < HEADER_LEN or data[0] & VERSION_MODE_MASK != V4_CLIENT:
            return self._handle_general(data, address, rx_ns, tx_clock)
        layout = None
        if n > HEADER_LEN:
            layout = nts.scan_request(data)
            if layout is None:
                return self._handle_general(data, address, rx_ns, tx_clock)
        if self.access is not None and not self.access.allowed(address):
            self._record(Reason.DENIED)
            return None
        rate = False
        if self.ratelimit is not None:
            verdict = self.ratelimit.check(address, rx_ns)
            if verdict is Verdict.DROP:
                self._record(Reason.RATE_DROP)
                if self._clients is not None:
                    self._clients.ntp_drop(address, rx_ns)
                return None
            rate = verdict is Verdict.LEAK
        index = self._client_index
        if index is not None:
            try:
                slot = index[address]
            except KeyError:
                slot = self._new_client(address, rx_ns)
            self._client_hits[slot] += 1
        # first byte: leap, version 4 (request's), mode 4; poll echoed as is.
        first, stratum, mid = self._head_rate if rate else self._head
        rx = ((rx_ns << 32) // NS_PER_SECOND + _NTP_EPOCH) & _TS_MASK  # _ntp_ts, inlined
        view = self._view
        if layout is None:
            self.reason = reason = _RATE_KOD if rate else _ANSWERED
            for i in self._rows[reason]:  # _record, inlined
                view[i] += 1
            return _REPLY_PACK(first, stratum, data[_POLL], mid, data[_ORIGIN], rx,
                               ((tx_clock() << 32) // NS_PER_SECOND + _NTP_EPOCH) & _TS_MASK)
        # NTS: the cookie's plan answers, or the request gets a NAK.
        plan = self._plan(data[layout[0]:layout[1]])
        if plan is not None:
            count = plan.cookie_count(layout[2], layout[3] - HEADER_LEN, n)
            rand = self._draw(plan.random_len[count])
            header = _REPLY_PACK(first, stratum, data[_POLL], mid, data[_ORIGIN], rx,
                                 _ntp_ts(tx_clock()))
            reply = plan.answer(data, layout, header, count, rand)
            if reply is not None:
                self.reason = reason = _NTS_RATE_KOD if rate else _NTS_ANSWERED
                for i in self._rows[reason]:
                    view[i] += 1
                view[self._base + _NTS_COOKIES] += count
                return reply
        # RFC 8915 s5.7: a cookie we cannot use, or a request that does not
        # authenticate, gets a NAK so the client knows to redo NTS-KE.
        self._record(_RATE_NAK if rate else _NAK)
        header = _REPLY_PACK(first, 0, data[_POLL], self._mid_nak, data[_ORIGIN], rx,
                             _ntp_ts(tx_clock()))
        return nts.nak_packet(header, data[HEADER_LEN:layout[3]])

    def _new_client(self, address: str, rx_ns: int) -> int:
        clients = self._clients
        assert clients is not None
        return clients.insert(address, rx_ns)

    def _plan(self, cookie: bytes) -> nts.ResponsePlan | None:
        """How to answer the session ``cookie`` carries, or None when the key
        ring cannot open it (or the ring has no key to seal new cookies)."""
        ring = self.keyring
        if ring.version != self._ring_version:
            # new cookies go under the new current key: every plan changes
            self._plans.clear()
            self._ring_version = ring.version
        sealed = ring.unseal(cookie)
        if sealed is None:
            return None
        plan = self._plans.get(sealed)
        if plan is None:
            try:
                keys = ring.keys_in(sealed)
                sealer = ring.sealer(keys)
            except (AuthenticationFailure, LookupError):
                return None
            plan = nts.ResponsePlan(Aead(keys.aead_id, keys.c2s), Aead(keys.aead_id, keys.s2c),
                                    sealer)
            if len(self._plans) >= PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[sealed] = plan
        return plan

    def _handle_general(
        self, data: bytes, address: str, rx_ns: int, tx_clock: Callable[[], int]
    ) -> bytes | None:
        if len(data) < HEADER_LEN:
            self._record(Reason.MALFORMED)
            return None
        header = NtpHeader.unpack(data)
        if header.mode != Mode.CLIENT or not 1 <= header.version <= 4:
            self._record(Reason.MALFORMED)
            return None
        if self.access is not None and not self.access.allowed(address):
            self._record(Reason.DENIED)
            return None
        verdict = Verdict.PASS
        if self.ratelimit is not None:
            verdict = self.ratelimit.check(address, rx_ns)
            if verdict is Verdict.DROP:
                self._record(Reason.RATE_DROP)
                if self._clients is not None:
                    self._clients.ntp_drop(address, rx_ns)
                return None
        # Parse everything before counting, so each packet lands in exactly one
        # of received / malformed / denied / dropped.
        try:
            efs = list(iter_efs(data)) if header.version == 4 else []
            request = nts.parse_request(data, header, efs) if nts.is_nts_request(efs) else None
        except (MalformedPacket, AuthenticationFailure):
            self._record(Reason.MALFORMED)
            return None
        if self._clients is not None:
            self._clients.ntp(address, rx_ns)
        rate = verdict is Verdict.LEAK
        reply = self._reply_header(header, rx_ns)
        if rate:
            reply.stratum, reply.reference_id = 0, KISS_RATE
        if request is not None:
            return self._nts(data, request, reply, rate, tx_clock)
        self._record(Reason.RATE_KOD if rate else Reason.ANSWERED)
        reply.transmit_ts = unix_ns_to_ntp(tx_clock())
        return reply.pack()

    def _reply_header(self, request: NtpHeader, rx_ns: int) -> NtpHeader:
        s = self.state
        return NtpHeader(
            leap=s.leap,
            version=request.version,
            mode=Mode.SERVER,
            stratum=s.stratum,
            poll=request.poll,
            precision=s.precision,
            root_delay=seconds_to_short(s.root_delay),
            root_dispersion=seconds_to_short(s.root_dispersion),
            reference_id=s.reference_id,
            reference_ts=s.reference_ts,
            origin_ts=request.transmit_ts,
            receive_ts=unix_ns_to_ntp(rx_ns),
        )

    def _nts(
        self,
        data: bytes,
        request: nts.NtsRequest,
        reply: NtpHeader,
        rate: bool,
        tx_clock: Callable[[], int],
    ) -> bytes:
        plan = self._plan(request.cookie)
        plaintext = None
        if plan is not None:
            with contextlib.suppress(AuthenticationFailure):
                plaintext = nts.authenticate_request(data, request, plan.c2s)
        if plan is None or plaintext is None:
            # RFC 8915 s5.7: a cookie we cannot use, or a request that does not
            # authenticate, gets a NAK so the client knows to redo NTS-KE.
            self._record(Reason.RATE_NAK if rate else Reason.NAK)
            reply.transmit_ts = unix_ns_to_ntp(tx_clock())
            return nts.build_nak(reply, request.unique_id)
        placeholders = request.placeholders
        if plaintext:
            placeholders += nts.count_encrypted_placeholders(plaintext, len(request.cookie))
        uid_field = encode_ef(nts.EfType.UNIQUE_IDENTIFIER, request.unique_id)
        count = plan.cookie_count(placeholders, len(uid_field), len(data))
        rand = self._draw(plan.random_len[count])
        self._record(Reason.NTS_RATE_KOD if rate else Reason.NTS_ANSWERED)
        self._view[self._base + _NTS_COOKIES] += count
        reply.transmit_ts = unix_ns_to_ntp(tx_clock())
        return plan.seal(reply.pack(), uid_field, count, rand, len(data))
