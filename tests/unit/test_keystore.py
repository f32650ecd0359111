"""The server's key ring on disk: a key is saved before it is used, a failed save keeps
the old key, temporary files do not pile up."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ntspy.errors import StateFileError
from ntspy.proto.cookies import CookieKeys
from ntspy.proto.nts import verify_response
from ntspy.server.keys import KEY_FILE_NAME, KeyStore
from ntspy.state import temp_path
from tests.unit.test_responder import AEAD, C2S, NOW, S2C, make, nts_request


def test_a_new_key_is_on_disk_before_the_ring_uses_it(tmp_path: Path) -> None:
    store = KeyStore(tmp_path, 3600)
    store.load(1_000)
    first = store.ring.current.key_id
    in_use_at_write: list[list[int]] = []
    write = store._write

    def spy(ring: object) -> None:
        in_use_at_write.append([k.key_id for k in store.ring.keys])
        write(ring)  # type: ignore[arg-type]

    store._write = spy  # type: ignore[method-assign]
    store.rotate(5_000)
    new = store.ring.current.key_id
    assert new != first
    assert in_use_at_write == [[first]]  # while it was being written, cookies used the old key
    reread = KeyStore(tmp_path, 3600)
    reread.load(5_001)
    assert reread.ring.current.key_id == new  # and it is on disk


def test_a_rotation_that_cannot_be_saved_keeps_the_saved_key(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = KeyStore(tmp_path, 3600)
    store.load(1_000)
    before = [k.key_id for k in store.ring.keys]

    def full(ring: object) -> None:
        raise StateFileError("cannot write: No space left on device")

    store._write = full  # type: ignore[method-assign]
    for t in (5_000, 5_001, 5_002):
        assert store.rotate_if_due(t)  # tried every time it is due ...
    assert [k.key_id for k in store.ring.keys] == before  # ... never used unsaved
    assert caplog.text.count("cannot save the new NTS master key") == 1  # said once


def test_an_empty_ring_on_a_full_disk_serves_from_memory_and_saves_later(tmp_path: Path) -> None:
    store = KeyStore(tmp_path, 3600)
    real = store._write
    store._write = lambda ring: (_ for _ in ()).throw(  # type: ignore[method-assign]
        StateFileError("No space left on device"))
    store.load(1_000)
    assert len(store.ring.keys) == 1 and not (tmp_path / KEY_FILE_NAME).exists()
    store._write = real  # type: ignore[method-assign]
    store.rotate_if_due(1_001)  # the disk has room again
    assert (tmp_path / KEY_FILE_NAME).exists()
    reread = KeyStore(tmp_path, 3600)
    reread.load(1_002)
    assert reread.ring.current.key_id == store.ring.current.key_id


def test_a_stale_temporary_file_is_removed_and_never_multiplied(tmp_path: Path) -> None:
    stale = temp_path(tmp_path / KEY_FILE_NAME)
    stale.write_bytes(b"master keys from a write cut short by kill -9")
    store = KeyStore(tmp_path, 1)
    store.load(1_000)
    assert not stale.exists()
    for t in range(1_001, 1_040):
        store.rotate_if_due(t)
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE_NAME]


# The key file across restarts, as the responder sees it.


def test_key_store_persists_and_survives_restart(tmp_path: Path) -> None:
    _r, _, store = make(tmp_path)
    path = tmp_path / KEY_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    req = nts_request(store)
    # "Restart": a new store loads the same ring and still accepts the old cookie.
    r2, _, store2 = make(tmp_path)
    assert [k.key_id for k in store2.ring.keys] == [k.key_id for k in store.ring.keys]
    out = r2.handle(req, "127.0.0.1", NOW, lambda: NOW)
    assert out is not None and verify_response(out, b"i" * 32, 99, S2C)


def test_corrupt_key_file_is_moved_aside_and_replaced(tmp_path: Path) -> None:
    make(tmp_path)
    path = tmp_path / KEY_FILE_NAME
    path.write_bytes(path.read_bytes()[:-10])
    _, _, store = make(tmp_path)
    assert len(store.ring.keys) == 1
    assert any(p.name.startswith(KEY_FILE_NAME + ".corrupt") for p in tmp_path.iterdir())
    assert path.exists()


def test_rotation_keeps_old_cookies_until_the_ring_forgets() -> None:
    _, _, store = make()
    keys = CookieKeys(AEAD, C2S.key, S2C.key)
    old = store.ring.seal(keys, os.urandom(16))
    store.rotate(NOW // 10**9 + 1)
    store.rotate(NOW // 10**9 + 2)
    assert store.ring.open(old) == keys
    store.rotate(NOW // 10**9 + 3)
    assert len(store.ring.keys) == 3
