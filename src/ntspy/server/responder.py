"""The NTP responder: a request's bytes in, a response's bytes (or nothing) out.

Sans-I/O: the adapter hands in the datagram, the client address, the kernel
receive time, a function returning the time to put in the transmit
timestamp (called as late as possible, just before the response is sealed)
and a source of random bytes. Every packet that gets no answer is counted
under the reason it was dropped.
"""

from __future__ import annotations

import os
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import AuthenticationFailure, MalformedPacket
from ..proto import nts
from ..proto.aead import ACCELERATED, AEADS, Aead, info
from ..proto.cookies import COOKIE_NONCE_LEN, MASTER_KEY_ALGORITHM, KeyRing, cookie_length
from ..proto.ntp import (
    EF_HEADER_LEN,
    HEADER_LEN,
    KISS_NTS_NAK,
    KISS_RATE,
    NS_PER_SECOND,
    NTP_UNIX_OFFSET,
    Mode,
    NtpHeader,
    SyncState,
    iter_efs,
    seconds_to_short,
    unix_ns_to_ntp,
)
from .access import AccessTable
from .clientlog import ClientLog
from .ratelimit import RateLimiter, Verdict
from .stats import ServerStats, counter_index

if ACCELERATED:  # the response body in one compiled call (see _nts_fast)
    from .._accel import nts_reply as _nts_reply
else:
    _nts_reply = None  # type: ignore[assignment]

AEAD_CACHE_SIZE = 4096

# --- fast path constants ------------------------------------------------------
# A response header is the request's poll and transmit time between bytes that
# depend only on the server state: first byte, stratum, poll, the 21 bytes from
# precision to reference time (_MID), origin, receive, transmit.
_MID = struct.Struct("!bII4sQ")
_REPLY = struct.Struct("!BBB21s8sQQ")
_EF = struct.Struct("!HH")
_AUTH = _EF  # nonce length, ciphertext length at the start of the authenticator body
_AUTH_HEAD = struct.Struct("!HHHH")  # authenticator EF type, length; nonce, ciphertext lengths
_KEY_ID = struct.Struct("!I")
_REPLY_HEAD = struct.Struct("!BBB21s8sQ")  # _REPLY up to the transmit timestamp
_TX = struct.Struct("!Q")
_COOKIE_PLAIN = struct.Struct("!HH")
_V4_CLIENT = 4 << 3 | Mode.CLIENT  # version and mode bits of an NTPv4 client request
# KeyRing cookie layout: key id (4) | nonce (16) | ciphertext (>= 4 + 16 tag).
_COOKIE_HEAD = 4 + COOKIE_NONCE_LEN
_COOKIE_MIN = _COOKIE_HEAD + 4 + 16
_UID, _COOKIE = nts.EfType.UNIQUE_IDENTIFIER, nts.EfType.NTS_COOKIE
_PLACEHOLDER, _AUTHENTICATOR = nts.EfType.NTS_COOKIE_PLACEHOLDER, nts.EfType.NTS_AUTHENTICATOR
_MIN_UID_EF = EF_HEADER_LEN + nts.MIN_UNIQUE_ID_LEN
# Shorter authenticators (20 or 24 bytes would even pass for a legacy MAC) are
# left to the general parser.
_MIN_AUTH_EF = 28
_TAG_LEN = 16  # every AEAD we serve (AES-SIV-CMAC, AES-GCM-SIV) has a 16-byte tag
_RECEIVED = counter_index("ntp_received")
_DENIED = counter_index("ntp_denied")
_DROPPED = counter_index("ntp_dropped")
_RATE_KOD = counter_index("ntp_rate_kod")
_AUTHENTICATED = counter_index("nts_authenticated")
_NAKS = counter_index("nts_naks")
_AUTH_FAILURES = counter_index("nts_auth_failures")
_DAEMON_TX = counter_index("daemon_tx")
_NTS_COOKIES = counter_index("nts_cookies")

# Offsets of one NTS request in the usual layout: end of the unique id EF,
# cookie body start and end, placeholder count, authenticator EF start, nonce
# end, ciphertext start and end.
_Layout = tuple[int, int, int, int, int, int, int, int]


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def _ef_len(body_len: int) -> int:
    # what encode_ef makes of a body this long
    return max(16, _pad4(EF_HEADER_LEN + body_len))


def _parse_nts(data: bytes, n: int) -> _Layout | None:
    """Offsets of an NTPv4 request laid out as header, unique id, cookie,
    placeholders the size of the cookie, authenticator ending the packet.

    None for any other layout, also a broken one: the general parser decides
    what that is. Every request this accepts parses the same way there.
    """
    unpack = _EF.unpack_from
    if n < HEADER_LEN + _MIN_UID_EF + 16 + _MIN_AUTH_EF:
        return None
    ef_type, length = unpack(data, HEADER_LEN)
    if ef_type != _UID or length < _MIN_UID_EF or length & 3:
        return None
    uid_end = pos = HEADER_LEN + length
    if pos + 4 > n:
        return None
    ef_type, length = unpack(data, pos)
    if ef_type != _COOKIE or length < 16 or length & 3:
        return None
    cookie_len = length
    pos += length
    cookie_end = pos
    placeholders = 0
    while True:
        if pos + 4 > n:
            return None
        ef_type, length = unpack(data, pos)
        if ef_type != _PLACEHOLDER or length != cookie_len:
            break
        placeholders += 1
        pos += length
    if ef_type != _AUTHENTICATOR or pos + length != n or length < _MIN_AUTH_EF or length & 3:
        return None
    nonce_len, ct_len = unpack(data, pos + 4)
    nonce_end = pos + 8 + nonce_len
    ct_start = pos + 8 + _pad4(nonce_len)
    if nonce_len == 0 or ct_len != _TAG_LEN or ct_start + _pad4(ct_len) > n:
        # An encrypted part that holds more than the tag carries fields (maybe
        # Cookie Placeholders, which count): the general path reads them.
        return None
    return (uid_end, uid_end + 4, cookie_end, placeholders, pos, nonce_end, ct_start,
            ct_start + ct_len)


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
        pos = self._pos
        end = pos + n
        if end > len(self._buf):
            if n > self.block:
                return self.source(n)
            self._buf, pos, end = self.source(self.block), 0, n
        self._pos = end
        return self._buf[pos:end]


class AeadCache:
    """Aead objects per session key: a client's keys repeat in all its requests.

    A plain dict, emptied when it fills up: cheaper on a hit than an LRU, and a
    client whose entry was dropped costs one key schedule on its next request.
    """

    def __init__(self, size: int = AEAD_CACHE_SIZE) -> None:
        self.size = size
        self._items: dict[tuple[int, bytes], Aead] = {}

    def get(self, aead_id: int, key: bytes) -> Aead:
        k = (aead_id, key)
        aead = self._items.get(k)
        if aead is None:
            if len(self._items) >= self.size:
                self._items.clear()
            aead = Aead(aead_id, key)
            self._items[k] = aead
        return aead


@dataclass(slots=True)
class _Session:
    """What the fast path needs per cookie plaintext (AEAD id | 0 | C2S | S2C)."""

    c2s: Aead
    s2c: Aead
    nonce_len: int
    cookie_len: int  # of the cookies we issue for this AEAD
    sealable: bytes  # the plaintext of a new cookie carrying the same keys
    cookie_head: bytes  # cookie EF header and our current key id
    cookie_pad: bytes  # zeros ending the cookie EF
    nonce_pad: bytes  # zeros after the nonce in the authenticator
    auth_extra: bytes  # zeros that make nonce + padding at least 16 bytes
    auth_fixed: int  # authenticator EF length without the ciphertext
    # what ntspy._accel.nts_reply needs of this session (None: no accelerator)
    packed: tuple[object, ...] | None = None


def _ntp_ts(unix_ns: int) -> int:
    # unix_ns_to_ntp, inlined where it runs twice per packet.
    seconds, nanos = divmod(unix_ns, NS_PER_SECOND)
    return (((seconds + NTP_UNIX_OFFSET) & 0xFFFFFFFF) << 32) | ((nanos << 32) // NS_PER_SECOND)


class Responder:
    """Answers NTP and NTS requests (see the module docstring).

    ``fastpath=False`` runs every packet through the general parser; the fast
    path exists only for speed and answers byte for byte the same (tested).
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
        self._aeads = AeadCache()
        self._sessions: dict[bytes, _Session] = {}
        self._counts: dict[tuple[int, int, int, int, int], int] = {}
        self._ring_version = -1
        self._masters: dict[int, Aead] = {}
        self._seal_key_id = 0
        self._seal_prefix = b""

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
        self._first = state.leap << 6 | Mode.SERVER
        self._stratum = state.stratum
        self._mid = _MID.pack(state.precision, rd, rdisp, state.reference_id, state.reference_ts)
        self._mid_rate = _MID.pack(state.precision, rd, rdisp, KISS_RATE, state.reference_ts)
        self._mid_nak = _MID.pack(state.precision, rd, rdisp, KISS_NTS_NAK, state.reference_ts)

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

    def handle(
        self, data: bytes, address: str, rx_ns: int, tx_clock: Callable[[], int]
    ) -> bytes | None:
        """The answer to one datagram from ``address``, or None (counted) for no answer.

        ``rx_ns`` is the receive time (Unix ns); ``tx_clock()`` is read once,
        just before the response is sealed, for its transmit timestamp.
        """
        n = len(data)
        # The usual requests: NTPv4 client mode, either a bare header or the NTS
        # layout a client sends (unique id, cookie, placeholders, authenticator).
        # Anything else goes to the general path before any side effect.
        if not self.fastpath or n < HEADER_LEN or data[0] & 0x3F != _V4_CLIENT:
            return self._handle_general(data, address, rx_ns, tx_clock)
        parsed = None
        if n > HEADER_LEN:
            parsed = _parse_nts(data, n)
            if parsed is None:
                return self._handle_general(data, address, rx_ns, tx_clock)
        view, base = self._view, self._base
        if self.access is not None and not self.access.allowed(address):
            view[base + _DENIED] += 1
            return None
        rate = False
        if self.ratelimit is not None:
            verdict = self.ratelimit.check(address, rx_ns)
            if verdict is Verdict.DROP:
                view[base + _DROPPED] += 1
                if self._clients is not None:
                    self._clients.ntp_drop(address, rx_ns)
                return None
            if verdict is Verdict.LEAK:
                rate = True
                view[base + _RATE_KOD] += 1
        view[base + _RECEIVED] += 1
        index = self._client_index
        if index is not None:
            try:
                slot = index[address]
            except KeyError:
                slot = self._new_client(address, rx_ns)
            self._client_hits[slot] += 1
        # first byte: leap, version 4 (request's), mode 4; poll echoed as is.
        first = self._first | 0x20
        if rate:
            stratum, mid = 0, self._mid_rate
        else:
            stratum, mid = self._stratum, self._mid
        if parsed is None:
            view[base + _DAEMON_TX] += 1
            return _REPLY.pack(
                first, stratum, data[2], mid, data[40:48], _ntp_ts(rx_ns), _ntp_ts(tx_clock())
            )
        return self._nts_fast(data, parsed, first, stratum, mid, rx_ns, tx_clock)

    def _new_client(self, address: str, rx_ns: int) -> int:
        clients = self._clients
        assert clients is not None
        return clients.insert(address, rx_ns)

    def _masters_now(self) -> dict[int, Aead]:
        """The ring's master keys as AEADs (a fleet's pending key too: it opens
        cookies before it seals any), rebuilt whenever the ring changes."""
        ring = self.keyring
        if ring.version != self._ring_version:
            current = ring.current
            self._masters = {k.key_id: Aead(MASTER_KEY_ALGORITHM, k.key) for k in ring.accepted}
            self._seal_key_id = current.key_id
            self._seal_prefix = _KEY_ID.pack(current.key_id)
            self._sessions.clear()
            self._ring_version = ring.version
        return self._masters

    def _session(self, cookie: bytes) -> _Session | None:
        """The keys in a cookie, or None when it does not verify (KeyRing.open's checks)."""
        if len(cookie) < _COOKIE_MIN:
            return None
        try:
            masters = self._masters_now()
        except LookupError:
            return None
        master = masters.get(_KEY_ID.unpack_from(cookie, 0)[0])
        if master is None:
            return None
        try:
            plain = master.open(cookie[4:_COOKIE_HEAD], cookie[_COOKIE_HEAD:], cookie[:4])
        except AuthenticationFailure:
            return None
        session = self._sessions.get(plain)
        if session is None:
            aead_id = _COOKIE_PLAIN.unpack_from(plain, 0)[0] if len(plain) >= 4 else -1
            meta = AEADS.get(aead_id)
            if meta is None or len(plain) != 4 + 2 * meta.key_length:
                return None
            key_len = meta.key_length
            nonce_len = meta.nonce_length
            new_len = cookie_length(aead_id)
            padded = _pad4(nonce_len)
            extra = max(0, nts.MIN_PADDED_NONCE_LEN - padded)
            if len(self._sessions) >= AEAD_CACHE_SIZE:
                self._sessions.clear()
            session = _Session(
                self._aeads.get(aead_id, plain[4:4 + key_len]),
                self._aeads.get(aead_id, plain[4 + key_len:]),
                nonce_len,
                new_len,
                _COOKIE_PLAIN.pack(aead_id, 0) + plain[4:],
                _EF.pack(_COOKIE, _ef_len(new_len)) + self._seal_prefix,
                bytes(_ef_len(new_len) - EF_HEADER_LEN - new_len),
                bytes(padded - nonce_len),
                bytes(extra),
                EF_HEADER_LEN + 4 + padded + extra,
            )
            natives = (session.c2s.native, session.s2c.native,
                       self._masters[self._seal_key_id].native)
            if _nts_reply is not None and None not in natives:
                # the master key too: a ring change empties this cache
                session.packed = (*natives, nonce_len, session.sealable, session.cookie_head,
                                  session.cookie_pad, session.nonce_pad, session.auth_fixed,
                                  session.auth_extra)
            self._sessions[plain] = session
        return session

    def _nts_fast(
        self,
        data: bytes,
        parsed: _Layout,
        first: int,
        stratum: int,
        mid: bytes,
        rx_ns: int,
        tx_clock: Callable[[], int],
    ) -> bytes:
        uid_end, cookie_start, cookie_end, placeholders, auth_at, nonce_end, ct_start, ct_end = (
            parsed
        )
        view, base = self._view, self._base
        session = self._session(data[cookie_start:cookie_end])
        origin = data[40:48]
        rx = _ntp_ts(rx_ns)
        if session is not None:
            count = self._cookie_count(placeholders, uid_end, session, len(data))
            nonce_len = session.nonce_len
            rand = self.random_bytes
            packed = session.packed
            reply: bytes | None = None
            if packed is not None:
                # The bytes the code below makes, in one compiled call that also
                # verifies the request; None when it does not verify.
                header = _REPLY.pack(first, stratum, data[2], mid, origin, rx, _ntp_ts(tx_clock()))
                reply = _nts_reply(data, header, parsed, packed, count,
                                   rand(COOKIE_NONCE_LEN * count + nonce_len))
            else:
                try:
                    session.c2s.open(
                        data[auth_at + 8:nonce_end], data[ct_start:ct_end], data[:auth_at]
                    )
                except AuthenticationFailure:
                    pass
                else:
                    reply = self._seal_reply(
                        session, count, rand,
                        _REPLY_HEAD.pack(first, stratum, data[2], mid, origin, rx),
                        data[HEADER_LEN:uid_end], tx_clock,
                    )
            if reply is not None:
                view[base + _AUTHENTICATED] += 1
                view[base + _DAEMON_TX] += 1
                view[base + _NTS_COOKIES] += count
                return reply
        # RFC 8915 s5.7: a cookie we cannot use, or a request that does not
        # authenticate, gets a NAK so the client knows to redo NTS-KE.
        view[base + _AUTH_FAILURES] += 1
        view[base + _NAKS] += 1
        return (
            _REPLY.pack(first, 0, data[2], self._mid_nak, origin, rx, _ntp_ts(tx_clock()))
            + data[HEADER_LEN:uid_end]
        )

    def _cookie_count(self, placeholders: int, uid_end: int, session: _Session, n: int) -> int:
        """How many new cookies fit in a response no longer than the request."""
        uid_len = uid_end - HEADER_LEN - EF_HEADER_LEN
        key = (placeholders, uid_len, session.cookie_len, session.nonce_len, n)
        count = self._counts.get(key)
        if count is None:
            count = min(1 + placeholders, nts.MAX_COOKIES_PER_RESPONSE)
            while count > 0 and nts.response_length(
                uid_len, count, session.cookie_len, session.nonce_len
            ) > n:
                count -= 1
            if len(self._counts) >= AEAD_CACHE_SIZE:
                self._counts.clear()
            self._counts[key] = count
        return count

    def _seal_reply(
        self,
        session: _Session,
        count: int,
        rand: Callable[[int], bytes],
        head: bytes,
        unique_id: bytes,
        tx_clock: Callable[[], int],
    ) -> bytes:
        """The response to a verified request: ``head`` (the header up to the
        transmit time, read just before sealing), the ``unique_id`` field, and
        an authenticator sealing ``count`` new cookies."""
        seal_cookie = self._masters[self._seal_key_id].seal
        prefix = self._seal_prefix
        sealable = session.sealable
        cookie_head, cookie_pad = session.cookie_head, session.cookie_pad
        parts: list[bytes] = []
        for _ in range(count):
            cnonce = rand(COOKIE_NONCE_LEN)
            parts.append(cookie_head + cnonce + seal_cookie(cnonce, sealable, prefix) + cookie_pad)
        nonce_len = session.nonce_len
        nonce = rand(nonce_len)
        packet = head + _TX.pack(_ntp_ts(tx_clock())) + unique_id
        ct = session.s2c.seal(nonce, b"".join(parts), packet)
        ct_len = len(ct)
        ct_pad = -ct_len & 3
        # nts.encode_authenticator, with the per-AEAD parts worked out once per session
        return (
            packet
            + _AUTH_HEAD.pack(_AUTHENTICATOR, session.auth_fixed + ct_len + ct_pad, nonce_len,
                              ct_len)
            + nonce + session.nonce_pad + ct + bytes(ct_pad) + session.auth_extra
        )

    def _handle_general(
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
                if self._clients is not None:
                    self._clients.ntp_drop(address, rx_ns)
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
        if self._clients is not None:
            self._clients.ntp(address, rx_ns)
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
            plaintext = nts.authenticate_request(data, request, c2s)
        except (AuthenticationFailure, MalformedPacket, LookupError):
            # RFC 8915 s5.7: a cookie we cannot use, or a request that does not
            # authenticate, gets a NAK so the client knows to redo NTS-KE.
            stats.add("nts_auth_failures")
            stats.add("nts_naks")
            reply.transmit_ts = unix_ns_to_ntp(tx_clock())
            return nts.build_nak(reply, request.unique_id)
        if plaintext:
            request.placeholders += nts.count_encrypted_placeholders(plaintext,
                                                                     len(request.cookie))
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
        stats.add("nts_cookies", count)
        reply.transmit_ts = unix_ns_to_ntp(tx_clock())
        return nts.build_response(reply, request.unique_id, cookies, s2c, nonce)
