"""A fleet of NTS servers sharing one rotating master-key ring through Redis.

``ntskeystore redis://host:port/db`` (or ``rediss://``, ``unix:///path``) makes
every ``ntspy serve`` that names the same store use the same ring, so a cookie
issued by any NTS-KE host opens on every NTP host, through rotations, restarts
and the loss of any one of them.

What is where:

- Redis holds one document (``PREFIX:ring``): the ring's keys, newest first,
  and at most one *pending* key, each wrapped (AES-SIV) with a key-encryption
  key read from a local file (``ntskeystorekey``), so Redis alone never gives
  the cookie keys.  ``PREFIX:members`` has one entry per live server: the ring
  serial it has loaded and when it last said so.  ``PREFIX:lease`` names the
  one server that may change the ring (SET NX with an expiry; renewed while it
  lives, taken over when it dies); its writes are fenced by the lease.
- Every server keeps the ring in memory and in ``ntsdumpdir`` (its workers
  load it from there), polls the document every ``poll`` seconds and keeps
  serving with what it has while Redis is away; Redis is never on the packet
  path.

Rotation, in two phases, by the lease holder only:

1. a new key is published *pending*: every server loads it at once as a key
   that opens cookies but seals none, and says so in ``members``;
2. once every live member has loaded it, the holder makes it current (and
   drops the oldest beyond ``kept``); a server that has not seen this yet
   keeps sealing under the previous key, which everyone still opens.

So no server can meet a cookie under a key it does not have.  A Redis that
comes back empty is given the ring back by the servers (``SET NX``), never a
fresh one that would NAK every client.  The decisions are the pure function
:func:`plan`; :class:`Fleet` does the I/O.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigError, NtsError
from ..proto.cookies import MASTER_KEY_LEN, KeyRing, MasterKey

log = logging.getLogger("ntspy.server.fleet")

DOC_FORMAT = 1
DEFAULT_POLL = 1.0  # seconds between looks at the store
MEMBER_TTL_POLLS = 5  # a member silent this many polls is taken for gone
LEASE_POLLS = 4  # the lease outlives this many missed renewals
_WRAP_AD = b"ntspy master key v1"
_ID = struct.Struct("!I")


class KeyStoreError(NtsError):
    """The key store cannot be used as configured (bad URL, key file, document)."""


# -- wrapping ----------------------------------------------------------------------


class Wrapper:
    """Master keys sealed with a key-encryption key for storage in Redis."""

    def __init__(self, kek: bytes) -> None:
        if len(kek) < 32:
            raise KeyStoreError("the key-encryption key must be at least 32 bytes")
        wrap_key = HKDF(hashes.SHA256(), 64, salt=None, info=b"ntspy keystore wrap").derive(kek)
        self._siv = AESSIV(wrap_key)

    @classmethod
    def from_file(cls, path: Path) -> Wrapper:
        """``ntskeystorekey FILE``: 32 or more bytes of secret (raw, hex or base64 text)."""
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise KeyStoreError(f"cannot read ntskeystorekey {path}: {exc.strerror}") from None
        st = path.stat()
        if st.st_mode & 0o077:
            raise KeyStoreError(f"ntskeystorekey {path} is readable by others (mode "
                                f"{st.st_mode & 0o777:04o}); chmod 600 {path}")
        text = raw.strip()
        for decode in (bytes.fromhex, base64.b64decode):
            try:
                decoded = decode(text.decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                continue
            if len(decoded) >= 32:
                return cls(decoded)
        return cls(raw)

    def wrap(self, key: MasterKey) -> str:
        sealed = self._siv.encrypt(key.key, [_WRAP_AD, _ID.pack(key.key_id)])
        return base64.b64encode(sealed).decode("ascii")

    def unwrap(self, key_id: int, created: int, wrapped: str) -> MasterKey:
        try:
            plain = self._siv.decrypt(base64.b64decode(wrapped), [_WRAP_AD, _ID.pack(key_id)])
        except Exception:  # InvalidTag, bad base64: the same to us
            raise KeyStoreError(f"master key {key_id:08x} in the store does not unwrap with "
                                "our ntskeystorekey (another fleet's, or tampered with)") from None
        return MasterKey(key_id, plain, created)


# -- the document ------------------------------------------------------------------


@dataclass(frozen=True)
class RingDoc:
    """The ring as the store holds it: ``serial`` grows with every change."""

    serial: int
    keys: tuple[MasterKey, ...]  # newest first; keys[0] seals
    pending: MasterKey | None = None

    def encode(self, wrapper: Wrapper) -> str:
        def entry(k: MasterKey) -> dict[str, Any]:
            return {"id": k.key_id, "created": k.created, "key": wrapper.wrap(k)}

        return json.dumps({
            "format": DOC_FORMAT, "serial": self.serial,
            "keys": [entry(k) for k in self.keys],
            "pending": entry(self.pending) if self.pending is not None else None,
        }, sort_keys=True)

    @classmethod
    def decode(cls, text: str | bytes, wrapper: Wrapper) -> RingDoc:
        try:
            doc = json.loads(text)
            if doc.get("format") != DOC_FORMAT:
                raise KeyStoreError(f"key ring document of format {doc.get('format')!r}")
            keys = tuple(wrapper.unwrap(int(e["id"]), int(e["created"]), str(e["key"]))
                         for e in doc["keys"])
            p = doc.get("pending")
            pending = (wrapper.unwrap(int(p["id"]), int(p["created"]), str(p["key"]))
                       if p else None)
            serial = int(doc["serial"])
        except KeyStoreError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyStoreError(f"key ring document unreadable: {exc!r}") from None
        if len({k.key_id for k in keys}) != len(keys) or (not keys and pending is None):
            raise KeyStoreError("key ring document holds no usable ring")
        return cls(serial, keys, pending)

    def ids(self) -> tuple[tuple[int, ...], int | None]:
        return (tuple(k.key_id for k in self.keys),
                self.pending.key_id if self.pending is not None else None)


# -- decisions ---------------------------------------------------------------------


@dataclass
class Plan:
    """What one look at the store leads to."""

    adopt: RingDoc | None = None
    """Load this ring (keys, and the pending key) locally."""
    publish: RingDoc | None = None
    """Write this document (fenced by our lease)."""
    restore: RingDoc | None = None
    """Write this document only if the store has none (SET NX)."""
    why: str = ""


def plan(now: int, local: RingDoc | None, remote: RingDoc | None, leader: bool,
         members_loaded: bool, rotate_interval: int, kept: int,
         new_key: Callable[[set[int]], MasterKey]) -> Plan:
    """The fleet's next step, without I/O.

    ``local``: the ring this server holds (None: none at all); ``remote``: the
    store's (None: the store has none); ``leader``: we hold the lease;
    ``members_loaded``: every live member has loaded ``remote`` (its serial);
    ``new_key(taken_ids)``: a fresh master key created ``now``.
    """
    if remote is None:
        if local is not None:
            # A store that lost its data gets our ring back, not a new one.
            return Plan(restore=local, why="the store had no ring: giving it ours")
        if leader:
            first = RingDoc(1, (new_key(set()),))
            return Plan(adopt=first, restore=first, why="first key of the fleet")
        return Plan(why="waiting for the first key")
    result = Plan()
    if local is None or local.serial != remote.serial or local.ids() != remote.ids():
        result.adopt = remote
    if not leader:
        return result
    taken = {k.key_id for k in remote.keys}
    if remote.pending is not None:
        if members_loaded:
            # Phase 2: every server opens cookies under it: it may seal now.
            promoted = MasterKey(remote.pending.key_id, remote.pending.key, now)
            result.publish = RingDoc(remote.serial + 1, (promoted, *remote.keys)[:kept])
            result.why = f"master key {promoted.key_id:08x} now current"
        return result
    current = remote.keys[0] if remote.keys else None
    if current is None or (rotate_interval > 0 and now - current.created >= rotate_interval):
        # Phase 1: everybody loads it before anybody seals under it.
        fresh = new_key(taken)
        result.publish = RingDoc(remote.serial + 1, remote.keys, fresh)
        result.why = f"new master key {fresh.key_id:08x} published, pending"
    return result


# -- the store ---------------------------------------------------------------------


@dataclass
class StoreConfig:
    url: str
    key_file: Path
    password_file: Path | None = None
    ca_file: Path | None = None
    prefix: str = "ntspy"
    poll: float = DEFAULT_POLL

    @classmethod
    def from_config(cls, config: Any) -> StoreConfig | None:
        """The ``ntskeystore`` of a :class:`~ntspy.config.Config`, or None (no fleet)."""
        if config.ntskeystore is None:
            return None
        if config.ntskeystorekey is None:
            raise ConfigError("ntskeystore needs ntskeystorekey FILE: the key that wraps the "
                              "master keys held in the store")
        opts = config.ntskeystore_options
        return cls(
            config.ntskeystore, Path(config.ntskeystorekey),
            password_file=Path(opts["passwordfile"]) if "passwordfile" in opts else None,
            ca_file=Path(opts["cafile"]) if "cafile" in opts else None,
            poll=float(opts.get("poll", DEFAULT_POLL)),
        )

    def redis_kwargs(self) -> dict[str, Any]:
        parts = urlsplit(self.url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"ntskeystore: unsupported URL scheme {parts.scheme!r} "
                              "(redis://, rediss:// or unix://)")
        kwargs: dict[str, Any] = {"socket_timeout": max(0.2, self.poll),
                                  "socket_connect_timeout": max(0.2, self.poll)}
        if self.password_file is not None:
            try:
                kwargs["password"] = self.password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"ntskeystore: cannot read password file "
                                  f"{self.password_file}: {exc.strerror}") from None
        if parts.scheme == "rediss":
            kwargs["ssl_cert_reqs"] = "required"
            kwargs["ssl_check_hostname"] = True
            if self.ca_file is not None:
                kwargs["ssl_ca_certs"] = str(self.ca_file)
        prefix = parse_qs(parts.query).get("prefix")
        if prefix:
            self.prefix = prefix[0]
        return kwargs

    def redis_url(self) -> str:
        """The URL for the Redis client: ours without the ``prefix`` query (ntspy's)."""
        base, _, query = self.url.partition("?")
        kept = "&".join(q for q in query.split("&") if q and not q.startswith("prefix="))
        return f"{base}?{kept}" if kept else base


@dataclass
class FleetStatus:
    """For logs, ``serverkeys`` and metrics."""

    connected: bool = False
    leader: bool = False
    serial: int = 0
    last_ok: float = 0.0
    errors: int = 0
    members: int = 0
    history: list[str] = field(default_factory=list)


class Fleet:
    """Keeps ``ring`` (the server's own, shared with its responders) in step with the
    store; ``on_change()`` is called after every local change (save it, tell workers)."""

    def __init__(self, store: StoreConfig, ring: KeyRing, rotate_interval: int,
                 on_change: Callable[[], object], *, clock: Callable[[], float] = time.time,
                 random_bytes: Callable[[int], bytes] = os.urandom, settle: float = 0.0) -> None:
        """``settle``: seconds a loaded ring takes to reach every process that serves
        (worker processes reload the key file): only then is it reported as held."""
        import redis.asyncio as aioredis

        self.store = store
        self.ring = ring
        self.rotate_interval = rotate_interval
        self.on_change = on_change
        self.clock = clock
        self.random_bytes = random_bytes
        self.wrapper = Wrapper.from_file(store.key_file)
        self.redis = aioredis.Redis.from_url(store.redis_url(), **store.redis_kwargs())
        self.member_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.status = FleetStatus()
        self.settle = settle
        self._loaded: list[tuple[float, int]] = []  # (monotonic time, serial) adopted
        self._held = 0
        self.local: RingDoc | None = None
        if ring.keys or ring.pending:
            self.local = RingDoc(0, tuple(ring.keys), ring.pending[0] if ring.pending else None)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._down_reported = False
        self._bad_doc = ""
        p = store.prefix
        self._k_ring, self._k_lease, self._k_members = f"{p}:ring", f"{p}:lease", f"{p}:members"
        self._fenced_set = self.redis.register_script(
            "if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('set', KEYS[2], ARGV[2]) else return false end")
        self._renew = self.redis.register_script(
            "if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")

    # -- running -----------------------------------------------------------------

    async def start(self, first_look_timeout: float = 3.0) -> None:
        """One look at the store before serving (a restarted host learns the keys
        it missed), then the loop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(first_look_timeout):
                await self.step()
        self._task = asyncio.create_task(self._loop(), name="ntskeystore")

    async def stop(self) -> None:
        self._stopping = True
        task = self._task
        while task is not None and not task.done():
            # Python 3.11's wait_for (inside the Redis client) can swallow a
            # cancellation that meets a finishing read: ask until the task ends.
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        with contextlib.suppress(Exception):
            await self.redis.hdel(self._k_members, self.member_id)
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def _loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.store.poll)
            if self._stopping:
                return
            try:
                await self.step()
            except Exception:  # the loop must not die: report, go on
                self.status.errors += 1
                log.exception("ntskeystore: unexpected error (retrying)")

    async def step(self) -> None:
        """Look at the store once and act (with Redis away: keep what we have)."""
        try:
            await self._step()
        except KeyStoreError as exc:  # a document we cannot use: keep ours, say so once
            self.status.errors += 1
            if str(exc) != self._bad_doc:
                log.error("ntskeystore: %s; keeping the %d keys held", exc,
                          len(self.ring.accepted))
            self._bad_doc = str(exc)
            return
        except (OSError, TimeoutError) as exc:
            self._down(exc)
        except Exception as exc:
            if type(exc).__module__.startswith("redis"):
                self._down(exc)
            else:
                raise
        else:
            if self._down_reported:
                log.warning("ntskeystore %s reachable again (ring serial %d)",
                            _safe_url(self.store.url), self.status.serial)
            self._down_reported = False
            self.status.connected = True
            self.status.last_ok = self.clock()

    def _down(self, exc: BaseException) -> None:
        self.status.connected = False
        self.status.leader = False
        self.status.errors += 1
        if not self._down_reported:
            log.error("ntskeystore %s unreachable (%s): serving with the %d keys held, "
                      "no rotation until it is back", _safe_url(self.store.url),
                      type(exc).__name__, len(self.ring.accepted))
            self._down_reported = True

    async def _step(self) -> None:
        r = self.redis
        poll_ms = int(self.store.poll * 1000)
        now = int(self.clock())
        leader = await self._lease(poll_ms)
        raw = await r.get(self._k_ring)
        remote = RingDoc.decode(raw, self.wrapper) if raw is not None else None
        loaded = await self._members_loaded(remote, now) if leader and remote else False
        step = plan(now, self.local, remote, leader, loaded, self.rotate_interval,
                    self.ring.kept, self._new_key)
        if step.restore is not None:
            restored = RingDoc(max(step.restore.serial, 1), step.restore.keys,
                               step.restore.pending)
            if await r.set(self._k_ring, restored.encode(self.wrapper), nx=True):
                log.warning("ntskeystore: %s", step.why)
                self._adopt(restored)
        else:
            if step.adopt is not None:
                self._adopt(step.adopt)
            if step.publish is not None:
                written = await self._fenced_set(
                    keys=[self._k_lease, self._k_ring],
                    args=[self.member_id, step.publish.encode(self.wrapper)])
                if written:
                    log.info("ntskeystore: %s (serial %d)", step.why, step.publish.serial)
                    self._adopt(step.publish)
        # What we hold now: the lease holder makes a pending key current only once
        # every live member has said it holds it.
        await r.hset(self._k_members, self.member_id,
                     json.dumps({"serial": self._held_serial(), "seen": now}))

    async def _lease(self, poll_ms: int) -> bool:
        ttl = LEASE_POLLS * poll_ms
        r = self.redis
        if await self._renew(keys=[self._k_lease], args=[self.member_id, ttl]):
            held = True
        else:
            held = bool(await r.set(self._k_lease, self.member_id, nx=True, px=ttl))
            if held:
                log.info("ntskeystore: this server now rotates the fleet's keys")
        self.status.leader = held
        return held

    async def _members_loaded(self, remote: RingDoc, now: int) -> bool:
        """Whether every live member has loaded ``remote``; the long silent are dropped."""
        entries = await self.redis.hgetall(self._k_members)
        ttl = MEMBER_TTL_POLLS * max(1.0, self.store.poll)
        live = 0
        ok = True
        for member, value in entries.items():
            try:
                info = json.loads(value)
                seen, serial = float(info["seen"]), int(info["serial"])
            except (ValueError, KeyError, TypeError):
                await self.redis.hdel(self._k_members, member)
                continue
            if now - seen > ttl:
                await self.redis.hdel(self._k_members, member)
                continue
            live += 1
            ok = ok and serial >= remote.serial
        self.status.members = live
        return ok

    def _held_serial(self) -> int:
        """The newest serial every serving process of ours has had ``settle`` s to load."""
        mono = time.monotonic()
        while self._loaded and mono - self._loaded[0][0] >= self.settle:
            self._held = max(self._held, self._loaded.pop(0)[1])
        return self._held

    def _adopt(self, doc: RingDoc) -> None:
        before = self.local.ids() if self.local else None
        self.ring.replace(doc.keys, [doc.pending] if doc.pending is not None else [])
        self.local = doc
        self._loaded.append((time.monotonic(), doc.serial))
        self.status.serial = doc.serial
        if before != doc.ids():
            self.status.history.append(f"serial {doc.serial}")
            del self.status.history[:-20]
            self.on_change()

    def _new_key(self, taken: set[int]) -> MasterKey:
        while True:
            key_id = int.from_bytes(self.random_bytes(4), "big")
            if key_id not in taken:
                return MasterKey(key_id, self.random_bytes(MASTER_KEY_LEN), int(self.clock()))


def _safe_url(url: str) -> str:
    """The store's URL without a password in it (logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()
