"""Damaged client state (NTS cookie dumps, drift file, saved time): reported, moved
aside, replaced; the daemon starts and nothing else is lost."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ntspy.client.daemon import TIME_FILE, ClientDaemon, ClientOptions
from ntspy.client.ke import KeResult
from ntspy.client.session import NtsSession
from ntspy.client.source import Source
from ntspy.clock import MeasureOnlyClock
from ntspy.config import parse_config
from ntspy.sync.discipline import format_drift


def nts_source(tmp_path: Path) -> Source:
    cfg = parse_config("server 127.0.0.1 nts ntsport 4460\n").sources[0]
    return Source(cfg, MeasureOnlyClock(), dumpdir=tmp_path)


def give_cookies(src: Source) -> None:
    assert isinstance(src.session, NtsSession)
    src.session.ke = KeResult(
        aead_id=15, c2s=bytes(32), s2c=bytes(range(32)), cookies=[b"c" * 104] * 8,
        ntp_server="127.0.0.1", ntp_port=123, ke_host="127.0.0.1", ke_port=4460,
        ke_address="127.0.0.1", tls_version="TLSv1.3", cert_subject="CN=x", cert_not_after=None,
    )
    src.session.cookies = [bytes([i]) * 104 for i in range(8)]


def damaged_variants(good: bytes) -> dict[str, bytes]:
    return {
        "truncated": good[: len(good) // 2],
        "bit flip": good[:40] + bytes([good[40] ^ 1]) + good[41:],
        "garbage": os.urandom(300),
        "empty": b"",
    }


@pytest.mark.parametrize("damage", ["truncated", "bit flip", "garbage", "empty", "directory"])
def test_damaged_cookie_dump_is_moved_aside_and_replaced(tmp_path: Path, damage: str) -> None:
    src = nts_source(tmp_path)
    give_cookies(src)
    src.save_dump()
    assert src.dump_path is not None
    good = src.dump_path.read_bytes()
    if damage == "directory":
        src.dump_path.unlink()
        src.dump_path.mkdir()
    else:
        src.dump_path.write_bytes(damaged_variants(good)[damage])

    fresh = nts_source(tmp_path)
    assert fresh.load_dump(0.0) is False  # reported, not used: the source will do NTS-KE
    assert isinstance(fresh.session, NtsSession) and fresh.session.cookies == []
    kept = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(kept) == 1  # the damaged thing is kept aside, not deleted
    give_cookies(fresh)
    fresh.save_dump()  # and a good one takes its place
    again = nts_source(tmp_path)
    assert again.load_dump(0.0) is True and isinstance(again.session, NtsSession)
    assert len(again.session.cookies) == 8


def test_world_readable_cookie_dump_is_used_and_made_private(tmp_path: Path) -> None:
    src = nts_source(tmp_path)
    give_cookies(src)
    src.save_dump()
    assert src.dump_path is not None
    os.chmod(src.dump_path, 0o644)
    fresh = nts_source(tmp_path)
    assert fresh.load_dump(0.0) is True
    assert stat.S_IMODE(src.dump_path.stat().st_mode) == 0o600


def test_dump_of_another_server_is_not_used(tmp_path: Path) -> None:
    src = nts_source(tmp_path)
    give_cookies(src)
    src.save_dump()
    assert src.dump_path is not None
    other = parse_config("server 127.0.0.1 nts ntsport 4461\n").sources[0]
    moved = src.dump_path.rename(tmp_path / f"{src.dump_path.name[:-len('4460.nts')]}4461.nts")
    stranger = Source(other, MeasureOnlyClock(), dumpdir=tmp_path)
    assert stranger.dump_path == moved
    assert stranger.load_dump(0.0) is False  # cookies only work with their own server


@pytest.mark.parametrize("content", [b"not a number\n", b"1e400 1\n", b"12.5 -3\n", b""])
async def test_damaged_drift_file_is_ignored_moved_aside_and_rewritten(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / "drift").write_bytes(content)
    config = parse_config(f"driftfile {tmp_path / 'drift'}\nntsdumpdir {tmp_path}\n")
    daemon = ClientDaemon(config, MeasureOnlyClock())
    assert daemon.discipline.frequency_ppm == 0.0
    assert any(p.name.startswith("drift.corrupt-") for p in tmp_path.iterdir())
    daemon.discipline.updates = 1
    await daemon.stop()
    assert (tmp_path / "drift").read_text().split()[0] == format_drift(0.0, 0.0).split()[0]


async def test_directory_in_place_of_the_time_file(tmp_path: Path) -> None:
    (tmp_path / TIME_FILE).mkdir()
    config = parse_config(f"ntsdumpdir {tmp_path}\n")
    daemon = ClientDaemon(config, MeasureOnlyClock(), ClientOptions(restore_time=True))
    daemon._restore_time()  # reported, moved aside, no step
    assert (tmp_path / TIME_FILE).exists() is False
    await daemon.stop()
    assert int((tmp_path / TIME_FILE).read_text()) > 0


async def test_no_cookie_goes_out_twice_across_crashes(tmp_path: Path) -> None:
    """kill -9 after any poll: the restarted client never re-sends a cookie an
    observer has seen (RFC 8915 s6: it would link the client across restarts)."""
    from ntspy.net.udp import UdpServer
    from tests.unit.test_session import FakeNtsServer, session_for

    fake = FakeNtsServer()
    fake.udp = await UdpServer.bind("127.0.0.1", 0, fake.handle)
    try:
        cfg = parse_config("server fake.example nts ntsport 4460\n").sources[0]
        for run in range(6):  # each run ends in a "crash": no save at stop
            src = Source(cfg, MeasureOnlyClock(), dumpdir=tmp_path)
            session, _ = session_for(fake)
            session.on_cookie_spent = src.save_dump
            src.session = session
            restored = src.load_dump(0.0)
            assert restored == (run > 0)  # after the first run, no new NTS-KE needed
            with session:
                for _ in range(3):
                    await session.measure()
        seen = fake.cookies_seen
        assert len(seen) == 18 and len(set(seen)) == len(seen), "a cookie went out twice"
    finally:
        fake.udp.close()


async def test_a_full_disk_costs_a_log_line_not_a_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging
    caplog.set_level(logging.INFO)
    src = nts_source(tmp_path)
    give_cookies(src)
    src.dump_path = Path("/dev/full/nts")  # every write fails
    for _ in range(3):
        src.save_dump()  # never raises
    errors = [r for r in caplog.records if "cannot save NTS cookies" in r.getMessage()]
    assert len(errors) == 1  # said once, retried at every change
    src.dump_path = tmp_path / "nts"
    src.save_dump()
    assert src.dump_path.exists() and "saved to" in caplog.text  # and says it works again
