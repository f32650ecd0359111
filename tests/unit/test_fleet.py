"""The fleet key ring (``ntskeystore``): its decisions without I/O, the wrapping, and
two servers' rings kept in step through a real redis-server on loopback, through
rotations, a paused Redis and a Redis restarted empty."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ntspy.proto.cookies import CookieKeys, KeyRing, MasterKey
from ntspy.server.fleet import Fleet, KeyStoreError, RingDoc, StoreConfig, Wrapper, plan
from tests.peers import REDIS_SERVER, RedisServer, free_port

KEK = bytes(range(32))


def key(n: int, created: int = 0) -> MasterKey:
    return MasterKey(n, bytes([n]) * 32, created)


def fresh(taken: set[int]) -> MasterKey:
    return key(max(taken | {100}) + 1, 1000)


# -- plan() --------------------------------------------------------------------------


def test_a_store_that_lost_its_ring_gets_ours_back() -> None:
    local = RingDoc(7, (key(1),))
    p = plan(1000, local, None, leader=False, members_loaded=False, rotate_interval=10,
             kept=3, new_key=fresh)
    assert p.restore is local and p.publish is None and p.adopt is None


def test_only_the_lease_holder_makes_the_first_key() -> None:
    assert plan(1000, None, None, False, False, 10, 3, fresh).restore is None
    p = plan(1000, None, None, True, False, 10, 3, fresh)
    assert p.restore is not None and p.adopt is p.restore and len(p.restore.keys) == 1


def test_followers_adopt_the_store_and_never_write() -> None:
    remote = RingDoc(3, (key(2, 990), key(1, 900)), key(3, 999))
    p = plan(1000, RingDoc(2, (key(1, 900),)), remote, leader=False, members_loaded=True,
             rotate_interval=10, kept=3, new_key=fresh)
    assert p.adopt is remote and p.publish is None and p.restore is None


def test_rotation_is_two_phases() -> None:
    remote = RingDoc(4, (key(2, 980), key(1, 900)))
    # phase 1: the current key is due; a pending key is published, nothing seals under it
    p = plan(1000, remote, remote, True, True, 10, 3, fresh)
    assert p.publish is not None and p.publish.serial == 5
    assert p.publish.keys == remote.keys and p.publish.pending is not None
    pending = p.publish
    # not everyone has it yet: it stays pending
    assert plan(1001, pending, pending, True, False, 10, 3, fresh).publish is None
    # everyone has it: it becomes current, the oldest beyond `kept` goes
    p = plan(1002, pending, pending, True, True, 10, 2, fresh)
    assert p.publish is not None and p.publish.pending is None
    assert [k.key_id for k in p.publish.keys] == [pending.pending.key_id, 2]
    assert p.publish.keys[0].created == 1002  # its age counts from becoming current
    # not due: nothing to do
    assert plan(1005, p.publish, p.publish, True, True, 10, 2, fresh).publish is None


# -- wrapping ------------------------------------------------------------------------


def test_wrapped_keys_need_the_key_encryption_key() -> None:
    doc = RingDoc(9, (key(5, 10), key(4, 5)), key(6, 11))
    text = doc.encode(Wrapper(KEK))
    assert bytes([5]) * 32 not in text.encode() and "BQUF" not in text  # no raw key in it
    back = RingDoc.decode(text, Wrapper(KEK))
    assert back == doc
    with pytest.raises(KeyStoreError, match="does not unwrap"):
        RingDoc.decode(text, Wrapper(bytes(32)))
    for garbage in ("", "{", "[]", '{"format": 1}', '{"format": 2, "keys": []}'):
        with pytest.raises(KeyStoreError):
            RingDoc.decode(garbage, Wrapper(KEK))


def test_key_file_forms_and_modes(tmp_path: Path) -> None:
    for text in (KEK.hex(), "  " + KEK.hex() + "\n"):
        f = tmp_path / "kek"
        f.write_text(text)
        f.chmod(0o600)
        assert RingDoc.decode(RingDoc(1, (key(1),)).encode(Wrapper.from_file(f)),
                              Wrapper(KEK)).keys[0].key == key(1).key
    f.chmod(0o644)
    with pytest.raises(KeyStoreError, match="readable by others"):
        Wrapper.from_file(f)
    f.write_bytes(b"short")
    f.chmod(0o600)
    with pytest.raises(KeyStoreError, match="at least 32 bytes"):
        Wrapper.from_file(f)


# -- with a real Redis ---------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


async def test_two_servers_keep_one_ring_through_rotation_pause_and_loss(
        tmp_path: Path, redis_server: RedisServer) -> None:
    kek = tmp_path / "kek"
    kek.write_bytes(os.urandom(32))
    kek.chmod(0o600)
    store = StoreConfig(f"redis://127.0.0.1:{redis_server.port}/0", kek, poll=0.1)
    rings = [KeyRing([MasterKey(1, os.urandom(32), int(time.time()))]), KeyRing()]
    changes = [0, 0]

    def changed(i: int) -> None:
        changes[i] += 1

    fleets = [Fleet(store, rings[i], 1, lambda i=i: changed(i)) for i in range(2)]
    for f in fleets:
        await f.start()
    seen_current: set[int] = set()
    violations: list[str] = []

    async def watch(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for a, b in ((0, 1), (1, 0)):
                if rings[a].keys:
                    current = rings[a].current.key_id
                    seen_current.add(current)
                    accepted = {k.key_id for k in rings[b].accepted}
                    if rings[b].keys and current not in accepted:
                        violations.append(f"{current:08x} seals on {a}, unknown on {b}")
            await asyncio.sleep(0.02)

    try:
        await watch(4.0)
        assert violations == []
        assert len(seen_current) >= 3, seen_current  # rotated, every second or so
        # A cookie sealed on one opens on the other.
        cookie = rings[0].seal(CookieKeys(15, bytes(32), bytes(32)), os.urandom(16))
        assert rings[1].open(cookie).aead_id == 15
        # Redis paused: both keep serving what they hold; no rotation meanwhile.
        assert redis_server.proc is not None
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        held = [{k.key_id for k in r.accepted} for r in rings]
        await watch(1.5)
        assert [{k.key_id for k in r.accepted} for r in rings] == held
        assert not fleets[0].status.connected and not fleets[1].status.connected, \
            [f.status for f in fleets]
        os.kill(redis_server.proc.pid, signal.SIGCONT)
        await watch(2.0)
        assert fleets[0].status.connected and fleets[1].status.connected, \
            [f.status for f in fleets]
        # Redis restarted empty: the ring comes back from the servers, not a new one.
        current = {r.current.key_id for r in rings}
        before = {k.key_id for k in rings[0].accepted}
        redis_server.stop()
        redis_server.start()
        await watch(1.0)
        assert {k.key_id for k in rings[0].accepted} & before, (rings[0].accepted, before)
        assert rings[0].current.key_id in current | {k.key_id for k in rings[1].accepted}, \
            (rings[0].current, current, rings[1].accepted)
        await watch(2.0)
        assert violations == []
    finally:
        for f in fleets:
            await f.stop()


def _redis(directory: Path, *args: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([REDIS_SERVER, "--save", "", "--appendonly", "no", "--dir",
                             str(directory), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    assert proc.poll() is None, "redis-server did not start"
    return proc


async def _one_look(store: StoreConfig) -> tuple[bool, KeyRing]:
    ring = KeyRing([MasterKey(7, os.urandom(32), int(time.time()))])
    fleet = Fleet(store, ring, 3600, lambda: None)
    try:
        await fleet.step()
        return fleet.status.connected, ring
    finally:
        await fleet.stop()


async def test_unix_socket_password_file_and_tls_with_certificate_checks(
        tmp_path: Path) -> None:
    from ntspy.certs import make_test_pki

    kek = tmp_path / "kek"
    kek.write_bytes(os.urandom(32))
    kek.chmod(0o600)
    short = Path(tempfile.mkdtemp(dir="/tmp"))  # Unix socket paths are short
    procs = []
    try:
        # unix:///path, with a password read from a file (and a wrong one refused)
        sock = short / "redis.sock"
        procs.append(_redis(tmp_path, "--port", "0", "--unixsocket", str(sock),
                            "--requirepass", "s3cret word"))
        good, bad = tmp_path / "pw", tmp_path / "wrong"
        good.write_text("s3cret word\n")
        bad.write_text("nope\n")
        ok, ring = await _one_look(StoreConfig(f"unix://{sock}", kek, password_file=good))
        assert ok and ring.current.key_id == 7  # it gave the store its ring
        ok, _ = await _one_look(StoreConfig(f"unix://{sock}", kek, password_file=bad))
        assert not ok
        # rediss:// checks the server's certificate against cafile (and its name)
        pki = make_test_pki(tmp_path / "pki")
        other = make_test_pki(tmp_path / "other")
        port = free_port("tcp")
        procs.append(_redis(tmp_path, "--port", "0", "--tls-port", str(port),
                            "--tls-cert-file", str(pki.server_cert), "--tls-key-file",
                            str(pki.server_key), "--tls-ca-cert-file", str(pki.ca_cert),
                            "--tls-auth-clients", "no"))
        url = f"rediss://127.0.0.1:{port}/0"
        ok, _ = await _one_look(StoreConfig(url, kek, ca_file=pki.ca_cert))
        assert ok
        ok, _ = await _one_look(StoreConfig(url, kek, ca_file=other.ca_cert))
        assert not ok  # another CA's certificate: refused
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(short, ignore_errors=True)


def test_two_fleets_share_a_redis_with_prefixes(tmp_path: Path) -> None:
    store = StoreConfig("redis://10.0.0.5:6379/0?prefix=fleet2&health_check_interval=5",
                        tmp_path / "kek")
    store.redis_kwargs()
    assert store.prefix == "fleet2"
    assert store.redis_url() == "redis://10.0.0.5:6379/0?health_check_interval=5"
    assert StoreConfig("unix:///run/redis.sock", tmp_path).redis_url() == \
        "unix:///run/redis.sock"
