"""Persisted state: atomic writes, damage detection, quarantine, permissions."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from ntspy.errors import StateFileError
from ntspy.state import (
    StateFile,
    atomic_write,
    b64,
    check_permissions,
    decode_state,
    encode_state,
    load_state,
    quarantine,
    read_state,
    save_state,
    unb64,
)

PAYLOAD: dict[str, Any] = {
    "server": "nts.example.net",
    "cookies": [b64(b"\x00" * 4), b64(b"\xff\x10")],
    "port": 123,
    "note": "line\nbreak \u00e9",
}


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------
# atomic_write / read_state


def test_atomic_write_creates_private_file_and_directory(tmp_path: Path) -> None:
    target = tmp_path / "new" / "cookies.nts"
    atomic_write(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert mode_of(target) == 0o600
    assert mode_of(target.parent) & 0o077 == 0
    assert os.listdir(target.parent) == ["cookies.nts"]


def test_atomic_write_replaces_and_honours_mode(tmp_path: Path) -> None:
    target = tmp_path / "drift"
    target.write_bytes(b"old contents that are longer")
    atomic_write(target, b"new", mode=0o644)
    assert target.read_bytes() == b"new"
    assert mode_of(target) == 0o644
    assert os.listdir(tmp_path) == ["drift"]


def test_failed_rename_keeps_old_content_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ntskeys"
    target.write_bytes(b"old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StateFileError, match="simulated I/O error"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ntskeys"]


def test_failed_write_keeps_old_content_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ntskeys"
    target.write_bytes(b"old")

    def full_disk(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(StateFileError, match="No space left"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ntskeys"]


def test_interrupt_during_write_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x", b"data")
    assert os.listdir(tmp_path) == []


def test_atomic_write_into_a_file_as_directory_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_bytes(b"")
    with pytest.raises(StateFileError, match="cannot write"):
        atomic_write(tmp_path / "blocker" / "x", b"data")


def test_read_state(tmp_path: Path) -> None:
    assert read_state(tmp_path / "missing") is None
    small = tmp_path / "small"
    small.write_bytes(b"12345")
    assert read_state(small) == b"12345"
    assert read_state(small, max_size=5) == b"12345"
    with pytest.raises(StateFileError, match="larger than 4 bytes"):
        read_state(small, max_size=4)
    with pytest.raises(StateFileError):
        read_state(tmp_path)  # a directory
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(StateFileError, match="not a regular file"):
        read_state(fifo)  # and it must not block waiting for a writer


def test_quarantine_numbers_and_keeps_content(tmp_path: Path) -> None:
    bad = tmp_path / "ntskeys"
    assert quarantine(bad) is None
    bad.write_bytes(b"first")
    assert quarantine(bad) == tmp_path / "ntskeys.corrupt-1"
    bad.write_bytes(b"second")
    assert quarantine(bad) == tmp_path / "ntskeys.corrupt-2"
    assert not bad.exists()
    assert (tmp_path / "ntskeys.corrupt-1").read_bytes() == b"first"
    assert (tmp_path / "ntskeys.corrupt-2").read_bytes() == b"second"


@pytest.mark.parametrize(
    ("mode", "who"),
    [
        (0o600, None),
        (0o400, None),
        (0o640, "group"),
        (0o604, "others"),
        (0o666, "group and others"),
    ],
)
def test_check_permissions(tmp_path: Path, mode: int, who: str | None) -> None:
    secret = tmp_path / "server.key"
    secret.write_bytes(b"k")
    secret.chmod(mode)
    warning = check_permissions(secret)
    if who is None:
        assert warning is None
    else:
        assert warning is not None
        assert f"accessible by {who} (mode {mode:04o})" in warning
        assert str(secret) in warning


def test_check_permissions_of_missing_file(tmp_path: Path) -> None:
    assert check_permissions(tmp_path / "nothing") is None


# --------------------------------------------------------------------------
# container


def test_round_trip_and_layout() -> None:
    data = encode_state("client-cookies", 2, PAYLOAD)
    assert data.startswith(b"ntspy-state 1 client-cookies 2\n")
    assert data.count(b"\n") == 3 and data.endswith(b"\n")
    assert decode_state(data, "client-cookies", 2) == PAYLOAD
    decoded = StateFile.decode(data, "client-cookies", 5)
    assert (decoded.kind, decoded.version, decoded.payload) == ("client-cookies", 2, PAYLOAD)
    assert StateFile("client-cookies", 2, PAYLOAD).encode() == data


def test_encoding_is_deterministic() -> None:
    reordered = dict(reversed(list(PAYLOAD.items())))
    assert encode_state("k", 1, PAYLOAD) == encode_state("k", 1, reordered)


def test_newer_version_and_wrong_kind_are_refused() -> None:
    data = encode_state("server-keys", 3, {"keys": []})
    with pytest.raises(StateFileError, match="version 3 is newer than this ntspy reads"):
        decode_state(data, "server-keys", 2)
    with pytest.raises(StateFileError, match="holds 'server-keys', expected 'client-cookies'"):
        decode_state(data, "client-cookies", 3)


def test_every_truncation_is_detected() -> None:
    data = encode_state("client-cookies", 1, {"c": [b64(bytes(range(20)))], "n": 7})
    for length in range(len(data)):
        with pytest.raises(StateFileError):
            decode_state(data[:length], "client-cookies", 1)


@pytest.mark.parametrize("mask", [0x01, 0x20, 0x80, 0xFF])
def test_every_byte_flip_is_detected(mask: int) -> None:
    data = encode_state("client-cookies", 1, {"c": b64(b"\x01\x02\x03"), "port": 123})
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= mask
        with pytest.raises(StateFileError):
            decode_state(bytes(damaged), "client-cookies", 1)


def test_appended_garbage_is_detected() -> None:
    data = encode_state("k", 1, {})
    for tail in (b"\n", b"x", b"sha256 00\n"):
        with pytest.raises(StateFileError):
            decode_state(data + tail, "k", 1)


def resign(header: bytes, body: bytes) -> bytes:
    """A file with a correct checksum around arbitrary content."""
    signed = header + b"\n" + body + b"\n"
    return signed + b"sha256 " + hashlib.sha256(signed).hexdigest().encode() + b"\n"


@pytest.mark.parametrize(
    ("header", "body", "message"),
    [
        (b"ntspy-state 1 k 1", b"[1, 2]", "not a JSON object"),
        (b"ntspy-state 1 k 1", b"{bad json", "not valid JSON"),
        (b"ntspy-state 1 k 1", b'{"x": NaN}', "not valid JSON"),
        (b"ntspy-state 1 k 1", b"[" * 100000 + b"]" * 100000, "not valid JSON"),
        (b"ntspy-state 1 k 1", b'{"x": "\xff"}', "not valid JSON"),
        (b"ntspy-state 2 k 1", b"{}", "unsupported state file format"),
        (b"ntspy-state 1 k 01", b"{}", "invalid state version"),
        (b"ntspy-state 1 k 0", b"{}", "invalid state version"),
        (b"ntspy-state 1 k", b"{}", "unsupported state file format"),
        (b"other-magic 1 k 1", b"{}", "bad magic"),
    ],
)
def test_well_checksummed_but_invalid_content(header: bytes, body: bytes, message: str) -> None:
    with pytest.raises(StateFileError, match=message):
        decode_state(resign(header, body), "k", 9)


@pytest.mark.parametrize(
    ("kind", "version", "payload"),
    [
        ("Bad Kind", 1, {}),
        ("", 1, {}),
        ("k", 0, {}),
        ("k", 1, {"x": float("nan")}),
        ("k", 1, {"x": b"raw bytes"}),
        ("k", 1, ["not", "a", "dict"]),
    ],
)
def test_encode_refuses_what_could_not_be_read_back(kind: str, version: int, payload: Any) -> None:
    with pytest.raises(StateFileError):
        encode_state(kind, version, payload)


# --------------------------------------------------------------------------
# load_state / save_state


def test_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "dump" / "192.0.2.1.nts"
    assert load_state(path, "client-cookies", 1) is None
    save_state(path, "client-cookies", 1, PAYLOAD)
    assert mode_of(path) == 0o600
    loaded = load_state(path, "client-cookies", 1)
    assert loaded is not None and loaded.payload == PAYLOAD and loaded.version == 1


def test_load_quarantines_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "ntskeys"
    save_state(path, "server-keys", 1, {"keys": []})
    damaged = path.read_bytes()[:-10]
    path.write_bytes(damaged)
    with pytest.raises(StateFileError, match=r"moved to .*ntskeys\.corrupt-1"):
        load_state(path, "server-keys", 1)
    assert not path.exists()
    assert (tmp_path / "ntskeys.corrupt-1").read_bytes() == damaged
    assert load_state(path, "server-keys", 1) is None  # a fresh start is possible


# --------------------------------------------------------------------------
# base64 helpers


@pytest.mark.parametrize("value", [b"", b"\x00", b"ab", bytes(range(256))])
def test_b64_round_trip(value: bytes) -> None:
    assert unb64(b64(value)) == value


@pytest.mark.parametrize("text", ["abc", "ab!=", "YQ", "é", "YWJj\n", 42, None])
def test_unb64_rejects_non_base64(text: Any) -> None:
    with pytest.raises(StateFileError):
        unb64(text)
