"""NTS-KE starvation by idle connections (issue 14, item 1), as an attacker would try it.

An unprivileged local process (``nobody``) holds hundreds of idle TCP connections to
``ntspy serve``'s NTS-KE port from one address (127.0.0.2), opening new ones as the
server closes them, while a legitimate client on another address (127.0.0.1) runs
NTS-KE again and again.  With the default settings (a 2 s deadline for the whole
session, 8 concurrent connections per client) the attacker holds only its share and
the legitimate client keeps being served.  Both KE back ends.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ntspy.client.ke import key_exchange
from ntspy.errors import NtsError
from ntspy.net.tls.trust import TrustConfig
from tests.peers import LOOPBACK, start_ntspy_server

ATTACKER = "127.0.0.2"
HOLD = 300  # idle connections the attacker tries to keep open
REFILL_PER_SECOND = 150  # new connections per second at most, to replace closed ones
ATTACK_SECONDS = 25.0  # the attacker's own bound (it also stops when stdin closes)
TRIES = 30  # NTS-KE attempts by the legitimate client,
SPACING = 0.2  # one every 0.2 s: over three session deadlines of the attacker's
REQUIRED_SHARE = 0.9

# Keeps up to HOLD idle connections (never a byte sent) open from ATTACKER; every one
# the server closes is replaced, at most REFILL_PER_SECOND a second.  Prints
# "holding N" once it has opened HOLD, and at the end its peak and its total.
_ATTACK = textwrap.dedent("""
    import os, selectors, socket, sys, time
    host, port, source, hold, rate, limit = (sys.argv[1], int(sys.argv[2]), sys.argv[3],
                                             int(sys.argv[4]), float(sys.argv[5]),
                                             float(sys.argv[6]))
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin, selectors.EVENT_READ, None)
    open_socks, opened, peak, started = set(), 0, 0, time.monotonic()
    tokens, then, announced = 0.0, started, False
    while time.monotonic() - started < limit:
        now = time.monotonic()
        tokens, then = min(rate, tokens + (now - then) * rate), now  # a 1 s bucket
        while len(open_socks) < hold and tokens >= 1:
            tokens -= 1
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.bind((source, 0))
            try:
                s.connect((host, port))
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                break
            sel.register(s, selectors.EVENT_READ, s)
            open_socks.add(s)
            opened += 1
        peak = max(peak, len(open_socks))
        if not announced and opened >= hold:
            print("holding", len(open_socks), flush=True)
            announced = True
        for key, _ in sel.select(0.01):
            if key.data is None:
                if not os.read(0, 64):
                    limit = 0.0  # stdin closed: stop
                continue
            s = key.data
            try:
                gone = s.recv(64) == b""
            except BlockingIOError:
                gone = False
            except OSError:
                gone = True
            if gone:
                sel.unregister(s)
                open_socks.discard(s)
                s.close()
    print("peak", peak, "opened", opened, flush=True)
""")


@pytest.mark.parametrize("pure_python", [False, True])
async def test_idle_connections_from_one_address_do_not_starve_nts_ke(
        tmp_path: Path, pure_python: bool) -> None:
    server = start_ntspy_server(tmp_path, allow="allow 127.0.0.0/8", pure_python=pure_python)
    attacker = None
    try:
        before = server.stats()
        attacker = subprocess.Popen(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             sys.executable, "-c", _ATTACK, LOOPBACK, str(server.ke_port), ATTACKER,
             str(HOLD), str(REFILL_PER_SECOND), str(ATTACK_SECONDS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert attacker.stdout is not None
        assert attacker.stdout.readline().startswith("holding"), "the attack did not start"
        trust = TrustConfig(use_system_store=False, extra=[server.certs.ca_cert])
        successes = 0
        started = time.monotonic()
        for _ in range(TRIES):
            try:
                result = await key_exchange("localhost", server.ke_port, trust=trust,
                                            timeout=3.0)
            except NtsError:
                continue
            successes += bool(result.cookies)
            await asyncio.sleep(SPACING)
        spent = time.monotonic() - started
        assert attacker.poll() is None, "the attacker stopped before the legitimate client"
        stats = server.stats()
        out, _ = attacker.communicate(timeout=30)  # closes its stdin: it stops
        share = successes / TRIES
        back_end = "asyncio" if pure_python else "compiled"
        print(f"\nNTS-KE under an idle-connection attack ({back_end} back end): "
              f"{successes}/{TRIES} succeeded ({share:.0%}) in {spent:.1f} s; "
              f"attacker {out.strip()}; dropped for the client's share: "
              f"{stats['ke_drop_client'] - before['ke_drop_client']}, "
              f"timed out: {stats['ke_timeouts'] - before['ke_timeouts']}")
        assert share >= REQUIRED_SHARE
        # The defence did the work: the attacker was held to its share.
        assert stats["ke_drop_client"] - before["ke_drop_client"] > 0
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
            attacker.wait()
        server.stop()
