"""A damaged server key file never stops ``ntspy serve``: it starts, says what was wrong,
keeps the bad file aside untouched, writes a new owner-only key file, and loses
nothing else in the directory. A key file others can read is reported and made
private without losing its keys.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ntspy.client.session import NtsSession
from ntspy.net.tls.trust import TrustConfig
from ntspy.server.keys import KEY_FILE_NAME, STATE_KIND, STATE_VERSION
from ntspy.state import b64, decode_state, encode_state
from tests.peers import NO_SYS_TIME, ServerProc, prepare_ntspy_server, wait_for_tcp

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


# -- keys others could plant, keys we cannot read, a full disk (issue 14, item 6) --------


def serve_once(server: ServerProc, *prefix: str) -> subprocess.CompletedProcess[str]:
    """``ntspy serve`` as it starts; ``prefix`` replaces the usual setpriv (it must drop
    CAP_SYS_TIME too)."""
    return subprocess.run([*(prefix or NO_SYS_TIME), sys.executable, "-m", "ntspy", "serve", "-f",
                           str(server.config_path)], capture_output=True, text=True,
                          timeout=30, check=False, stdin=subprocess.DEVNULL)


def test_a_key_file_owned_by_another_user_is_refused(server: ServerProc) -> None:
    path = key_path(server)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = good_file()
    path.write_bytes(content)
    os.chown(path, 65534, 65534)  # "nobody" could have written these keys
    out = serve_once(server)
    assert out.returncode == 1, out
    assert "belongs to uid 65534" in out.stderr and "refusing its keys" in out.stderr, out
    assert path.read_bytes() == content  # left as it was


def test_a_world_writable_ntsdumpdir_is_refused(server: ServerProc) -> None:
    server.dumpdir.mkdir(parents=True, exist_ok=True)
    server.dumpdir.chmod(0o777)
    out = serve_once(server)
    assert out.returncode == 1, out
    assert "is writable by others (mode 0777)" in out.stderr, out.stderr


def test_a_key_file_the_server_cannot_read_stops_start_up_and_is_kept() -> None:
    import shutil
    import tempfile
    top = Path(tempfile.mkdtemp(prefix="ntspy-keys-"))
    try:
        top.chmod(0o755)
        srv = prepare_ntspy_server(top)
        srv.dumpdir.mkdir(exist_ok=True)
        path = key_path(srv)
        content = good_file()
        path.write_bytes(content)
        path.chmod(0o600)  # root's, owner-only: the server below runs as nobody
        for p in [srv.directory, *srv.directory.rglob("*")]:
            if p != path:
                os.chown(p, 65534, 65534)
        out = serve_once(srv, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                         "--inh-caps=-all", "--bounding-set=-all")
        assert out.returncode == 1, out
        assert "cannot be read; fix the file's permissions" in out.stderr, out.stderr
        assert path.read_bytes() == content  # never moved aside nor replaced
        assert not list(srv.dumpdir.glob("*.corrupt-*"))
    finally:
        shutil.rmtree(top, ignore_errors=True)


async def test_a_full_disk_at_start_serves_with_keys_in_memory(server: ServerProc) -> None:
    server.dumpdir.mkdir(parents=True, exist_ok=True)
    # A private mount namespace: a 4 KiB tmpfs on ntsdumpdir, filled up before the start.
    command = [*NO_SYS_TIME, sys.executable, "-m", "ntspy", "serve", "-f",
               str(server.config_path)]
    script = (f"mount -t tmpfs -o size=4k,mode=0700 tmpfs {server.dumpdir} && "
              f"dd if=/dev/zero of={server.dumpdir}/fill bs=1k count=64 2>/dev/null; "
              f"exec {shlex.join(command)}")
    with server.log_path.open("ab") as log:
        proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for_tcp(LOOPBACK, server.ke_port)
        await assert_serves_nts(server)  # cookies under a key held in memory
        log_text = server.log()
        assert "serving with an NTS master key held in memory only" in log_text, log_text
        assert "Traceback" not in log_text
    finally:
        proc.terminate()
        assert proc.wait(20) == 0, server.log()[-2000:]
    assert "Traceback" not in server.log()
