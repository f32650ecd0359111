"""The NTP responder: a request's bytes in, a response's bytes (or nothing) out.

Sans-I/O: the adapter hands in the datagram, the client address, the kernel
receive time, a function returning the time to put in the transmit
timestamp (called as late as possible, just before the response is sealed)
and a source of random bytes. Every packet that gets no answer is counted
under the reason it was dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import AuthenticationFailure, MalformedPacket
from ..proto import nts
from ..proto.aead import Aead, info
from ..proto.cookies import COOKIE_NONCE_LEN, KeyRing, cookie_length
from ..proto.ntp import (
    HEADER_LEN,
    KISS_RATE,
    Leap,
    Mode,
    NtpHeader,
    iter_efs,
    seconds_to_short,
    unix_ns_to_ntp,
)
from .access import AccessTable
from .ratelimit import RateLimiter, Verdict
from .stats import ServerStats

# chrony's reference id for its local reference: 127.127.1.1
LOCAL_REFID = bytes([127, 127, 1, 1])
AEAD_CACHE_SIZE = 4096


@dataclass(slots=True)
class SyncState:
    """What the server says about its own clock in every response."""

    leap: int = Leap.UNSYNCHRONIZED
    stratum: int = 16
    precision: int = -20
    root_delay: float = 0.0
    root_dispersion: float = 0.0
    reference_id: bytes = b"\x00\x00\x00\x00"
    reference_ts: int = 0  # NTP timestamp of the last update

    @classmethod
    def local(cls, stratum: int, reference_ts: int) -> SyncState:
        """``local stratum N``: the server is its own reference, like chronyd."""
        return cls(Leap.NONE, stratum, -20, 0.0, 0.0, LOCAL_REFID, reference_ts)


class AeadCache:
    """Aead objects per session key: a client's keys repeat in all its requests."""

    def __init__(self, size: int = AEAD_CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[tuple[int, bytes], Aead] = OrderedDict()

    def get(self, aead_id: int, key: bytes) -> Aead:
        k = (aead_id, key)
        aead = self._items.get(k)
        if aead is None:
            aead = Aead(aead_id, key)
            self._items[k] = aead
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        return aead


class Responder:
    def __init__(
        self,
        keyring: KeyRing,
        stats: ServerStats,
        random_bytes: Callable[[int], bytes],
        *,
        access: AccessTable | None = None,
        ratelimit: RateLimiter | None = None,
    ) -> None:
        self.keyring = keyring
        self.stats = stats
        self.random_bytes = random_bytes
        self.access = access
        self.ratelimit = ratelimit
        self.state = SyncState()
        self._aeads = AeadCache()

    def handle(
        self, data: bytes, address: str, rx_ns: int, tx_clock: Callable[[], int]
    ) -> bytes | None:
        stats = self.stats
        if len(data) < HEADER_LEN:
            stats.add("ntp_malformed")
            return None
        header = NtpHeader.unpack(data)
        if header.mode != Mode.CLIENT or not 1 <= header.version <= 4:
            stats.add("ntp_malformed")
            return None
        if self.access is not None and not self.access.allowed(address):
            stats.add("ntp_denied")
            return None
        verdict = Verdict.PASS
        if self.ratelimit is not None:
            verdict = self.ratelimit.check(address, rx_ns)
            if verdict is Verdict.DROP:
                stats.add("ntp_dropped")
                return None
        # Parse everything before counting, so each packet lands in exactly one
        # of received / malformed / denied / dropped.
        try:
            efs = list(iter_efs(data)) if header.version == 4 else []
            request = nts.parse_request(data, header, efs) if nts.is_nts_request(efs) else None
        except (MalformedPacket, AuthenticationFailure):
            stats.add("ntp_malformed")
            return None
        stats.add("ntp_received")
        reply = self._reply_header(header, rx_ns)
        if verdict is Verdict.LEAK:
            reply.stratum, reply.reference_id = 0, KISS_RATE
            stats.add("ntp_rate_kod")
        if request is not None:
            return self._nts(data, request, reply, tx_clock)
        reply.transmit_ts = unix_ns_to_ntp(tx_clock())
        stats.add("daemon_tx")
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
        tx_clock: Callable[[], int],
    ) -> bytes | None:
        stats = self.stats
        try:
            keys = self.keyring.open(request.cookie)
            c2s = self._aeads.get(keys.aead_id, keys.c2s)
            nts.authenticate_request(data, request, c2s)
        except (AuthenticationFailure, MalformedPacket, LookupError):
            # RFC 8915 s5.7: a cookie we cannot use, or a request that does not
            # authenticate, gets a NAK so the client knows to redo NTS-KE.
            stats.add("nts_auth_failures")
            stats.add("nts_naks")
            reply.transmit_ts = unix_ns_to_ntp(tx_clock())
            return nts.build_nak(reply, request.unique_id)
        s2c = self._aeads.get(keys.aead_id, keys.s2c)
        nonce_len = info(keys.aead_id).nonce_length
        count = nts.response_cookie_count(
            request, len(data), cookie_length(keys.aead_id), nonce_len
        )
        rand = self.random_bytes
        cookies = [self.keyring.seal(keys, rand(COOKIE_NONCE_LEN)) for _ in range(count)]
        nonce = rand(nonce_len)
        stats.add("nts_authenticated")
        stats.add("daemon_tx")
        reply.transmit_ts = unix_ns_to_ntp(tx_clock())
        return nts.build_response(reply, request.unique_id, cookies, s2c, nonce)
