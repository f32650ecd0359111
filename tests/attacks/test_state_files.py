"""A damaged server key file never stops ``ntspy serve``: it starts, says what was wrong,
keeps the bad file aside untouched, writes a new owner-only key file, and loses
nothing else in the directory. A key file others can read is reported and made
private without losing its keys.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ntspy.client.session import NtsSession
from ntspy.net.tls import TrustConfig
from ntspy.server.keys import KEY_FILE_NAME, STATE_KIND, STATE_VERSION
from ntspy.state import b64, decode_state, encode_state
from tests.peers import ServerProc, prepare_ntspy_server

LOOPBACK = "127.0.0.1"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProc]:
    proc = prepare_ntspy_server(tmp_path)
    try:
        yield proc
    finally:
        proc.stop()


def session(server: ServerProc) -> NtsSession:
    trust = TrustConfig(use_system_store=False, extra=[server.certs.ca_cert])
    return NtsSession(LOOPBACK, server.ke_port, trust=trust, timeout=3.0)


async def assert_serves_nts(server: ServerProc) -> None:
    with session(server) as s:
        assert (await s.measure()).authenticated


def key_path(server: ServerProc) -> Path:
    return server.dumpdir / KEY_FILE_NAME


def good_file() -> bytes:
    keys = [{"id": 5, "key": b64(os.urandom(32)), "created": 2_000_000_000}]
    return encode_state(STATE_KIND, STATE_VERSION, {"kept": 3, "keys": keys})


def flipped(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0x20
    return bytes(out)


def duplicate_ids() -> bytes:
    key = {"id": 5, "key": b64(os.urandom(32)), "created": 2_000_000_000}
    return encode_state(STATE_KIND, STATE_VERSION, {"keys": [key, dict(key)]})


def make_directory(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_text("left by someone")


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


FILES: dict[str, Callable[[], bytes]] = {
    "bit flip": lambda: flipped(good_file()),
    "truncated": lambda: good_file()[:-17],
    "empty": lambda: b"",
    "garbage": lambda: os.urandom(300),
    "duplicate key ids": duplicate_ids,
}
NOT_FILES: dict[str, Callable[[Path], None]] = {
    "directory": make_directory,
    "fifo": make_fifo,
}


def assert_new_key_file(server: ServerProc) -> dict[str, object]:
    path = key_path(server)
    assert stat.S_ISREG(path.lstat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    payload = decode_state(path.read_bytes(), STATE_KIND, STATE_VERSION)
    keys = payload["keys"]
    assert isinstance(keys, list) and keys
    return payload


@pytest.mark.parametrize("kind", sorted(FILES))
async def test_damaged_key_file_is_kept_aside_and_replaced(server: ServerProc, kind: str) -> None:
    content = FILES[kind]()
    path = key_path(server)
    path.write_bytes(content)
    path.chmod(0o600)
    # Bystanders: an earlier quarantined file and an unrelated file must survive.
    earlier = server.dumpdir / f"{KEY_FILE_NAME}.corrupt-1"
    earlier.write_bytes(b"from an earlier incident")
    other = server.dumpdir / "notes.txt"
    other.write_text("unrelated")

    server.start()
    await assert_serves_nts(server)

    aside = server.dumpdir / f"{KEY_FILE_NAME}.corrupt-2"
    assert aside.read_bytes() == content
    assert earlier.read_bytes() == b"from an earlier incident"
    assert other.read_text() == "unrelated"
    assert_new_key_file(server)
    log = server.log()
    assert "NTS server keys unusable" in log
    assert str(aside) in log


@pytest.mark.parametrize("kind", sorted(NOT_FILES))
async def test_unreadable_key_file_is_moved_aside_and_replaced(
    server: ServerProc, kind: str
) -> None:
    path = key_path(server)
    NOT_FILES[kind](path)
    server.start()
    await assert_serves_nts(server)
    aside = server.dumpdir / f"{KEY_FILE_NAME}.corrupt-1"
    if kind == "directory":
        assert (aside / "inside").read_text() == "left by someone"
    else:
        assert stat.S_ISFIFO(aside.lstat().st_mode)
    assert_new_key_file(server)
    log = server.log()
    assert "NTS server keys unusable" in log
    assert f"moved unreadable NTS key file {path} to {aside}" in log


async def test_world_readable_key_file_is_reported_and_made_private(server: ServerProc) -> None:
    server.start()
    with session(server) as s:
        await s.measure()  # KE and one exchange: the client now holds cookies
        ke_before = s.stats["key exchanges"]
        server.stop()
        key_path(server).chmod(0o644)
        server.start()
        # The keys survived: cookies issued before the restart still work, no NAK.
        m = await s.measure()
        assert m.authenticated
        assert s.stats["naks"] == 0
        assert s.stats["key exchanges"] == ke_before
    assert stat.S_IMODE(key_path(server).stat().st_mode) == 0o600
    log = server.log()
    assert "accessible by group and others (mode 0644)" in log
    assert not list(server.dumpdir.glob("*.corrupt-*"))
