#!/usr/bin/env python3
"""Instructions per request through ``Responder.handle``, counted by callgrind.

Wall-clock numbers on a shared, noisy machine move by 10 % from one run to the
next; instruction counts do not. This runs the responder on ``N`` identical
requests (NTS with one cookie and one placeholder, or plain NTP) under
``valgrind --tool=callgrind`` twice, with 0 and with N requests, and prints
the difference divided by N: what one more request costs, start-up and
imports excluded. ``NTSPY_NO_ACCEL=1`` in the environment measures the
pure-Python path.

    PYTHONPATH=src python bench/instructions.py            # nts and plain, AEAD 15
    PYTHONPATH=src python bench/instructions.py --aead 30 nts

(The same requests repeat, cookie included: a real client's cookie is new each
time, which costs the same here, since every cookie is opened anyway.)
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys


def run(mode: str, n: int, aead_id: int) -> None:
    """The measured loop (what callgrind runs)."""
    from ntspy.proto import nts
    from ntspy.proto.aead import Aead, info
    from ntspy.proto.cookies import CookieKeys, KeyRing, MasterKey
    from ntspy.proto.ntp import NtpHeader
    from ntspy.server.responder import RandomPool, Responder
    from ntspy.server.stats import StatsTable

    rng = random.Random(1)
    ring = KeyRing([MasterKey(1, rng.randbytes(32), 0)])
    meta = info(aead_id)
    keys = CookieKeys(aead_id, rng.randbytes(meta.key_length), rng.randbytes(meta.key_length))
    header = NtpHeader(transmit_ts=12345)
    if mode == "nts":
        request = nts.build_request(header, rng.randbytes(32), ring.seal(keys, rng.randbytes(16)),
                                    1, Aead(aead_id, keys.c2s), rng.randbytes(meta.nonce_length))
    else:
        request = header.pack()
    responder = Responder(ring, StatsTable().row(), RandomPool())  # as the daemon does
    now = 1_800_000_000 * 10**9

    def clock() -> int:
        return now + 1000

    handle = responder.handle
    assert handle(request, "192.0.2.1", now, clock) is not None  # warm: the session's plan
    for _ in range(n):
        handle(request, "192.0.2.1", now, clock)


def count(mode: str, n: int, aead_id: int) -> int:
    """Instructions callgrind counts for the whole process running ``n`` requests."""
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         __file__, "--run", mode, str(n), str(aead_id)],
        capture_output=True, text=True, check=True,
    ).stderr
    found = re.search(r"Collected : (\d+)", out)
    if found is None:
        raise SystemExit(f"no callgrind total in:\n{out}")
    return int(found.group(1))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--run":
        run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modes", nargs="*", help="nts and/or plain (default: both)")
    parser.add_argument("-n", type=int, default=2000, help="requests per run (default 2000)")
    parser.add_argument("--aead", type=int, default=15, help="the session's AEAD id (15, 30, ...)")
    args = parser.parse_args()
    if not set(args.modes) <= {"nts", "plain"}:
        parser.error("modes are nts and plain")
    accel = "pure Python" if os.environ.get("NTSPY_NO_ACCEL", "") not in ("", "0") else "compiled"
    for mode in args.modes or ["nts", "plain"]:
        per = (count(mode, args.n, args.aead) - count(mode, 0, args.aead)) / args.n
        print(f"{mode:5} AEAD {args.aead} {accel:11}: {per:,.0f} instructions per request")


if __name__ == "__main__":
    main()
