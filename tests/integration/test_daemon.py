"""``ntspy run`` end to end: the client daemon against real NTS servers on loopback.

Every daemon runs with ``-x`` (the system clock is only measured) and without
CAP_SYS_TIME; servers are ``ntspy serve`` and chronyd subprocesses on ports
picked at run time. Sources poll every 0.25-0.5 s so a full reach register
(377) takes seconds.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ntspy.proto.ntp import Mode, NtpHeader
from tests.conftest import ServerFactory
from tests.daemon_helpers import ChronydServer, ClientProc, TcpProxy, server_line, wait_until
from tests.peers import LOOPBACK, ServerProc, free_port, start_ntspy_server

SYNC_TIMEOUT = 15.0


@dataclass
class Servers:
    """Two ``ntspy serve`` and one chronyd, all serving NTS on loopback."""

    a: ServerProc
    b: ServerProc
    chrony: ChronydServer

    def lines(self) -> list[str]:
        return [
            server_line(LOOPBACK, self.a.ntp_port, self.a.ke_port),
            server_line("localhost", self.b.ntp_port, self.b.ke_port),
            server_line(LOOPBACK, self.chrony.ntp_port, self.chrony.ke_port),
            f"ntstrustedcerts {self.a.certs.ca_cert}",
            f"ntstrustedcerts {self.b.certs.ca_cert}",
            f"ntstrustedcerts {self.chrony.ca_cert}",
        ]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("servers")
    started: list[ServerProc | ChronydServer] = []
    try:
        a = start_ntspy_server(root / "a")
        started.append(a)
        b = start_ntspy_server(root / "b")
        started.append(b)
        chrony = ChronydServer(root / "chronyd")
        started.append(chrony)
        chrony.start()
        yield Servers(a, b, chrony)
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def clients(tmp_path: Path) -> Iterator[list[ClientProc]]:
    """Client daemons a test makes; all stopped at teardown, by PID."""
    made: list[ClientProc] = []
    try:
        yield made
    finally:
        for client in made:
            client.stop()


def new_client(clients: list[ClientProc], directory: Path, lines: list[str],
               extra: list[str] | None = None) -> ClientProc:
    client = ClientProc(directory, lines, extra or [])
    clients.append(client)
    return client


def all_reached(client: ClientProc, expected: int) -> list[tuple[str, str, int]] | None:
    """The source states once there are ``expected`` sources, all 377, one selected."""
    states = client.states()
    if len(states) != expected or any(reach != 0o377 for _, _, reach in states):
        return None
    if [state for _, state, _ in states].count("*") != 1:
        return None
    return states


def ke_counts(*servers: ServerProc) -> list[tuple[int, int]]:
    out = []
    for server in servers:
        stats = server.stats()
        out.append((stats["ke_accepted"], stats["ke_completed"]))
    return out


def full_jars(rows: list[str]) -> list[str] | None:
    """``authdata`` rows if every source holds 8 cookies."""
    return rows if all(row.split()[8] == "8" for row in rows) else None


def table_rows(text: str) -> list[str]:
    """The data rows of a chronyc-style table (after the ``====`` rule)."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("====="))
    return lines[rule + 1:]


def test_three_nts_servers_sync_in_one_thread(
    servers: Servers, clients: list[ClientProc], tmp_path: Path
) -> None:
    client = new_client(clients, tmp_path / "client", servers.lines())
    client.start()
    wait_until(lambda: all_reached(client, 3), SYNC_TIMEOUT, "3 sources at reach 377")

    rows = table_rows(client.ctl("sources"))
    assert len(rows) == 3
    marks = sorted(row[:2] for row in rows)
    assert marks[0] == "^*" and all(m in ("^+", "^-") for m in marks[1:]), rows
    assert all(row.split()[4] == "377" for row in rows), rows
    assert {row.split()[1] for row in rows} == {LOOPBACK, "localhost"}

    # A request in flight has spent one cookie, its reply not yet in: look
    # again until no exchange is under way.
    auth_rows = wait_until(lambda: full_jars(table_rows(client.ctl("authdata"))), 5.0,
                           "8 cookies for every source")
    assert len(auth_rows) == 3
    for row in auth_rows:
        _name, mode, key_id, aead, klen, _last, _atmp, _nak, cook, _clen = row.split()
        assert mode == "NTS" and int(key_id) >= 1
        assert (aead, klen) in {("15", "256"), ("30", "128")}, row
        assert cook == "8", row

    tracking = client.ctl("tracking")
    fields = {k.strip(): v for k, v in (line.split(":", 1) for line in tracking.splitlines())}
    assert fields["Reference ID"].split()[0] == "7F000001"  # every server is 127.0.0.1
    assert int(fields["Stratum"]) >= 2
    assert fields["Leap status"].strip() == "Normal"

    for command in ("sources", "sourcestats", "tracking", "authdata", "ntpdata"):
        parsed = json.loads(client.ctl("--json", command))
        assert parsed, command
    as_json = json.loads(client.ctl("--json", "tracking"))
    assert as_json["synchronised"] is True and as_json["stratum"] >= 2
    ntpdata = json.loads(client.ctl("--json", "ntpdata"))
    assert all(row["authenticated"] for row in ntpdata) and len(ntpdata) == 3

    # One process, one thread: DNS ("localhost") and TLS must not start workers.
    assert client.threads() == 1


def test_restart_reuses_saved_cookies_then_rekey(
    servers: Servers, clients: list[ClientProc], tmp_path: Path
) -> None:
    client = new_client(clients, tmp_path / "client", servers.lines())
    client.start()
    wait_until(lambda: all_reached(client, 3), SYNC_TIMEOUT, "3 sources at reach 377")
    key_ids = {row["configured"] + str(i): row["key_id"]
               for i, row in enumerate(client.query("authdata"))}
    assert client.stop() == 0
    before = ke_counts(servers.a, servers.b)
    time_file = client.dumpdir / "ntspy.time"
    saved = int(time_file.read_text())
    assert abs(saved - time.time_ns()) < 5e9
    assert client.driftfile.exists()
    assert len(list(client.dumpdir.glob("*.nts"))) == 3

    # -s: the clock is ahead of the saved time, so nothing is stepped (and
    # with -x a step would only move the virtual timescale anyway).
    client.start("-s")
    wait_until(lambda: all_reached(client, 3), SYNC_TIMEOUT, "3 sources at 377 again")
    assert ke_counts(servers.a, servers.b) == before, "a restart must not redo NTS-KE"
    again = {row["configured"] + str(i): row["key_id"]
             for i, row in enumerate(client.query("authdata"))}
    assert again == key_ids
    assert "stepping" not in client.log()
    assert "loaded 8 NTS cookies" in client.log()

    assert "NTS-KE will be redone for 3 sources" in client.ctl("rekey")

    def rekeyed() -> bool:
        rows = client.query("authdata")
        return all(row["key_id"] == key_ids[row["configured"] + str(i)] + 1
                   and row["cookies"] == 8 for i, row in enumerate(rows))

    wait_until(rekeyed, SYNC_TIMEOUT, "KeyID + 1 on every source after rekey")
    after = ke_counts(servers.a, servers.b)
    assert [c for _, c in after] == [c + 1 for _, c in before]


def test_falseticker_an_hour_off_is_never_selected(
    servers: Servers, clients: list[ClientProc], tmp_path: Path
) -> None:
    liar = ChronydServer(tmp_path / "liar", faketime="+1h")
    try:
        liar.start()
        lines = [
            server_line(LOOPBACK, servers.a.ntp_port, servers.a.ke_port),
            server_line("localhost", servers.b.ntp_port, servers.b.ke_port),
            server_line("localhost", liar.ntp_port, liar.ke_port),
            f"ntstrustedcerts {servers.a.certs.ca_cert}",
            f"ntstrustedcerts {servers.b.certs.ca_cert}",
            f"ntstrustedcerts {liar.ca_cert}",
        ]
        client = new_client(clients, tmp_path / "client", lines)
        client.start()
        liar_selected: list[dict[str, object]] = []

        def liar_marked() -> bool:
            rows = client.query("sources")
            liars = [r for r in rows if abs(r["measured_offset"]) > 3000]
            liar_selected.extend(r for r in liars if r["state"] == "*")
            states = [r["state"] for r in rows]
            return len(liars) == 1 and liars[0]["state"] == "x" and states.count("*") == 1

        wait_until(liar_marked, SYNC_TIMEOUT, "the liar marked x")
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # and it stays so
            assert liar_marked()
            time.sleep(0.2)
        assert not liar_selected
        liar_row = next(r for r in client.query("sources") if abs(r["measured_offset"]) > 3000)
        # chronyc's sign: positive = our clock ahead; the liar is an hour ahead of us.
        assert -3600.5 < liar_row["measured_offset"] < -3599.5
        tracking = client.query("tracking")
        assert tracking["synchronised"] and abs(tracking["last_offset"]) < 0.01
        assert tracking["reference"] == LOOPBACK
        rows = table_rows(client.ctl("sources"))
        assert sorted(row[:2] for row in rows) == ["^*", "^+", "^x"] or \
            sorted(row[:2] for row in rows) == ["^*", "^-", "^x"], rows
    finally:
        liar.stop()


def test_reload_sources_follows_sourcedir(
    servers: Servers, clients: list[ClientProc], tmp_path: Path
) -> None:
    srcdir = tmp_path / "sources.d"
    srcdir.mkdir()
    (srcdir / "a.sources").write_text(
        server_line(LOOPBACK, servers.a.ntp_port, servers.a.ke_port) + "\n")
    client = new_client(clients, tmp_path / "client", [
        f"sourcedir {srcdir}",
        f"ntstrustedcerts {servers.a.certs.ca_cert}",
        f"ntstrustedcerts {servers.b.certs.ca_cert}",
    ])
    client.start()
    wait_until(lambda: all_reached(client, 1), SYNC_TIMEOUT, "the first source selected")

    (srcdir / "b.sources").write_text(
        server_line("localhost", servers.b.ntp_port, servers.b.ke_port) + "\n")
    assert client.ctl("reload", "sources") == "1 sources added, 0 removed\n"
    states = wait_until(lambda: all_reached(client, 2), SYNC_TIMEOUT, "both sources")
    assert [name for name, _, _ in states] == [LOOPBACK, "localhost"]

    (srcdir / "a.sources").unlink()
    assert client.ctl("reload", "sources") == "0 sources added, 1 removed\n"
    names = [row.split()[1] for row in table_rows(client.ctl("sources"))]
    assert names == ["localhost"]
    wait_until(lambda: all_reached(client, 1), SYNC_TIMEOUT, "the remaining source selected")


def test_nts_nak_leads_to_new_key_exchange(
    ntspy_server_factory: ServerFactory, clients: list[ClientProc], tmp_path: Path
) -> None:
    # A new master key every second, three kept: a cookie is stale after
    # about 3 s, and the client polls every 4 s, so each poll meets a NAK.
    server = ntspy_server_factory(extra_lines=["ntsrotate 1"])
    client = new_client(clients, tmp_path / "client", [
        server_line(LOOPBACK, server.ntp_port, server.ke_port, "nts minpoll 2 maxpoll 2"),
        f"ntstrustedcerts {server.certs.ca_cert}",
    ])
    client.start()

    def nak_handled() -> dict[str, int] | None:
        row = client.query("authdata")[0]
        return row if row["naks"] >= 1 and row["key_id"] >= 2 else None

    row = wait_until(nak_handled, 15.0, "an NTS NAK and a new NTS-KE")
    assert row["cookies"] >= 7
    src = client.query("sources")[0]
    assert src["reach"] & 0b11 == 0b11, src  # the NAKed poll still gave a sample
    assert src["state"] == "*"
    assert "NTS NAK" in client.log()


def test_ke_server_down_then_ntp_server_down(
    ntspy_server_factory: ServerFactory, clients: list[ClientProc], tmp_path: Path
) -> None:
    a = ntspy_server_factory()
    b = ntspy_server_factory()
    proxy = TcpProxy(a.ke_port)
    try:
        client = new_client(clients, tmp_path / "client", [
            server_line(LOOPBACK, a.ntp_port, proxy.port),
            server_line("localhost", b.ntp_port, b.ke_port),
            f"ntstrustedcerts {a.certs.ca_cert}",
            f"ntstrustedcerts {b.certs.ca_cert}",
        ])
        client.start()
        wait_until(lambda: client.query("authdata")[0]["key_id"] == 1, SYNC_TIMEOUT,
                   "the first NTS-KE", 0.05)
    finally:
        proxy.close()  # the KE server is gone from now on; its NTP server stays
    wait_until(lambda: all_reached(client, 2), SYNC_TIMEOUT, "both sources at 377")
    time.sleep(3.0)
    a_row = client.query("sources")[0]
    assert a_row["reach"] == 0o377 and a_row["state"] in "*+-", a_row
    assert a_row["last_rx"] < 1.5
    assert client.query("authdata")[0]["key_id"] == 1
    assert a.stats()["ke_completed"] == 1
    assert proxy.connections == 1

    b.stop()  # NTP (and NTS-KE) of the second server gone
    wait_until(lambda: client.states()[1][1] == "?", 15.0, "the stopped source as ?")
    assert client.states()[1][2] == 0
    assert client.states()[0] == (LOOPBACK, "*", 0o377)
    b.start()
    # Its cookies were spent on the unanswered polls: it comes back with a new
    # NTS-KE, at once or, if one was tried while the server was down, after
    # the 16 s back-off.
    wait_until(lambda: client.states()[1][1] in ("+", "-", "*"), 30.0,
               "the restarted source back in selection")


def test_daemon_serves_its_own_sync_state(
    servers: Servers, clients: list[ClientProc], tmp_path: Path
) -> None:
    """`ntspy run` with `allow` also answers NTP: one stratum below its reference,
    with the reference's address as reference id, once it is synchronised."""
    ntp_port = free_port("udp")
    lines = servers.lines()
    trusted = [line for line in lines if line.startswith("ntstrustedcerts")]
    client = new_client(clients, tmp_path / "relay", [lines[0], *trusted],
                        [f"port {ntp_port}", f"bindaddress {LOOPBACK}", f"allow {LOOPBACK}"])
    client.start()
    wait_until(lambda: all_reached(client, 1), SYNC_TIMEOUT, "the upstream at reach 377")
    upstream = json.loads(client.ctl("--json", "sources"))[0]

    def answer() -> NtpHeader | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            sock.sendto(NtpHeader(mode=Mode.CLIENT, transmit_ts=7).pack(), (LOOPBACK, ntp_port))
            header = NtpHeader.unpack(sock.recv(512))
        return header if header.stratum == upstream["stratum"] + 1 else None

    header = wait_until(answer, 10.0, "a synchronised answer from the relay")
    assert header.mode == Mode.SERVER and header.origin_ts == 7
    assert header.leap == 0
    assert header.reference_id == bytes([127, 0, 0, 1])
