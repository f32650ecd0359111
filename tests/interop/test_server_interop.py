"""``ntspy serve`` against real NTS clients (chronyd, NTPsec, our own), restarts and signals."""

from __future__ import annotations

import asyncio
import shutil
import signal
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ntspy.certs import CertPaths, make_test_pki
from ntspy.client.session import NtsSession
from ntspy.control.protocol import request
from ntspy.errors import CertificateError, KeError
from ntspy.net.tls.trust import TrustConfig
from ntspy.server.keys import KEY_FILE_NAME
from tests.conftest import ServerFactory
from tests.peers import (
    ServerProc,
    ntpsec_ntpd,
    prepare_ntspy_server,
    run_chronyd_query,
    run_ntspy_serve_once,
    start_ntpsec_client,
)

LOOPBACK = "127.0.0.1"


def session_for(server: ServerProc, ca: Path | None = None) -> NtsSession:
    trust = TrustConfig(use_system_store=False, extra=[ca or server.certs.ca_cert])
    return NtsSession(LOOPBACK, server.ke_port, trust=trust, timeout=3.0)


def test_chronyd_client_gets_authenticated_time(
    ntspy_server: ServerProc, tmp_path: Path
) -> None:
    out = run_chronyd_query(tmp_path, ntspy_server.ke_port, ntspy_server.certs.ca_cert)
    assert "System clock wrong by" in out, out + ntspy_server.log()
    stats = ntspy_server.stats()
    assert stats["nts_authenticated"] > 0
    assert stats["ke_completed"] == 1
    assert stats["nts_naks"] == 0


def test_ntpsec_client_gets_cookies_and_authenticated_time(tmp_path: Path) -> None:
    assert ntpsec_ntpd().exists(), "run tools/fetch-ntpsec.sh /opt/ntspy-peers/ntpsec"
    server = prepare_ntspy_server(tmp_path, netns=True)
    server.start()
    client = None
    try:
        client = start_ntpsec_client(tmp_path, server)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and server.stats()["nts_authenticated"] < 2:
            time.sleep(0.25)
        client.stop()
        log = client.log()
        assert "NTSc: Got 8 cookies" in log, log
        stats = server.stats()
        assert stats["nts_authenticated"] >= 2, log
        assert stats["ke_completed"] == 1
        assert stats["nts_naks"] == stats["ntp_malformed"] == 0
    finally:
        if client is not None:
            client.stop()
        server.stop()


async def test_ntspy_client_samples_are_authenticated_and_counted(
    ntspy_server: ServerProc,
) -> None:
    with session_for(ntspy_server) as session:
        samples = [await session.measure() for _ in range(5)]
    assert all(m.authenticated for m in samples)
    assert all(m.stratum == 1 and abs(m.offset) < 0.5 for m in samples)
    stats = await ntspy_server.astats()
    assert stats["nts_authenticated"] == 5
    assert stats["ke_completed"] == 1


async def test_cookies_survive_a_restart(ntspy_server: ServerProc) -> None:
    with session_for(ntspy_server) as session:
        await session.measure()
        ntspy_server.restart()
        after = await session.measure()
        assert after.authenticated
        assert session.stats["key exchanges"] == 1
        assert session.stats["naks"] == 0
    stats = await ntspy_server.astats()
    assert stats["ke_accepted"] == 0  # the restarted server saw no KE at all
    assert stats["nts_authenticated"] == 1


async def _key_ids(server: ServerProc) -> list[int]:
    keys = await request(server.control, "serverkeys")
    return [int(k["id"]) for k in keys]


async def test_rotated_out_cookies_get_a_nak_and_the_client_rekeys(
    ntspy_server_factory: ServerFactory,
) -> None:
    server = ntspy_server_factory(extra_lines=["ntsrotate 1"])
    with session_for(server) as session:
        await session.measure()
        first = (await _key_ids(server))[-1]
        deadline = time.monotonic() + 10
        # The ring keeps 3 keys: wait until the key our cookies use is gone.
        while first in await _key_ids(server):
            assert time.monotonic() < deadline, "keys did not rotate"
            await asyncio.sleep(0.2)
        again = await session.measure()
        assert again.authenticated
        assert session.stats["naks"] == 1
        assert session.stats["key exchanges"] == 2
    stats = await server.astats()
    assert stats["nts_naks"] == 1
    assert stats["ke_completed"] == 2


async def test_workers_share_keys_and_counters(ntspy_server_factory: ServerFactory) -> None:
    server = ntspy_server_factory(ntsprocesses=2)
    total = 0
    for _ in range(4):
        with session_for(server) as session:
            for _ in range(15):
                m = await session.measure()
                assert m.authenticated
                total += 1
            assert session.stats["key exchanges"] == 1
    stats = await server.astats()
    assert stats["nts_authenticated"] == total
    assert stats["ke_completed"] == 4
    assert stats["nts_naks"] == 0
    children = _children(server.pid)
    assert len(children) == 2
    assert server.stop() == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def _replace_certs(server: ServerProc, new: CertPaths) -> None:
    shutil.copyfile(new.server_cert, server.certs.server_cert)
    shutil.copyfile(new.server_key, server.certs.server_key)


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_reloads_certificates_and_keeps_keys(
    ntspy_server_factory: ServerFactory, tmp_path: Path, workers: int
) -> None:
    ntspy_server = ntspy_server_factory(ntsprocesses=workers)
    old_session = session_for(ntspy_server)
    await old_session.measure()
    keys_before = await _key_ids(ntspy_server)
    new = make_test_pki(tmp_path / "new-pki", ca_name="second CA")
    _replace_certs(ntspy_server, new)
    ntspy_server.signal(signal.SIGHUP)
    with session_for(ntspy_server, new.ca_cert) as fresh:
        deadline = time.monotonic() + 5
        while True:
            try:
                m = await fresh.measure()
                break
            except CertificateError:
                assert time.monotonic() < deadline, ntspy_server.log()
                await asyncio.sleep(0.1)
        assert m.authenticated
    # Clients that trust only the old CA are now refused at KE (by every worker) ...
    await asyncio.sleep(0.3)
    for _ in range(4):
        with session_for(ntspy_server) as stale, pytest.raises(KeError):
            await stale.key_exchange()
    # ... but cookies they already hold still work: the key ring did not change.
    m = await old_session.measure()
    assert m.authenticated and old_session.stats["key exchanges"] == 1
    old_session.close()
    assert await _key_ids(ntspy_server) == keys_before


def test_sigterm_saves_the_keys_owner_only(ntspy_server: ServerProc) -> None:
    key_file = ntspy_server.dumpdir / KEY_FILE_NAME
    key_file.unlink(missing_ok=True)
    assert ntspy_server.stop() == 0
    assert key_file.exists()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


# --- start-up errors ---------------------------------------------------------


def _fails_fast(server: ServerProc) -> str:
    started = time.monotonic()
    proc = run_ntspy_serve_once(server.config_path)
    assert proc.returncode != 0
    assert time.monotonic() - started < 5
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_certificate_is_named(tmp_path: Path) -> None:
    server = prepare_ntspy_server(tmp_path)
    server.certs.server_cert.unlink()
    line = _fails_fast(server)
    assert str(server.certs.server_cert) in line


def test_key_not_matching_certificate_is_refused(tmp_path: Path) -> None:
    server = prepare_ntspy_server(tmp_path)
    other = make_test_pki(tmp_path / "other")
    shutil.copyfile(other.server_key, server.certs.server_key)
    line = _fails_fast(server)
    assert "match" in line.lower() and str(server.certs.server_key) in line


def test_expired_certificate_is_refused(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    certs = make_test_pki(
        tmp_path / "expired",
        not_before=now - timedelta(days=30),
        not_after=now - timedelta(days=1),
    )
    server = prepare_ntspy_server(tmp_path, certs=certs)
    line = _fails_fast(server)
    assert "expired" in line.lower() and str(certs.server_cert) in line


def test_unknown_directive_names_file_and_line(tmp_path: Path) -> None:
    server = prepare_ntspy_server(tmp_path, extra_lines=["frobnicate 3"])
    lineno = len(server.config_path.read_text().splitlines())
    line = _fails_fast(server)
    assert f"{server.config_path}:{lineno}" in line and "frobnicate" in line
